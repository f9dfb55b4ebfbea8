"""Branches: what runs on a level's ticket besides the ticket itself.

A branch is one registered function from a `LevelContext` (the level's masks, rewind point and weights, seeded
randomness, the run's model builder) to the units it trains, each a (model, masks, start step, data seed). A branch
may add an analysis that runs once its units are trained and adds keys to its record. The controls of the lottery
ticket papers are entries of a few lines each; a user's own branch is one `@register_branch` function in their module,
loaded with `imports=[my_module]` and listed in `pruning.branches`. Its settings, if any, live in `branch.<name>`.

Seeds: a branch's randomness comes from `ctx.seed` = f(replicate seed, branch name, level), so every control is
reproducible and independent of the others.

A branch function must not read the level's trained ticket (final.pt): with `replicas` its units are built before the
level's ticket trains, and train in the same batch as the ticket.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lottery import masks as M
from lottery.core.registry import Registry, check_settings, plain
from lottery.core.seeds import derive_seed
from lottery.core.steps import Steps
from lottery.data import Split

if TYPE_CHECKING:
    from lottery.config import Config


@dataclass
class Unit:
    """One training run of a branch: `model` (weights already set) trained with `masks` from `start` to the end."""

    model: nn.Module
    masks: M.Masks
    name: str = ""  # sub-folder of the branch folder; needed when a branch trains more than one unit
    start: int | None = None  # first step; None: the level's rewind step
    data_seed: int | None = None  # data order and augmentation; None: the run's data seed
    keep_final: bool = False  # save the trained weights (final.pt in the unit's folder) for the branch's analysis
    end: int | None = None  # last step; None: the end of training (fine-tuning trains past it)
    lr_at: int | None = None  # train at the learning rate of this step throughout (fine-tuning: the final one)


@dataclass
class LevelContext:
    """What a branch sees of the level it runs on, and the few things it may do there. It does not see the run that
    calls it: everything a branch needs is a field or a method here."""

    level: int
    branch: str
    masks: M.Masks  # the level's ticket masks
    rewind_step: int
    settings: dict  # this branch's `branch.<name>` node, validated
    replicate: int  # the replicate seed
    # the run's settings, typed and read-only (lottery.config.Config: ctx.cfg.seed, ctx.cfg.train.eval_batch_size,
    # ctx.cfg.pruning.rate; the registered things' nodes, ctx.cfg.dataset.name or ctx.cfg.optimizer["lr"], read as
    # attributes or items); never a DictConfig
    cfg: Config
    steps: Steps  # the run's durations in steps
    data: Split  # the replicate's data: data.val(), data.test(), data.train_rows(idx), data.n_train
    new_model: Callable[..., nn.Module]  # new_model(init_seed=None): a fresh model, initialized when given a seed
    state_at: Callable[[int], dict]  # the dense run's full state after k steps (0, the rewind step, a captured k)
    prune: Callable[..., M.Masks]  # prune(keep=counts, invert=False): the level's pruning, recomputed
    trained_state: Callable[[], dict]  # the trained weights the level's masks were pruned from (level L-1's, or the
    # dense network's with pruning.from_dense)

    @property
    def seed(self) -> int:
        """This branch's own seed at this level: f(replicate seed, branch name, level)."""
        return derive_seed(self.replicate, self.branch, self.level)

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def ticket_model(self, masks: M.Masks | None = None) -> nn.Module:
        """A model holding the rewind-point weights with `masks` (default: the ticket's) applied."""
        return self.model_at(self.rewind_step, masks)

    def trained_model(self, masks: M.Masks | None = None) -> nn.Module:
        """A model holding the trained weights the level was pruned from, with `masks` (default: the ticket's)."""
        model = self.new_model()
        model.load_state_dict(self.trained_state())
        M.apply(model, self.masks if masks is None else masks)
        return model

    def model_at(self, step: int, masks: M.Masks | None = None) -> nn.Module:
        """A model holding the dense run's full state at `step` (a step the branch's `capture` asked for, the rewind
        step, or 0) with `masks` (default: the ticket's) applied."""
        model = self.new_model()
        model.load_state_dict(self.state_at(step))
        M.apply(model, self.masks if masks is None else masks)
        return model


@dataclass(frozen=True)
class Branch:
    name: str
    fn: Callable[[LevelContext], list[Unit]]
    label: str  # legend text in lottery-report's figures
    settings: type | None = None  # dataclass of its keys under branch.<name>
    dense: bool = False  # also runs at level 0 (the dense network), not only on pruned levels
    analyze: Callable[[LevelContext, list[Unit], list[dict]], dict] | None = None
    selectable: bool = True  # may be listed in pruning.branches (retrain is lottery-retrain's own)
    # Steps of level 0's training whose full state the branch starts units from (`ctx.model_at(k)`): fn(settings,
    # steps: lottery.core.steps.Steps) -> list of steps. Level 0 saves them once as it passes them.
    capture: Callable[[dict, Any], list[int]] | None = None
    # check(settings, levels, dense, steps): the branch's settings against the run (levels: how many, level 0
    # included; dense: whether level 0 trains; steps: the durations), raising ValueError before any work
    check: Callable[[dict, int, bool, Any], None] | None = None


BRANCHES = Registry("branch")


def register_branch(
    name: str,
    label: str | None = None,
    *,
    settings: type | None = None,
    dense: bool = False,
    analyze: Callable | None = None,
    selectable: bool = True,
    capture: Callable | None = None,
    check: Callable | None = None,
):
    """`@register_branch("name", "legend label")` on fn(ctx: LevelContext) -> list[Unit]: the units the branch trains
    on a level's ticket (none: the level is skipped). `settings`: a dataclass of its keys under `branch.<name>`;
    `dense`: run on level 0 too; `analyze(ctx, units, records) -> dict`: keys added to the branch's record;
    `capture(settings, steps) -> [k, ...]`: steps whose full state level 0 saves for `ctx.model_at(k)`;
    `check(settings, levels, dense, steps)`: raise ValueError before any work; `selectable=False`: not listable in
    pruning.branches. The field comments of `Branch` say more."""

    def decorator(fn):
        if name == "ticket":
            raise ValueError("branch 'ticket' is already registered (it is the level's ticket itself)")
        BRANCHES.add(name, Branch(name, fn, label or name, settings, dense, analyze, selectable, capture, check))
        return fn

    return decorator


def branch_settings(name: str, cfg) -> dict:
    """`branch.<name>` of `cfg` (the typed config, or a DictConfig at the session's checks) as plain values, checked
    against the branch's settings dataclass."""
    node = cfg.get("branch") if isinstance(cfg, Mapping) else getattr(cfg, "branch", None)
    raw = plain((node or {}).get(name))
    return check_settings(raw, BRANCHES.lookup(name).settings, f"branch.{name}", of=f"branch '{name}'")


def check_levels(key: str, listed, levels: int, dense: bool) -> None:
    """A setting listing IMP levels (`key`, e.g. pruning.branch_levels) must name levels the run has: 0 (the dense
    network) only where it trains, the last one `levels - 1`."""
    have = list(range(0 if dense else 1, levels))
    missing = [lv for lv in listed if lv not in have]
    if missing:
        raise ValueError(
            f"{key} names level {missing[0]}, which this run does not have (it trains levels "
            f"{', '.join(map(str, have)) or 'none'}); accepted: those levels, or [] for every level"
        )


def label(branch: str) -> str:
    return BRANCHES[branch].label if branch in BRANCHES else branch
