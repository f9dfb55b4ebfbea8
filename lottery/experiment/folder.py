"""The run folder: every path of a run is built here, and so are its lock, the check that a folder holds the same
experiment on resume, its results and its tickets.

    config.yaml                 resolved config (the experiment this folder holds)
    summary.json                one record per (level, branch); rewritten atomically after every unit (from the
                                result.json files, each read once per process; fsynced when the process leaves the
                                folder: every run of the command rebuilds it; see lottery.core.files)
    metrics.jsonl               every evaluation and training-loss log, tagged with level and branch
    init.pt, rewind.pt          weights at initialization and at the rewind point (saved once)
    states/step_<k>.pt          full state of level 0 at other steps a branch starts from (lmc's steps; saved once)
    levels/level_<L>/ticket.pt  masks + rewind weights + config + metrics (lottery.experiment.ticket), written once per
                                level
    levels/level_<L>/final.pt   trained weights of the level's ticket (what the next level prunes)
    levels/level_<L>/<branch>/result.json            the branch's record (+ evaluation curve of a one-unit branch,
                                                     or an analysis's `curves`)
    levels/level_<L>/<branch>/<unit>/result.json     units of a branch that trains several (e.g. two copies)
    .../checkpoint.pt, checkpoint.prev.pt            while a unit trains

A unit with a result is never trained again, so a rerun of the same command (or a SLURM requeue) continues where the
last one stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from omegaconf import OmegaConf

from lottery.config import EXTENDING_KEYS, non_experiment
from lottery.core.files import (
    CHECKSUM_SUFFIX,
    Checkpoints,
    Damaged,
    WriteFailed,
    checksum_path,
    fsync_file,
    load_json,
    remove_temp_files,
    save_json,
    verify,
    write_text,
)
from lottery.core.registry import as_dict
from lottery.experiment.records import without_details
from lottery.experiment.ticket import Ticket, load_ticket, save_ticket

log = logging.getLogger(__name__)


class FolderRefused(ValueError):
    """This process may not use the folder: another process holds it, or it holds another experiment (or a single run
    where replicas were asked for, or the reverse). Nothing is written there."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):  # an empty node has no leaf: {} and a missing node compare equal
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


_MISSING = object()


def _signature(path: Path) -> tuple:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _copy(value):
    """A copy of a JSON value (dicts, lists, scalars), so callers may change what they get."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _defaults(new: dict) -> dict:
    """Flattened defaults of every key `new` may hold: the schema's, and those of the registered settings of its
    dataset, optimizer, criterion and branches."""

    from lottery.branches import BRANCHES
    from lottery.config import Config
    from lottery.data import DATASETS
    from lottery.pruning import CRITERIA
    from lottery.training import OPTIMIZERS

    out = _flatten(as_dict(OmegaConf.structured(Config)))
    nodes = [
        ("dataset", DATASETS, (new.get("dataset") or {}).get("name")),
        ("optimizer", OPTIMIZERS, (new.get("optimizer") or {}).get("name")),
        ("pruning.criterion", CRITERIA, ((new.get("pruning") or {}).get("criterion") or {}).get("name")),
        *[(f"branch.{b}", BRANCHES, b) for b in (new.get("pruning") or {}).get("branches") or []],
    ]
    for prefix, registry, name in nodes:
        settings = getattr(registry.get(name), "settings", None)
        if settings is not None:
            values = as_dict(OmegaConf.structured(settings))
            out.update({f"{prefix}.{k}": v for k, v in _flatten(values).items()})
    return out


def differences(old: dict, new: dict) -> list[str]:
    """Keys whose values differ and that define the experiment (config.NON_EXPERIMENT_KEYS do not).

    A key that the old config lacks because it was added to lottery later is no difference while it keeps its
    schema default, and neither are the settings of branches the run does not list: a folder written by an older
    version resumes unless a new option is actually used (a new setting of a criterion, too). A key only the old config
    has is one the new version no longer reads (new configs record every setting of the dataset, optimizer and
    criterion they use, defaults included), so it is no difference either."""
    a, b = _flatten(old), _flatten(new)
    defaults = _defaults(new)
    listed = {*((old.get("pruning") or {}).get("branches") or []), *((new.get("pruning") or {}).get("branches") or [])}
    out = []
    for k in set(a) | set(b):
        if non_experiment(k) or a.get(k, _MISSING) == b.get(k, _MISSING):
            continue
        if k.startswith("branch.") and k.split(".")[1] not in listed:
            continue  # settings of a branch the run does not use change none of its results
        if k not in b:
            continue
        if k not in a and k in defaults and b[k] == defaults[k]:
            continue
        out.append(k)
    return sorted(out)


class RunFolder:
    def __init__(self, path):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.summary = self.path / "summary.json"
        self.metrics = self.path / "metrics.jsonl"
        self.init = self.path / "init.pt"
        self.rewind = self.path / "rewind.pt"
        # result.json files as read or written by this process: path -> ((inode, size, mtime), record). Only the
        # process holding the lock writes them, so a file is parsed once per process instead of once per unit
        # (summary.json is rebuilt from every record after every unit); a file changed since is read again.
        self._records: dict[Path, tuple[tuple, object]] = {}
        self._summary_unsynced = False

    # --- paths -------------------------------------------------------------------------------------------------
    def level_dir(self, level: int) -> Path:
        return self.path / "levels" / f"level_{level}"

    def ticket_path(self, level: int) -> Path:
        return self.level_dir(level) / "ticket.pt"

    def final_path(self, level: int) -> Path:
        return self.level_dir(level) / "final.pt"

    def state_path(self, step: int) -> Path:
        return self.path / "states" / f"step_{step}.pt"

    def unit_dir(self, level: int, branch: str, unit: str = "") -> Path:
        d = self.level_dir(level) / branch
        return d / unit if unit else d

    def checkpoints(self, level: int, branch: str, unit: str = "") -> Checkpoints:
        return Checkpoints(self.unit_dir(level, branch, unit))

    # --- results -----------------------------------------------------------------------------------------------
    def done(self, level: int, branch: str, unit: str = "") -> bool:
        return (self.unit_dir(level, branch, unit) / "result.json").exists()

    def save_result(self, level: int, branch: str, record: dict, unit: str = "") -> None:
        path = self.unit_dir(level, branch, unit) / "result.json"
        data = save_json(record, path)  # durable: it marks the unit as done
        with contextlib.suppress(OSError, ValueError):
            self._records[path] = (_signature(path), json.loads(data))  # exactly what reading the file gives

    def _read(self, path: Path):
        signature = _signature(path)
        known = self._records.get(path)
        if known is not None and known[0] == signature:
            return known[1]
        record = load_json(path)
        self._records[path] = (signature, record)
        return record

    def load_result(self, level: int, branch: str, unit: str = "") -> dict:
        return _copy(self._result(self.unit_dir(level, branch, unit) / "result.json"))

    def _result(self, path: Path) -> dict:
        """The record in `path` (shared with the cache: copy before handing it out)."""
        try:
            record = self._read(path)
        except Damaged:
            raise
        except (OSError, ValueError) as e:
            raise ValueError(
                f"{path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e}), "
                f"so this unit cannot be counted as done; delete that file (and its folder's other "
                f"files) and rerun the same command to train the unit again"
            ) from None
        if not isinstance(record, dict):
            raise ValueError(
                f"{path} holds no result record; delete it and rerun the same command to train the unit again"
            )
        return record

    def results(self) -> list[dict]:
        """Every branch record, by level, the ticket first, then the branches by name (evaluation curves left out)."""
        paths = sorted(
            self.path.glob("levels/level_*/*/result.json"),
            key=lambda p: (int(p.parent.parent.name.split("_")[1]), p.parent.name != "ticket", p.parent.name),
        )
        return [_copy(without_details(self._result(p))) for p in paths]

    def write_summary(self) -> list[dict]:
        """Rewrite summary.json from the result files. Not fsynced here: the next run of the command rebuilds it from
        them, and `sync` (when the process leaves the folder) makes the last one durable."""
        summary = self.results()
        save_json(summary, self.summary, durable=False)
        self._summary_unsynced = True
        return summary

    def sync(self) -> None:
        """fsync what was written without it (summary.json)."""
        if self._summary_unsynced:
            fsync_file(self.summary)
            self._summary_unsynced = False

    # --- tickets -----------------------------------------------------------------------------------------------
    def has_ticket(self, level: int) -> bool:
        return self.ticket_path(level).exists()

    def save_ticket(self, ticket: Ticket) -> Path:
        path = self.ticket_path(ticket.level)
        save_ticket(path, ticket)
        return path

    def load_ticket(self, level: int) -> Ticket:
        return load_ticket(self.ticket_path(level))

    # --- ownership and identity --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self):
        """One process per run folder: a resubmitted job must not train into a folder its twin is still using. The
        lock file is opened without writing to it, so a refused process leaves the folder as it was; one that fails
        before writing anything takes its lock file (and the folder, if it made it) away again."""
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            f = open(self.path / ".lock", "a")  # noqa: SIM115 - closed by `with f:` below; an OSError here is WriteFailed
        except OSError as e:
            raise WriteFailed(self.path / ".lock", e) from e
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FolderRefused(
                    f"another process is running in {self.path} (it holds {self.path / '.lock'}); "
                    f"wait for it to end or choose another folder with hydra.run.dir=..."
                ) from None
            try:
                yield self
            except BaseException:
                with contextlib.suppress(OSError):  # the error that ended the run is the one to report
                    self.sync()
                    if os.listdir(self.path) == [".lock"]:  # nothing written: leave nothing behind
                        (self.path / ".lock").unlink()
                        if created:
                            self.path.rmdir()
                raise
            else:
                self.sync()
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def clean(self) -> None:
        """Remove what a killed or failed process left behind: the temporary files of writes that never finished,
        and the checkpoints of units that have their result (a kill between a unit's result.json and the removal of
        its checkpoints; a finished unit is never trained again, so they would stay forever). Only once this process
        owns the folder: lock held, same experiment."""
        remove_temp_files(self.path)
        stale = [
            p
            for result in self.path.glob("levels/**/result.json")
            for p in (result.parent / "checkpoint.pt", result.parent / "checkpoint.prev.pt")
            if p.exists()
        ]
        for p in stale:
            with contextlib.suppress(OSError):
                p.unlink()
                checksum_path(p).unlink(missing_ok=True)
        if stale:
            log.info(
                "removed %d checkpoint file(s) of finished units: %s", len(stale), ", ".join(str(p) for p in stale)
            )

    def holds_replicas(self) -> bool:
        return (self.path / "replicas.json").exists()

    def check_config(self, resolved: dict, extends: Callable[[dict], str | None] | None = None) -> bool:
        """Refuse (ValueError naming the differing keys) if the folder holds another experiment; True if it holds
        this one (a resume). A config that differs only in keys that add work (config.EXTENDING_KEYS: more levels, a
        later target) is this experiment extended when `extends(old config)` finds no reason (returned as a string)
        against it. Reads only."""
        if not self.config.exists():
            return False
        try:
            verify(self.config)
        except ValueError as e:
            raise FolderRefused(str(e)) from None
        try:
            old = OmegaConf.to_container(OmegaConf.load(self.config), resolve=True)
            if not isinstance(old, dict) or not old:
                raise ValueError("empty, or not a config")
        except Exception as e:  # noqa: BLE001 - a truncated or garbled file: the folder's experiment is unknown
            raise FolderRefused(
                f"{self.config} is unreadable ({type(e).__name__}: {str(e).splitlines()[0]}), so "
                f"what this folder holds is unknown; choose another folder with hydra.run.dir=..., "
                f"or restore the file"
            ) from None
        diff = differences(old, resolved)
        why = ""
        if diff and extends is not None and set(diff) <= set(EXTENDING_KEYS):
            reason = extends(old)
            if reason is None:
                return True
            why = f": {reason}"
        if diff:
            raise FolderRefused(
                f"run folder {self.path} already holds a different experiment (differs in: "
                f"{', '.join(diff)}{why}); refusing to overwrite it. Choose another folder with "
                f"hydra.run.dir=... or rerun with the same settings to resume it"
            )
        return True

    def check_files(self) -> None:
        """A folder being resumed: every file with a recorded checksum still has its bytes (checkpoints aside: an
        unreadable one falls back to the previous), the folders are folders, and every level counted as done has
        its ticket and trained weights. Raises Damaged naming the first bad file and the remedy. Reads only."""
        for name in ("levels", "states"):
            if (self.path / name).exists() and not (self.path / name).is_dir():
                raise Damaged(self.path / name, "a file where the run keeps a folder")
        for name in ("train.log", "metrics.jsonl", "summary.json", "device.json", "replicas.json"):
            if (self.path / name).is_dir():  # the log would be dropped line by line, the others fail when written
                raise Damaged(self.path / name, "a folder where the run keeps a file")
        for sidecar in sorted(self.path.rglob(f".*{CHECKSUM_SUFFIX}")):
            if {"wandb", ".hydra"} & set(sidecar.relative_to(self.path).parts):
                continue  # not read back by the run (.hydra/ is rewritten by every start)
            path = sidecar.with_name(sidecar.name[1 : -len(CHECKSUM_SUFFIX)])
            if path.name.startswith("checkpoint") or not path.exists():
                continue  # a checkpoint falls back; a file removed on purpose is recomputed where it can be
            verify(path)
        for done in sorted(self.path.glob("levels/level_*/ticket/result.json")):
            if self._result(done).get("diverged"):
                continue  # a diverged level keeps no weights to prune from
            level_dir = done.parent.parent
            for name in ("ticket.pt", "final.pt"):
                if not (level_dir / name).is_file():
                    raise Damaged(level_dir / name, f"missing, although {level_dir.name} is recorded as done")

    def write_config(self, resolved: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_text(self.config, OmegaConf.to_yaml(OmegaConf.create(resolved)))
