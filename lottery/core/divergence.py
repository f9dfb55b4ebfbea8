"""Diverged training: how it is detected, what a diverged unit records, and what the run does next.

Detection costs no extra host-device sync: the training loop already reads the summed training loss at every
evaluation (and at every training-loss log), so a NaN or infinite loss anywhere since the last read shows there, as
does a non-finite validation or test loss. The unit stops at once: its `result.json` and `summary.json` record say
`diverged: true` with `diverged_step` (the evaluation that saw it; the loss first went bad after `last_finite_step`),
its final accuracy and losses are null (a network of NaNs scores chance accuracy, which is not a result), and its
evaluation curve up to that point is kept.

A diverged ticket is never pruned to make the next level. `train.on_divergence` says what else happens:
- `stop` (default): the run ends at once with `Diverged`: one `error:` line and exit status 3 (a multirun records
  the job as failed, `error.txt` and the `error` column of summary.csv, and goes on with the other jobs). Diverging
  is almost always a setting to fix (a learning rate too high for the model), the other units of the run use the same
  setting, and in a sweep their cluster time is better spent elsewhere.
- `continue`: the remaining units that do not depend on the diverged one still train (the controls of the same level,
  and every later level when only a control diverged); the run then ends with the same error, so it is still seen as
  failed. Rerunning the same command with `train.on_divergence=continue` in a stopped run's folder trains them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

POLICIES = ("stop", "continue")


def nonfinite(*values) -> bool:
    """True when a number among `values` (None allowed) is NaN or infinite."""
    return any(v is not None and not math.isfinite(v) for v in values)


def finite_or_none(record: dict) -> dict:
    """The record with NaN and infinities replaced by None: JSON has no NaN, and strict readers refuse it."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def describe(record: dict, replicate: bool = False) -> str:
    """`level 2 reinit has a non-finite loss by step 40 (finite at step 20)`, naming the replicate when asked."""
    last = record.get("last_finite_step")
    who = f"replicate {record.get('replicate')}: " if replicate else ""
    return (
        f"{who}level {record['level']} {record['branch']} has a non-finite loss by step {record['diverged_step']}"
        + (f" (finite at step {last})" if last is not None else "")
    )


class Diverged(Exception):
    """Raised after the diverged units' records are written; the message names each one."""

    def __init__(self, records: Iterable[dict], stopped: bool, replicas: bool = False):
        self.records = list(records)
        if stopped:
            after = (
                "the replicate stopped there (train.on_divergence=stop; =continue trains the remaining controls)"
                if replicas
                else "the run stopped there (train.on_divergence=stop; =continue trains the remaining controls)"
            )
        else:
            after = "the units that did not depend on it were trained"
        if replicas and stopped:
            after += "; the other replicates finished"
        super().__init__(
            f"training diverged: {'; '.join(describe(r, replicas) for r in self.records)}; recorded as diverged: "
            f"true in summary.json, no level is pruned from a diverged ticket, and {after}. Lower optimizer.lr (or add "
            f"train.warmup) and run again in a new folder"
        )


class AtChance(Exception):
    """Raised when IMP would build a next level from a ticket that ended at chance (it learned nothing: pruning its
    weights ranks noise), after that level's records are written. A method that trains every level from the dense
    network (pruning.from_dense, or pruning at initialization) is not stopped: its collapsed level is a result."""

    def __init__(self, records: Iterable[dict], replicas: bool = False):
        self.records = list(records)
        who = (lambda r: f"replicate {r.get('replicate')}: ") if replicas else (lambda r: "")
        which = "; ".join(
            f"{who(r)}level {r['level']} ticket, test accuracy {r['test_accuracy']:.4f}" for r in self.records
        )
        super().__init__(
            f"a ticket ended at chance ({which}; no better than predicting the most frequent class), and the next "
            f"level would be pruned from it: the run stopped there, its records written with at_chance: true"
            f"{' (the other replicates finished)' if replicas else ''}. A learning rate too high or too low is the "
            f"usual cause: change optimizer.lr and run again in a new folder"
        )
