"""A Hydra callback that checks the run folder can be created before Hydra itself creates it.

Hydra makes the run (or sweep) folder before any of lottery's code runs; on a read-only file system, under an
immutable folder or without permission, that fails inside Hydra with a 30-line traceback. This callback runs just
before (`on_run_start`, `on_multirun_start`) and turns it into one line and exit status 74 (EX_IOERR), as every other
failed write of a run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

WRITE_FAILED_EXIT = 74
# The folders this process created for its run folder (the run folder and the parents it lacked), deepest last: a
# single run refused before it owned its folder removes those that stayed empty (lottery.cli), leaving nothing behind.
CREATED: list[Path] = []


def _require_folder(path: str) -> None:
    CREATED.clear()
    missing = [p for p in [Path(path), *Path(path).parents] if not p.exists()]
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        CREATED.extend(reversed(missing))
    except OSError as e:
        print(
            f"error: cannot create the run folder {path}: {e.strerror or e}; choose a folder you can write with "
            f"hydra.run.dir=... (hydra.sweep.dir=... for a multirun), or make this one writable",
            file=sys.stderr,
        )
        sys.exit(WRITE_FAILED_EXIT)


class RunFolderCheck(Callback):
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _require_folder(str(OmegaConf.select(config, "hydra.run.dir")))

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _require_folder(str(OmegaConf.select(config, "hydra.sweep.dir")))
