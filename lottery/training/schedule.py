"""The learning rate as a pure function of the step: no state of its own, so it restarts exactly at a rewind step."""

from __future__ import annotations

import math
from collections.abc import Callable

from lottery.core.steps import Steps


def lr_schedule(tcfg, steps: Steps) -> Callable[[int], float]:
    """Multiplier of the base learning rate for the update made at `step`."""
    milestones, warmup, total = steps.milestones, steps.warmup, steps.total

    def multiplier(step: int) -> float:
        if tcfg.schedule == "step":
            m = tcfg.gamma ** sum(step >= s for s in milestones)
        elif tcfg.schedule == "cosine":
            m = 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        else:
            m = 1.0
        if step < warmup:
            m *= (step + 1) / warmup
        return m

    return multiplier
