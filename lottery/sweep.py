"""Hydra callback that writes a multirun's combined table when the sweep ends.

Registered in conf/config.yaml under `hydra.callbacks`, so every multirun (`-m`, `sweep=...`, any launcher) leaves
`<sweep dir>/summary.csv`, the same table `lottery-report <sweep dir>` builds. Jobs that failed are rows too: their
run folders hold `error.txt` (written by the CLI), which the report turns into the `error` column.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

# A job folder holds config.yaml once the run started, or only error.txt when it failed before (bad config, no data).
_MARKERS = ("config.yaml", "error.txt")


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The run folders of a sweep, in job order. Hidden folders (.submitit, .hydra) are launcher bookkeeping."""
    sweep_dir = Path(sweep_dir)
    found = set()
    for marker in _MARKERS:
        for path in sweep_dir.rglob(marker):
            folder = path.parent
            if not any(part.startswith(".") for part in folder.relative_to(sweep_dir).parts):
                found.add(folder)
    # Only the top folder of each run (runs hold no config.yaml deeper down today, but retrain folders might).
    runs = [d for d in found if d != sweep_dir and not any(o in d.parents for o in found)]
    return sorted(runs, key=_job_order)


def _job_order(folder: Path):
    # Hydra names job folders "<job num>_<overrides>": sort 2_ before 10_.
    m = re.match(r"(\d+)", folder.name)
    return (int(m.group(1)) if m else float("inf"), str(folder))


def write_sweep_table(sweep_dir: Path) -> Path | None:
    from lottery.report import collect_runs, write_table  # heavy imports only when a sweep ends

    sweep_dir = Path(sweep_dir)
    runs = job_dirs(sweep_dir)
    if not runs:
        log.warning("no run folders under %s; no combined table written", sweep_dir)
        return None
    path = sweep_dir / "summary.csv"
    write_table(collect_runs(runs), path)
    log.info("combined table of %d runs: %s", len(runs), path)
    return path


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        # A broken table must not turn a finished sweep into a failed command: the runs are safe on disk and
        # `lottery-report <sweep dir>` rebuilds it.
        try:
            write_sweep_table(Path(config.hydra.sweep.dir))
        except Exception:  # noqa: BLE001
            log.exception("could not write the combined table; run `lottery-report %s`", config.hydra.sweep.dir)
