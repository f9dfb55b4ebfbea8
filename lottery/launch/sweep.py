"""Hydra callback that writes a multirun's combined table when the sweep ends.

Registered in conf/config.yaml under `hydra.callbacks`, so every multirun (`-m`, `sweep=...`, any launcher) leaves
`<sweep dir>/summary.csv`: the table `lottery-report <sweep dir>` writes as runs.csv. Failed jobs are rows too: their
folders hold `error.txt` (written by the CLI), which becomes the `error` column.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def write_sweep_table(sweep_dir) -> Path | None:
    from lottery.report import collect_runs, write_table  # matplotlib only when a sweep ends, not in every job

    sweep_dir = Path(sweep_dir)
    rows = collect_runs([sweep_dir])
    if not rows:
        log.warning("no run folders under %s; no combined table written", sweep_dir)
        return None
    path = write_table(rows, sweep_dir / "summary.csv")
    log.info("combined table (%d rows, %d job folders): %s", len(rows), len({r["run_dir"] for r in rows}), path)
    return path


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        # A broken table must not turn a finished sweep into a failed command: the runs are safe on disk and
        # `lottery-report <sweep dir>` rebuilds it.
        try:
            write_sweep_table(config.hydra.sweep.dir)
        except Exception:
            log.exception("could not write the combined table; run `lottery-report %s`", config.hydra.sweep.dir)
