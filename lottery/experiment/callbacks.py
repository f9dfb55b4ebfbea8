"""Callbacks: code of the user's (or a test's) that the experiment calls at fixed points, registered from a module
named in `imports=[...]`. They see where a run is, never change what it computes unless they mean to:

    from lottery.experiment import Callback, register_callback

    class Notify(Callback):
        def level_done(self, level, folders, parent):
            print("level", level, "done in", folders)

    register_callback(Notify())

The tests' fault injection (tests/plugins/faults.py: a signal or a kill at a given step of a given unit, or after a
level) is such a callback; nothing about it is in the user's config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class UnitInfo:
    """Which unit is about to train: its replicate's run folder (and the replicas parent folder, if any), level,
    branch and unit name (`tag`: branch, or branch/unit)."""

    folder: Path
    parent: Path | None
    level: int
    branch: str
    unit: str

    @property
    def tag(self) -> str:
        return f"{self.branch}/{self.unit}" if self.unit else self.branch


class Callback:
    def unit_steps(self, unit: UnitInfo) -> dict[int, Callable[[], None]]:
        """Functions to call after the given steps of this unit's training (step 0: before its first step)."""
        return {}

    def level_done(self, level: int, folders: list[Path], parent: Path | None) -> None:
        """After every unit of `level` has its result, in every replicate folder of this process (`folders`; `parent`:
        the replicas parent folder, if any)."""


CALLBACKS: list[Callback] = []


def register_callback(callback: Callback) -> Callback:
    CALLBACKS.append(callback)
    return callback


def unit_steps(unit: UnitInfo, at_step: dict) -> dict:
    """`at_step` plus every callback's functions for this unit (both run when they share a step)."""
    out = dict(at_step)
    for cb in CALLBACKS:
        for step, fn in cb.unit_steps(unit).items():
            previous = out.get(step)
            out[step] = fn if previous is None else (lambda a=previous, b=fn: (a(), b()))
    return out


def level_done(level: int, folders: list[Path], parent: Path | None) -> None:
    for cb in CALLBACKS:
        cb.level_done(level, folders, parent)
