"""A user's own pruning criterion and branches, registered from outside lottery/ (used by tests/test_extensions.py).

Loaded with `lottery-train imports=[my_lottery_ext]` when this folder is on PYTHONPATH."""
from dataclasses import dataclass

from lottery.branches import Unit, register_branch
from lottery.pruning import register_criterion


@register_criterion("smallest_kept")
def smallest_kept(model, masks, *, batches, generator, power: float = 1.0):
    """Inverted magnitude: keeps the smallest weights (a sanity-check criterion)."""
    params = dict(model.named_parameters())
    return {n: -params[n].detach().abs() ** power for n in masks}


@dataclass
class OtherDataSettings:
    offset: int = 1  # data seed = replicate seed + offset


@register_branch("other_data", "ticket trained on another data order", settings=OtherDataSettings)
def other_data(ctx):
    return [Unit(ctx.ticket_model(), ctx.masks, data_seed=ctx.cfg.seed + ctx.settings["offset"])]


def _mean_accuracy(ctx, units, records):
    return {"mean_copy_accuracy": sum(r["test_accuracy"] for r in records) / len(records),
            "copies": len(records)}


@register_branch("two_copies", "two copies of the ticket on two data orders", dense=True, analyze=_mean_accuracy)
def two_copies(ctx):
    return [Unit(ctx.ticket_model(), ctx.masks, name=f"copy_{i}", data_seed=ctx.seed + i, keep_final=True)
            for i in range(2)]
