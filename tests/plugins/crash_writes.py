"""Kills between (or inside) the file writes of a run, for tests/test_overhead.py. Test-only: loaded with
`imports=[crash_writes]` (this folder on PYTHONPATH); it wraps lottery.core.files' atomic write and the checkpoints'
removal in this process. A point is `<file>@<when>`:

    <file>  the file's path below the run folder (init.pt, levels/level_1/ticket.pt, levels/level_1/reinit/result.json),
            with `#<n>` for its n-th write in this process (checkpoint.pt#2), `clear:<unit folder>` for the removal
            of a unit's checkpoints, or `summary.json<<result>#<n>` for the n-th write of summary.json after this
            process's latest result.json (`<None#n>` before any)
    <when>  `inside`: the temporary file is written and not yet moved into place (for `clear:`, checkpoint.pt is
            removed and checkpoint.prev.pt not yet); `after`: the file is in place and nothing else is done yet

Told what to do by the environment:

    LOTTERY_CRASH_SNAPSHOTS  a folder: at every point, the run folder as it is on disk then (what a SIGKILL there
                             leaves: the page cache survives the process) is copied to <folder>/<nnn>, and
                             <folder>/points.txt lists the points in order; the run itself goes on
    LOTTERY_CRASH            points separated by ';': SIGKILL this process at the first of them it reaches that has
                             not fired yet
    LOTTERY_CRASH_MARKERS    a folder: a point that fired leaves a file there and never fires again, so rerunning the
                             same command goes on to the next point
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
from pathlib import Path

import lottery.core.files as files

_POINTS = [p for p in os.environ.get("LOTTERY_CRASH", "").split(";") if p]
_MARKERS = Path(os.environ["LOTTERY_CRASH_MARKERS"]) if os.environ.get("LOTTERY_CRASH_MARKERS") else None
_SNAPSHOTS = Path(os.environ["LOTTERY_CRASH_SNAPSHOTS"]) if os.environ.get("LOTTERY_CRASH_SNAPSHOTS") else None
_state = {"result": None, "summaries": 0, "points": 0, "writes": {}}


def _run_dir(path: Path) -> Path:
    parts = path.parts
    for top in ("levels", "states"):
        if top in parts:
            return Path(*parts[:parts.index(top)])
    return path.parent


def _relative(path: Path) -> str:
    return path.relative_to(_run_dir(path)).as_posix()


def _key(path: Path) -> str:
    rel = _relative(path)
    if rel == "summary.json":
        _state["summaries"] += 1
        return f"summary.json<{_state['result']}#{_state['summaries']}"
    n = _state["writes"][rel] = _state["writes"].get(rel, 0) + 1
    return rel if n == 1 else f"{rel}#{n}"


def _marker(point: str) -> Path:
    return _MARKERS / hashlib.sha1(point.encode()).hexdigest()


def _fires(point: str) -> bool:
    return point in _POINTS and _MARKERS is not None and not _marker(point).exists()


def _at(point: str, run_dir: Path) -> None:
    if _SNAPSHOTS is not None:
        _SNAPSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copytree(run_dir, _SNAPSHOTS / f"{_state['points']:03d}", symlinks=True)
        with open(_SNAPSHOTS / "points.txt", "a") as f:
            f.write(point + "\n")
        _state["points"] += 1
    if _fires(point):
        _MARKERS.mkdir(parents=True, exist_ok=True)
        _marker(point).write_text(point)
        os.kill(os.getpid(), signal.SIGKILL)


_write = files.atomic_write_bytes


def atomic_write_bytes(path, write, *args, **kwargs):
    path = Path(path)
    key = _key(path)
    if _SNAPSHOTS is not None or _fires(f"{key}@inside"):
        tmp = files.temp_path(path)  # what a write stopped before its move leaves: the whole temporary file
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
        _at(f"{key}@inside", _run_dir(path))
    _write(path, write, *args, **kwargs)
    if key.endswith("result.json"):
        _state["result"], _state["summaries"] = key, 0
    _at(f"{key}@after", _run_dir(path))


files.atomic_write_bytes = atomic_write_bytes

_clear = files.Checkpoints.clear


def clear(self):
    if not (self.current.exists() or self.previous.exists()):
        return _clear(self)  # nothing to remove: no point here
    key = f"clear:{_relative(self.folder / 'checkpoint.pt').rsplit('/', 1)[0]}"
    if _SNAPSHOTS is not None or _fires(f"{key}@inside"):
        self.current.unlink(missing_ok=True)  # half done: checkpoint.pt gone, checkpoint.prev.pt still there
        _at(f"{key}@inside", _run_dir(self.current))
    _clear(self)
    _at(f"{key}@after", _run_dir(self.current))


files.Checkpoints.clear = clear
