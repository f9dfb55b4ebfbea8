"""Atomic files and checkpoints that survive a kill.

Every file a run depends on is written to a temporary name and moved into place with `os.replace`, so a kill leaves
either the old file or the new one, never half of one. Checkpoints keep the previous good copy; a checkpoint that
fails to load (truncated, corrupt) is reported and the previous one is used instead.

A write is `durable` by default: the file's data reaches the disk (`fsync`) before it is moved into place, so even a
power loss leaves the old file or the whole new one, and a file that marks progress (a unit's `result.json`) is never
on disk before the files it stands for (`final.pt`, `ticket.pt`, written before it). A file that is rebuilt from those
on every start (the run's `summary.json`) is written with `durable=False`: a kill still leaves the old or the new file
(the move is atomic either way; the data sits in the page cache, which a killed process does not lose), and only a
power loss could leave it empty, which the next start rewrites. `fsync` cost 5 ms per file on the development
machine's disk and more on network file systems.

A write that fails (full disk, quota, read-only folder) removes its temporary file and raises `WriteFailed`, which
names the file and the remedy; the files already in place are untouched, so rerunning the same command after freeing
space resumes. Temporary files a killed process left behind (`.<name>.tmp<pid>`) are removed by
`remove_temp_files` when a run folder is opened.

Every `.pt` file is loaded with `torch.load(weights_only=True)`: tensors, dicts, lists, tuples, strings and numbers
only, so loading a ticket or checkpoint someone sent you cannot run code from it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class WriteFailed(OSError):
    """A file of the run could not be written. The message names the file, the cause and what to do."""

    def __init__(self, path: Path, cause: BaseException):
        code = getattr(cause, "errno", None)
        super().__init__(code, getattr(cause, "strerror", None) or str(cause), str(path))
        self.path = Path(path)
        if code in (errno.ENOSPC, errno.EDQUOT):
            remedy = ("free space there (or move the run folder to a disk with room and pass its new place as "
                      "hydra.run.dir=...)")
        else:
            remedy = "make the folder writable (or move the run folder elsewhere and pass hydra.run.dir=...)"
        self.message = (f"cannot write {self.path}: {self.strerror}; {remedy}, then rerun the same command to "
                        f"resume: finished levels and the last checkpoint are kept")

    def __str__(self) -> str:
        return self.message


def os_error(e: BaseException) -> OSError | None:
    """The OSError behind `e`: itself, or the cause of a RuntimeError (torch.save reports a failed write so)."""
    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
        seen += 1
    return None


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


_TEMP = re.compile(r"^\..+\.tmp\d*$")


def remove_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary files of writes that never finished (a killed or failed process) below `folder`.

    Call it only while holding the folder's lock: another live process's temporary file would go too."""
    removed = []
    for p in Path(folder).rglob(".*.tmp*"):
        if _TEMP.match(p.name) and p.is_file() and "wandb" not in p.relative_to(folder).parts:
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    if removed:
        log.info("removed %d temporary file(s) of an unfinished write: %s", len(removed),
                 ", ".join(str(p) for p in removed))
    return removed


def atomic_write_bytes(path: Path, write, durable: bool = True) -> None:
    """`write(f)` into a temporary file, then move it to `path`. `durable`: fsync the data before the move."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        cause = os_error(e)
        if cause is not None:
            raise WriteFailed(path, cause) from e
        raise


@contextlib.contextmanager
def appending(path: Path):
    """Open `path` to append; a failed append is cut off again (no half line) and raised as `WriteFailed`."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a") as f:
            yield f
    except OSError as e:
        with contextlib.suppress(OSError):
            os.truncate(path, size)
        raise WriteFailed(path, e) from e


def save_torch(obj: Any, path: Path) -> None:
    """`obj` must be plain data (tensors, dicts, lists, tuples, str, int, float, bool, None; not a str subclass such
    as torch.__version__) so that `load_torch` reads it back with weights_only=True."""
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


def load_torch(path: Path) -> Any:
    """Tensors and plain containers only (`weights_only=True`): a file cannot run code when it is loaded.

    torch's TorchVersion (a str) is allowed too: files written before device_info stored it as a plain str hold it."""
    from torch.torch_version import TorchVersion
    with torch.serialization.safe_globals([TorchVersion]):
        return torch.load(path, map_location="cpu", weights_only=True)


def write_text(path: Path, text: str) -> None:
    data = text.encode()
    atomic_write_bytes(path, lambda f: f.write(data))


def json_bytes(obj: Any) -> bytes:
    """What `save_json` writes for `obj`."""
    return json.dumps(obj, indent=2, default=_json_default).encode()


def save_json(obj: Any, path: Path, durable: bool = True) -> bytes:
    """Write `obj` as JSON (atomically; `durable`: see the module's docstring); returns the bytes written."""
    data = json_bytes(obj)
    atomic_write_bytes(path, lambda f: f.write(data), durable)
    return data


def fsync_file(path: Path) -> None:
    """Make a file written with `durable=False` durable now (nothing if it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    except OSError as e:
        raise WriteFailed(Path(path), e) from e
    try:
        os.fsync(fd)
    except OSError as e:
        raise WriteFailed(Path(path), e) from e
    finally:
        os.close(fd)


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
        return next(iter(self.states()), None)

    def states(self) -> list[dict]:
        """The readable checkpoints, newest first (a batched run may need the previous one to resume whole)."""
        out = []
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
            if path is self.previous and not out:
                log.warning("resuming from the previous checkpoint %s", path)
            out.append(state)
        return out

    def clear(self) -> None:
        for path in (self.current, self.previous):
            path.unlink(missing_ok=True)
