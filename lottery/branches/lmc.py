"""Linear mode connectivity and instability (Frankle, Dziugaite, Roy & Carbin, ICML 2020), as the branch `lmc`.

From a level's weights at step k (the level's masks applied to the dense run's full state at k), two copies train to
the end of training on two data orders (and augmentations) derived from the replicate seed; nothing else differs.
Then the network is evaluated on the straight line between the two trained copies, at `points` evenly spaced points
including both ends, on the test set and on a fixed seeded subset of the training set. The error barrier (instability)
is the largest error along the path minus the mean of the two end points' errors, in percentage points: about 0 when
the copies end in one linearly connected region (the network is *stable* at k), large when SGD noise sends them to
different minima.

`branch.lmc.steps` lists several k: level 0 saves the dense run's state at each k as it passes it (Branch.capture), so
the parent run trains once, and every k gets its own two copies (units `k<k>_a`, `k<k>_b`) and its own barrier.
Both ends share the masks, so pruned weights are zero at every point. BatchNorm: by default every entry of the state
is interpolated, running statistics included (the paper); `batchnorm=recompute` instead recomputes the running
statistics of each point on the training subset, which leaves every parameter as interpolated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lottery import masks as M
from lottery.branches.base import LevelContext, Unit, check_levels, register_branch
from lottery.core.ranges import at_least, setting
from lottery.core.seeds import derive_seed
from lottery.core.steps import parse_steps
from lottery.data import Split
from lottery.training import evaluate

BATCHNORM = ("interpolate", "recompute")


@dataclass
class LmcSettings:
    points: int = setting(30, at_least(2))  # evaluation points on the path between the two copies, both ends included
    steps: list[str] = field(default_factory=list)  # steps k the copies start from; empty: the run's rewind step
    levels: list[int] = setting(list, at_least(0))  # levels to analyse (0 = dense); empty: every level
    # size of the fixed, seeded subset of the training set for the train error
    train_examples: int = setting(10000, at_least(1))
    batchnorm: str = "interpolate"  # interpolate (all state, running statistics too) | recompute (on the subset)

    def __post_init__(self):
        if self.points < 2:
            raise ValueError(f"branch.lmc.points must be >= 2 (the path's two ends), got {self.points}")
        if self.train_examples < 1:
            raise ValueError(f"branch.lmc.train_examples must be >= 1, got {self.train_examples}")
        if self.batchnorm not in BATCHNORM:
            raise ValueError(f"unknown branch.lmc.batchnorm '{self.batchnorm}'; accepted: {', '.join(BATCHNORM)}")
        for k in self.steps:
            parse_steps(k, 1, "branch.lmc.steps entry")
        if any(level < 0 for level in self.levels):
            raise ValueError(f"branch.lmc.levels entries are IMP levels (>= 0), got {list(self.levels)}")


def start_steps(settings: dict, steps) -> list[int]:
    """The steps k of `branch.lmc.steps` in iterations, sorted, without repeats (empty: the run's rewind step)."""
    ks = {parse_steps(k, steps.per_epoch, "branch.lmc.steps entry") for k in settings["steps"]}
    return sorted(ks) if ks else [steps.rewind]


# --- the path --------------------------------------------------------------------------------------------------------


def interpolate(a: dict, b: dict, alpha: float) -> dict:
    """(1 - alpha) a + alpha b for every floating-point entry (BatchNorm running statistics included); the ends are
    the two states themselves, bit for bit. Integer entries (BatchNorm's batch counters) are taken from `a`."""
    if alpha == 0:
        return a
    if alpha == 1:
        return b
    return {k: torch.lerp(v, b[k], alpha) if v.is_floating_point() else v for k, v in a.items()}


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int) -> None:
    """Replace every BatchNorm's running statistics by their average over `x` in batches of `batch_size` (training
    mode, no gradient): the statistics that match the point's weights. Parameters are not touched."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches, not an exponential one
    was_training = model.training
    model.train()
    for i in range(0, len(x), batch_size):
        model(x[i : i + batch_size])
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.train(was_training)


def path(
    model: nn.Module,
    state_a: dict,
    state_b: dict,
    masks: M.Masks,
    alphas: list[float],
    splits: dict,
    *,
    batch_size: int,
    precision: str = "fp32",
    recompute: tuple | None = None,
) -> dict:
    """Loss and error (%) on each split {name: (x, y)} at each alpha; `recompute=(x, batch size)` recomputes the
    BatchNorm statistics at every point."""
    out: dict[str, list[float | None]] = {"alpha": list(alphas)}
    for name in splits:
        out[f"{name}_error"], out[f"{name}_loss"] = [], []
    for alpha in alphas:
        model.load_state_dict(interpolate(state_a, state_b, alpha))
        M.apply(model, masks)
        if recompute is not None:
            recompute_batchnorm(model, *recompute)
        for name, (x, y) in splits.items():
            metrics = evaluate(model, x, y, batch_size, precision)
            acc = metrics["accuracy"]
            out[f"{name}_error"].append(None if acc is None else 100 * (1 - acc))
            out[f"{name}_loss"].append(metrics["loss"])
    return out


def barrier(errors: list) -> float | None:
    """Error barrier in percentage points: the highest error on the path minus the mean of its two ends' errors."""
    if not errors or errors[0] is None:
        return None
    return max(errors) - (errors[0] + errors[-1]) / 2


def train_subset(data: Split, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed subset of the training set (without augmentation), the same for every level and k of a replicate."""
    n = data.n_train
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(size, n)]
    return data.train_rows(idx)


# --- the branch ------------------------------------------------------------------------------------------------------


def _capture(settings: dict, steps) -> list[int]:
    return start_steps(settings, steps)


def _copies(ctx: LevelContext) -> list[Unit]:
    if ctx.settings["levels"] and ctx.level not in ctx.settings["levels"]:
        return []
    # The same two data orders for every k: only the starting point changes along the instability-vs-k curve.
    seeds = [derive_seed(ctx.seed, "copy", c) for c in ("a", "b")]
    return [
        Unit(ctx.model_at(k), ctx.masks, name=f"k{k}_{c}", start=k, data_seed=seed, keep_final=True)
        for k in start_steps(ctx.settings, ctx.steps)
        for c, seed in zip(("a", "b"), seeds)
    ]


def _analyze(ctx: LevelContext, units: list[Unit], records: list[dict]) -> dict:
    s = ctx.settings
    n = s["points"]
    alphas = [i / (n - 1) for i in range(n)]
    sub = train_subset(ctx.data, s["train_examples"], derive_seed(ctx.replicate, "lmc", "train_subset"))
    splits = {"test": ctx.data.test(), "train": sub}
    recompute = (sub[0], ctx.cfg.train.batch_size) if s["batchnorm"] == "recompute" else None
    model = ctx.new_model()
    by_step, curves = {}, {}
    for a, b in zip(units[0::2], units[1::2]):
        state_a = {k: v.detach() for k, v in a.model.state_dict().items()}
        state_b = {k: v.detach() for k, v in b.model.state_dict().items()}
        curve = path(
            model,
            state_a,
            state_b,
            ctx.masks,
            alphas,
            splits,
            batch_size=ctx.cfg.train.eval_batch_size,
            precision=ctx.cfg.train.precision,
            recompute=recompute,
        )
        k = str(a.start)
        by_step[k] = {"test": barrier(curve["test_error"]), "train": barrier(curve["train_error"])}
        curves[k] = {**curve, "instability_test": by_step[k]["test"], "instability_train": by_step[k]["train"]}
    steps = [int(k) for k in by_step]
    main = ctx.rewind_step if ctx.rewind_step in steps else steps[0]
    return {
        "lmc_step": main,
        "instability_test": by_step[str(main)]["test"],
        "instability_train": by_step[str(main)]["train"],
        "lmc_steps": steps,
        "instability_by_step": by_step,
        "lmc_batchnorm": s["batchnorm"],
        "lmc_train_examples": len(sub[1]),
        "curves": curves,
    }


def _check(settings: dict, levels: int, dense: bool, steps) -> None:
    """branch.lmc.levels must name levels the run has (and level 0 only where the dense network trains)."""
    check_levels("branch.lmc.levels", settings["levels"], levels, dense)


register_branch(
    "lmc",
    "linear mode connectivity: two copies from step k, error barrier between them",
    settings=LmcSettings,
    dense=True,
    analyze=_analyze,
    capture=_capture,
    check=_check,
)(_copies)
