"""Atomic files, checkpoints that survive a kill, and the stop signal for preemption.

Every file a run depends on is written to a temporary name and moved into place with `os.replace`, so a kill leaves
either the old file or the new one, never half of one. Checkpoints keep the previous good copy; a checkpoint that
fails to load (truncated, corrupt) is reported and the previous one is used instead.
"""
from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def atomic_write_bytes(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_torch(obj: Any, path: Path) -> None:
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


def load_torch(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


def save_json(obj: Any, path: Path) -> None:
    data = json.dumps(obj, indent=2, default=_json_default).encode()
    atomic_write_bytes(path, lambda f: f.write(data))


def load_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o)}")


class Checkpoints:
    """`checkpoint.pt` plus `checkpoint.prev.pt` in one folder."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.current = self.folder / "checkpoint.pt"
        self.previous = self.folder / "checkpoint.prev.pt"

    def save(self, state: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.current.exists():
            os.replace(self.current, self.previous)
        save_torch(state, self.current)

    def load(self) -> dict | None:
        for path in (self.current, self.previous):
            if not path.exists():
                continue
            try:
                state = load_torch(path)
                if not isinstance(state, dict) or "step" not in state:
                    raise ValueError("not a lottery checkpoint")
            except Exception as e:  # noqa: BLE001 - any unreadable file means: fall back
                log.warning("checkpoint %s is unreadable (%s: %s); falling back to the previous one",
                            path, type(e).__name__, e)
                continue
            if path is self.previous:
                log.warning("resuming from the previous checkpoint %s", path)
            return state
        return None

    def clear(self) -> None:
        for path in (self.current, self.previous):
            path.unlink(missing_ok=True)


# --- stop requests -----------------------------------------------------------------------------------------------

_stop: dict = {"signal": None, "previous": {}}


def _handler(signum, frame):
    _stop["signal"] = signum
    log.warning("received %s: will checkpoint and stop at the next step", signal.Signals(signum).name)


def install_stop_handlers() -> None:
    """SIGUSR2 (SLURM's warning before a time limit, as submitit configures it) and SIGTERM (preemption) ask the
    training loop to checkpoint and stop. The handlers they replace (submitit's, which requeue the job) are kept and
    called by `hand_over` once the checkpoint is on disk, so the requeued job finds it."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (getattr(signal, "SIGUSR2", None), signal.SIGTERM):
        if sig is not None:
            previous = signal.signal(sig, _handler)
            if previous is not _handler:
                _stop["previous"][sig] = previous


def stop_requested() -> bool:
    return _stop["signal"] is not None


def hand_over() -> None:
    """After the checkpoint: let the replaced handler (submitit's requeue) act on the signal we caught."""
    signum = _stop["signal"]
    previous = _stop["previous"].get(signum)
    _stop["signal"] = None
    if callable(previous):
        log.warning("checkpoint written; handing %s to the launcher to requeue the job", signal.Signals(signum).name)
        previous(signum, None)
