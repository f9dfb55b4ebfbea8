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

Every file written whole (weights, masks, rewind and initial states, results, tickets, the recorded config and
device) carries a checksum recorded when it is written: a hidden sidecar `.<name>.sha256` beside it, written
(atomically) before the file is moved into place and listing the new file's SHA-256 and the previous one's, so a
kill between the two moves leaves a file the sidecar still vouches for. `load_torch`, `load_json` and `verify` check
it and raise `Damaged`, naming the file and the remedy; a file without a sidecar (a folder written before checksums)
is read unverified, said once per process. The append-only `metrics.jsonl` has none (`repair_torn_line` mends its
end).

Every `.pt` file is loaded with `torch.load(weights_only=True)`: tensors, dicts, lists, tuples, strings and numbers
only, so loading a ticket or checkpoint someone sent you cannot run code from it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
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
            remedy = (
                "free space there (or move the run folder to a disk with room and pass its new place as "
                "hydra.run.dir=...)"
            )
        else:
            remedy = "make the folder writable (or move the run folder elsewhere and pass hydra.run.dir=...)"
        self.message = (
            f"cannot write {self.path}: {self.strerror}; {remedy}, then rerun the same command to "
            f"resume: finished levels and the last checkpoint are kept"
        )

    def __str__(self) -> str:
        return self.message


def os_error(e: BaseException | None) -> OSError | None:
    """The OSError behind `e`: itself, or the cause of a RuntimeError (torch.save reports a failed write so)."""
    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
        seen += 1
    return None


class Damaged(ValueError):
    """A file of a run that is not what was written: its bytes differ from its recorded checksum, or it cannot be
    read at all (truncated, garbled, the wrong kind of thing). One line naming the file and what to do."""

    def __init__(self, path: Path, reason: str):
        self.path = Path(path)
        super().__init__(f"{self.path} is damaged ({reason}); {remedy(self.path)}")


def remedy(path: Path) -> str:
    """What to do about a damaged file of a run folder: a level's file is recomputed by retraining the level."""
    parts = Path(path).parts
    rebuilt = {
        "device.json": "delete it to resume without comparing this machine with the one the run started on",
        "summary.json": "delete it: the run rebuilds it from the result files",
        "train.log": "remove it: the run writes its log there again (the earlier lines are lost)",
    }
    if Path(path).name in rebuilt:
        return rebuilt[Path(path).name]
    for i, part in enumerate(parts):
        if part.startswith("level_") and i > 0 and parts[i - 1] == "levels":
            if len(parts) > i + 2:  # a unit's file (levels/level_L/<branch>/...): that unit trains again
                return (
                    f"delete the unit's folder {Path(*parts[: i + 2])} and rerun the same command to train that "
                    f"unit again"
                )
            return (
                f"delete the level's folder {Path(*parts[: i + 1])} and rerun the same command to train that "
                f"level again"
            )
    return (
        "restore it from a copy, or rerun the command with a new folder (hydra.run.dir=...) to start the "
        "experiment again"
    )


CHECKSUM_SUFFIX = ".sha256"


def checksum_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}{CHECKSUM_SUFFIX}")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def recorded_digests(path: Path) -> list[str] | None:
    """The digests the sidecar of `path` vouches for (newest first), or None without a sidecar."""
    try:
        text = checksum_path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise Damaged(path, f"its checksum file {checksum_path(path).name} is unreadable: {e.strerror or e}") from None
    digests = [line.split()[0] for line in text.splitlines() if line.strip()]
    return digests or None  # empty: a sidecar a power loss cut (it is not fsynced), so nothing is known


_UNVERIFIED_SAID: set = set()


def verify(path: Path) -> bool:
    """Raise `Damaged` when `path`'s bytes are not those recorded when it was written; False (and one warning per
    process) when no checksum was recorded (a folder written before checksums), True when it matches."""
    path = Path(path)
    digests = recorded_digests(path)
    if digests is None:
        if not _UNVERIFIED_SAID:
            log.warning(
                "%s has no checksum (written before lottery recorded them): files like it are read unverified", path
            )
        _UNVERIFIED_SAID.add(path.parent)
        return False
    if not path.is_file():
        raise Damaged(path, "it is missing or not a file, but a checksum was recorded for it")
    if file_digest(path) not in digests:
        raise Damaged(path, "its bytes differ from the checksum recorded when it was written")
    return True


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
        log.info(
            "removed %d temporary file(s) of an unfinished write: %s", len(removed), ", ".join(str(p) for p in removed)
        )
    return removed


def atomic_write_bytes(path: Path, write, durable: bool = True, checksum: bool = True) -> None:
    """`write(f)` into a temporary file, then move it to `path`. `durable`: fsync the data before the move.
    `checksum`: record the file's SHA-256 in its sidecar first (see the module's docstring)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        if checksum:
            try:
                previous = (recorded_digests(path) or [])[:1]
            except Damaged:
                previous = []
            lines = "".join(f"{d}  {path.name}\n" for d in dict.fromkeys([file_digest(tmp), *previous]))
            # not fsynced: a second fsync per file doubled the cost of a save (scripts/bench_checksums.py); a power
            # loss that empties the sidecar leaves the file unverified, never falsely damaged (recorded_digests)
            atomic_write_bytes(checksum_path(path), lambda f: f.write(lines.encode()), False, checksum=False)
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


def repair_torn_line(path: Path) -> int:
    """Cut an append-only file (metrics.jsonl) back to its last whole line: a process killed mid-append leaves a torn
    one, which the next append would glue to its own. Returns the bytes removed."""
    path = Path(path)
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return 0
            f.seek(max(0, size - (1 << 16)))
            tail = f.read()
            if tail.endswith(b"\n"):
                return 0
            cut = tail.rfind(b"\n")
            keep = size - len(tail) + cut + 1 if cut >= 0 else (0 if size <= len(tail) else size)
            f.truncate(keep)
    except FileNotFoundError:
        return 0
    except OSError as e:
        raise WriteFailed(path, e) from e
    if size - keep:
        log.warning("%s ended in a torn line (%d bytes of a write a kill interrupted): removed", path, size - keep)
    return size - keep


def save_torch(obj: Any, path: Path) -> None:
    """`obj` must be plain data (tensors, dicts, lists, tuples, str, int, float, bool, None; not a str subclass such
    as torch.__version__) so that `load_torch` reads it back with weights_only=True."""
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


def load_torch(path: Path) -> Any:
    """Tensors and plain containers only (`weights_only=True`): a file cannot run code when it is loaded.

    torch's TorchVersion (a str) is allowed too: files written before device_info stored it as a plain str hold it."""
    import pickle

    from torch.torch_version import TorchVersion

    verify(path)
    try:
        with torch.serialization.safe_globals([TorchVersion]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, pickle.UnpicklingError):  # missing: the caller says what it is; objects: see ticket
        raise
    except IsADirectoryError:
        raise Damaged(path, "it is a directory, not a file") from None
    except Exception as e:  # a truncated or garbled archive fails in many ways
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise Damaged(path, f"unreadable, {_size(path)}: {type(e).__name__}{': ' + first if first else ''}") from e


def _size(path: Path) -> str:
    try:
        return f"{Path(path).stat().st_size} bytes"
    except OSError:
        return "size unknown"


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


def load_json(path: Path, expect: type | None = None) -> Any:
    """The JSON in `path`, its checksum verified; `expect` (dict, list): refuse anything else as damaged."""
    verify(path)
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise Damaged(path, "it is a directory, not a file") from None
    except (OSError, ValueError) as e:
        raise Damaged(path, f"unreadable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if expect is not None and not isinstance(data, expect):
        raise Damaged(path, f"it holds a {type(data).__name__}, not a {expect.__name__}")
    return data


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
            if checksum_path(self.current).exists():  # the sidecar first: a kill between leaves both vouched for
                os.replace(checksum_path(self.current), checksum_path(self.previous))
            else:
                checksum_path(self.previous).unlink(missing_ok=True)
            os.replace(self.current, self.previous)
        save_torch(state, self.current)

    def load(self) -> dict | None:
        return next(iter(self.states()), None)

    def states(self) -> list[dict]:
        """The readable checkpoints, newest first (a batched run may need the previous one to resume whole)."""
        out: list[dict] = []
        for path in (self.current, self.previous):
            if not path.exists():
                continue
            try:
                state = load_torch(path)
                if not isinstance(state, dict) or "step" not in state:
                    raise ValueError("not a lottery checkpoint")
            except Exception as e:  # noqa: BLE001 - any unreadable file means: fall back
                log.warning(
                    "checkpoint %s is unreadable (%s: %s); falling back to the previous one", path, type(e).__name__, e
                )
                continue
            if path is self.previous and not out:
                log.warning("resuming from the previous checkpoint %s", path)
            out.append(state)
        return out

    def clear(self) -> None:
        for path in (self.current, self.previous):
            path.unlink(missing_ok=True)
            checksum_path(path).unlink(missing_ok=True)
