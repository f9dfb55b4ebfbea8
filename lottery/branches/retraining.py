"""Retraining a pruned network without rewinding its weights (Renda, Frankle & Carbin, ICLR 2020, "Comparing
Rewinding and Fine-tuning in Neural Network Pruning"), as branches beside a level's ticket: the level's masks on the
trained weights it was pruned from (level L-1's, or the dense network's with pruning.from_dense), trained on with
- `finetune`: the final learning rate of the schedule, for `branch.finetune.steps` steps (default: what weight
  rewinding retrains, duration - rewind step), continuing the data order after the end of training;
- `lr_rewind`: the learning-rate schedule rewound to step `branch.lr_rewind.step` (default: the run's rewind step)
  and run to the end of training, as weight rewinding does but with the trained weights.
The same retraining as IMP's schedule for every level is `pruning.retrain=finetune|lr_rewind`.
"""

from __future__ import annotations

from dataclasses import dataclass

from lottery.branches.base import LevelContext, Unit, register_branch
from lottery.core.steps import parse_steps


def _needs_trained_weights(name: str):
    def check(settings: dict, levels: int, dense: bool, steps) -> None:
        if not dense:
            raise ValueError(
                f"branch '{name}' keeps the trained weights a level is pruned from, but "
                f"pruning.train_dense=false trains no dense network; it runs with IMP or one-shot "
                f"pruning after training"
            )
        if name == "lr_rewind" and settings["step"] is not None:
            k = parse_steps(settings["step"], steps.per_epoch, "branch.lr_rewind.step")
            if not 0 <= k < steps.total:
                raise ValueError(
                    f"branch.lr_rewind.step={settings['step']} ({k} steps) is outside training "
                    f"({steps.total} steps); accepted: 0 to {steps.total - 1} steps"
                )

    return check


@dataclass
class FinetuneSettings:
    steps: str | None = None  # steps at the final learning rate, e.g. 2000it (null: duration - rewind step)

    def __post_init__(self):
        if self.steps is not None and parse_steps(self.steps, 1, "branch.finetune.steps") < 1:
            raise ValueError(f"branch.finetune.steps must be at least one step, got '{self.steps}'")


@dataclass
class LrRewindSettings:
    step: str | None = None  # the schedule restarts at this step, e.g. 500it (null: the run's pruning.rewind)

    def __post_init__(self):
        if self.step is not None:
            parse_steps(self.step, 1, "branch.lr_rewind.step")


@register_branch(
    "finetune",
    "fine-tuning (trained weights, final learning rate)",
    settings=FinetuneSettings,
    check=_needs_trained_weights("finetune"),
)
def finetune(ctx: LevelContext) -> list[Unit]:
    total = ctx.steps.total
    budget = (
        total - ctx.rewind_step
        if ctx.settings["steps"] is None
        else parse_steps(ctx.settings["steps"], ctx.steps.per_epoch, "branch.finetune.steps")
    )
    return [Unit(ctx.trained_model(), ctx.masks, start=total, end=total + budget, lr_at=total - 1)]


@register_branch(
    "lr_rewind",
    "learning-rate rewinding (trained weights, schedule rewound)",
    settings=LrRewindSettings,
    check=_needs_trained_weights("lr_rewind"),
)
def lr_rewind(ctx: LevelContext) -> list[Unit]:
    k = (
        ctx.rewind_step
        if ctx.settings["step"] is None
        else parse_steps(ctx.settings["step"], ctx.steps.per_epoch, "branch.lr_rewind.step")
    )
    return [Unit(ctx.trained_model(), ctx.masks, start=k)]
