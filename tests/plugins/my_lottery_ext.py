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


# --- a user's dataset and optimizer, each with a setting of its own ------------------------------------------------

import torch  # noqa: E402

from lottery.data import register_dataset  # noqa: E402
from lottery.training import register_optimizer  # noqa: E402


@dataclass
class StripesSettings:
    noise: float = 0.5  # dataset.noise: standard deviation of the noise on each class's stripe pattern
    train_examples: int = 600  # dataset.train_examples

    def __post_init__(self):
        if self.noise < 0:
            raise ValueError(f"dataset.noise must be >= 0, got {self.noise}")


@register_dataset("stripes", input_shape=(1, 8, 8), num_classes=4, settings=StripesSettings)
def stripes(noise, train_examples, seed):
    """Class c is a bright row 2c in an 8x8 image, plus noise: learnable, and harder the larger the noise."""
    g = torch.Generator().manual_seed(seed)

    def draw(n):
        y = torch.arange(n) % 4
        x = noise * torch.randn(n, 1, 8, 8, generator=g)
        x[torch.arange(n), 0, 2 * y] += 1.0
        return x, y

    return (*draw(train_examples), *draw(200))


@dataclass
class SignSgdSettings:
    momentum: float = 0.0  # optimizer.momentum: heavy-ball momentum of the sign updates


class SignSGD(torch.optim.Optimizer):
    """w -= lr * sign(m), m = momentum * m + g (+ weight_decay * w)."""

    def __init__(self, params, lr, momentum, weight_decay):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad + group["weight_decay"] * p
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(g)
                p.add_(torch.sign(buf), alpha=-group["lr"])


@register_optimizer("signsgd", settings=SignSgdSettings)
def signsgd(params, *, lr, weight_decay, device, momentum):
    return SignSGD(params, lr, momentum, weight_decay)


# A user's own sparse-training method: a mask updater (lottery.training.updaters), selected as dst=magnitude_drop with
# the YAML file tests/plugins/conf/dst/magnitude_drop.yaml.
from lottery.training import MaskUpdater, register_updater  # noqa: E402


@dataclass
class MagnitudeDropSettings:
    every: int = 20  # steps between drops
    count: int = 3  # active weights of smallest magnitude each layer loses per drop

    def __post_init__(self):
        if self.every < 1 or self.count < 0:
            raise ValueError(f"dst.every must be >= 1 and dst.count >= 0, got {self.every} and {self.count}")


@register_updater("magnitude_drop")
class MagnitudeDrop(MaskUpdater):
    """Every `every` steps, each layer of each network loses its `count` active weights of smallest magnitude."""
    Settings = MagnitudeDropSettings

    def __init__(self, settings, ctx):
        super().__init__(settings, ctx)
        self.drops = [0] * self.n  # state a resumed run must get back

    def after_step(self, step, optimizer, active):
        if step % self.settings["every"]:
            return []
        changed = []
        for u, layers in enumerate(self.ctx.layers):
            if not active[u]:
                continue
            for layer in layers:
                flat = layer.mask.reshape(-1)
                kept = flat.nonzero().squeeze(1)
                order = torch.sort(layer.weight.reshape(-1)[kept].abs(), stable=True).indices
                flat[kept[order[:self.settings["count"]]]] = 0
                changed.append(layer.entry)
            self.drops[u] += 1
            self.record(u, step)
        return changed

    def state_dict(self, u):
        return {**super().state_dict(u), "drops": self.drops[u]}

    def load_state_dict(self, u, state):
        self.drops[u] = state["drops"]
        return super().load_state_dict(u, state)

    def result(self, u):
        return {**super().result(u), "drops": self.drops[u]}
