"""What the benchmarks share: their measurements are torch.utils.benchmark's (`Timer` where a statement can be
repeated, `Measurement` for its statistics and `Compare` for its tables), and these two helpers.

`measurement` turns times the library cannot take itself into a Measurement: a window of the project's training loop
between two of its public `at_step` hooks (one call of `lottery.training.train` runs many steps, not a statement to
repeat), or a whole `lottery-train` process's unit time read from its log (the busy-machine and tiny-units modes).
The benchmarks alternate their variants across rounds, so load drifts on a shared machine hit each alike; a
ratio is always against a baseline measured in the same run.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

from torch.utils.benchmark import Measurement
from torch.utils.benchmark.utils.common import TaskSpec


def measurement(times: Iterable[float], label: str, sub_label: str, description: str, number_per_run: int = 1,
                threads: int | None = None) -> Measurement:
    """A Measurement of `times` (seconds of `number_per_run` runs each: steps of a window, or 1)."""
    if threads is None:
        import torch
        threads = torch.get_num_threads()
    return Measurement(number_per_run, [float(t) for t in times],
                       TaskSpec(stmt=description, setup="pass", label=label, sub_label=sub_label,
                                description=description, num_threads=threads))


def merged(ms: list[Measurement]) -> Measurement:
    """One Measurement of the rounds of a variant (all of one task)."""
    (m,) = Measurement.merge(ms)
    return m


def rate(m: Measurement, samples_per_run: float) -> dict:
    """Samples per second of a Measurement: its median, and the slowest and fastest round."""
    return {"samples_per_s": samples_per_run / m.median, "min": samples_per_run / max(m.times),
            "max": samples_per_run / min(m.times), "runs": len(m.times), "seconds": list(m.times)}


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # not on every platform
        return None
