"""Durations: '500it', '2ep' or a plain integer, resolved into steps once per run (`Steps`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(it|ep)?\s*$")


def parse_steps(value: Any, steps_per_epoch: int, what: str = "duration") -> int:
    """'500it' -> 500, '2ep' -> 2 * steps_per_epoch, 300 -> 300 (iterations)."""
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"bad {what} '{value}'; accepted: '<N>it' (iterations), '<N>ep' (epochs) or a plain integer")
    number, unit = float(m.group(1)), m.group(2) or "it"
    steps = number * steps_per_epoch if unit == "ep" else number
    if unit == "it" and not number.is_integer():
        raise ValueError(f"bad {what} '{value}': iterations must be a whole number")
    return math.floor(steps + 0.5)


@dataclass(frozen=True)
class Steps:
    """Every duration of a run in steps, resolved once from the config and the epoch length."""

    per_epoch: int
    total: int  # train.duration
    eval_every: int
    warmup: int
    milestones: tuple
    rewind: int  # pruning.rewind
    checkpoint_every: int

    @staticmethod
    def resolve(cfg, steps_per_epoch: int) -> Steps:
        t = cfg.train
        parse = lambda v, what: parse_steps(v, steps_per_epoch, what)  # noqa: E731 - a short local alias
        total = parse(t.duration, "train.duration")
        rewind = parse(cfg.pruning.rewind, "pruning.rewind")
        return Steps(
            per_epoch=steps_per_epoch,
            total=total,
            eval_every=parse(t.eval_every, "train.eval_every"),
            warmup=parse(t.warmup, "train.warmup"),
            milestones=tuple(sorted(parse(m, "train.milestones entry") for m in t.milestones)),
            rewind=rewind,
            checkpoint_every=parse(cfg.checkpoint.every, "checkpoint.every"),
        )
