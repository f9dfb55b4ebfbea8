"""Failures a sweep meets: tickets that are unreadable or made for another model, and a full disk (a real tmpfs where
the machine lets us mount one, and an injected ENOSPC everywhere)."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from lottery.core.files import WriteFailed, atomic_write_bytes, remove_temp_files, save_torch
from lottery.experiment import run_experiment

from conftest import TINY, run_cli, stable, tiny_cfg

WRITE_FAILED_EXIT = 74


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*.tmp*") if "wandb" not in p.parts]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# --- tickets ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ticket(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("imp") / "run"
    run_experiment(tiny_cfg("pruning.levels=2", "pruning.branches=[]", "train.duration=20it"), run_dir)
    return run_dir / "levels" / "level_1" / "ticket.pt"


def retrain(tmp_path: Path, ticket: Path, *args: str):
    out = run_cli(f"ticket={ticket}", "train.progress=false", *args, f"hydra.run.dir={tmp_path / 're'}",
                  cwd=tmp_path, entry="lottery.cli:retrain")
    return out


def assert_refused(out, tmp_path: Path, *phrases: str) -> str:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    [line] = error_lines(out.stderr)
    for phrase in phrases:
        assert phrase in line, line
    for name in ("config.yaml", "summary.json", "levels", "init.pt"):
        assert not (tmp_path / "re" / name).exists(), f"{name} written for a refused ticket"
    return line


def test_every_saved_file_loads_with_weights_only(ticket):
    run_dir = ticket.parents[2]
    files = sorted(run_dir.rglob("*.pt"))
    assert {p.name for p in files} >= {"init.pt", "rewind.pt", "final.pt", "ticket.pt"}
    for p in files:
        torch.load(p, weights_only=True)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_ticket_is_one_error_line(ticket, tmp_path, damage):
    bad = tmp_path / "bad.pt"
    data = ticket.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"this is not a ticket\n" * 200)
    line = assert_refused(retrain(tmp_path, bad), tmp_path, str(bad), "unreadable")
    assert "truncated or corrupt" in line or "corrupt" in line


def test_ticket_with_code_is_refused_not_run(ticket, tmp_path):
    """A pickle that would run a command on load: weights_only loading refuses it, the command never runs."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        torch.save({"format": "lottery-ticket", "payload": Evil()}, f, pickle_module=pickle)
    assert_refused(retrain(tmp_path, bad), tmp_path, str(bad), "weights_only")
    assert not marker.exists()


def test_ticket_for_another_model_names_both(ticket, tmp_path):
    line = assert_refused(retrain(tmp_path, ticket, "model=conv2"), tmp_path, str(ticket),
                          "made for model lenet_300_100 on synthetic 1x28x28 with layers hidden.0.weight 300x784",
                          "not for conv2 on synthetic 1x28x28 with layers convs.0.weight 64x1x3x3")
    assert len(line) < 600
    line = assert_refused(retrain(tmp_path, ticket, "dataset.synthetic_shape=cifar10"), tmp_path, str(ticket),
                          "hidden.0.weight 300x784", "not for lenet_300_100 on synthetic 3x32x32")


def test_ticket_right_model_still_retrains(ticket, tmp_path):
    out = retrain(tmp_path, ticket)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "re" / "summary.json").exists()


# --- full disk: injected ---------------------------------------------------------------------------------------------

INJECT = textwrap.dedent("""
    # Test helper: the disk fills up at the second checkpoint of the first unit (while FULL exists).
    import errno, os, sys
    from pathlib import Path

    FULL = Path(os.environ["FULL_MARKER"])
    _fsync = os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if FULL.exists() and ".checkpoint.pt.tmp" in path and Path(path).with_name("checkpoint.prev.pt").exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _fsync(fd)

    def main():
        os.fsync = fsync
        from lottery.cli import train
        train()
""")


@pytest.mark.slow
def test_injected_full_disk_one_line_no_temp_files_and_rerun_resumes(tmp_path):
    (tmp_path / "inject.py").write_text(INJECT)
    full = tmp_path / "FULL"
    full.touch()
    env = {"FULL_MARKER": str(full), "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    run_dir = tmp_path / "run"
    args = (*TINY, "pruning.levels=2", "pruning.branches=[]", f"hydra.run.dir={run_dir}")
    out = run_cli(*args, cwd=tmp_path, env=env, entry="inject:main")
    assert out.returncode == WRITE_FAILED_EXIT, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    [line] = error_lines(out.stderr)
    unit = run_dir / "levels" / "level_0" / "ticket"
    assert f"cannot write {unit / 'checkpoint.pt'}: No space left on device" in line
    assert "free space" in line and "rerun the same command to resume" in line
    assert not temp_files(run_dir)
    assert "No space left on device" in (run_dir / "error.txt").read_text()
    # the previous checkpoint is a plain weights_only file with the optimizer state
    prev = torch.load(unit / "checkpoint.prev.pt", weights_only=True)
    assert prev["step"] == 20 and prev["optimizer"]["state"]

    # a process killed mid-write leaves a temporary file: the next start removes it
    stale = run_dir / "levels" / "level_0" / ".final.pt.tmp999999"
    stale.write_bytes(b"half")
    full.unlink()  # space freed
    out = run_cli(*args, cwd=tmp_path, env=env, entry="inject:main")
    assert out.returncode == 0, out.stderr
    assert "resuming from the previous checkpoint" in (run_dir / "train.log").read_text()
    assert not stale.exists() and not temp_files(run_dir) and not (run_dir / "error.txt").exists()

    ref = tmp_path / "ref"
    run_experiment(tiny_cfg("pruning.levels=2", "pruning.branches=[]"), ref)
    assert stable(json.loads((run_dir / "summary.json").read_text())) == \
        stable(json.loads((ref / "summary.json").read_text()))


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "f.pt"
    save_torch({"a": 1}, path)

    def full(f):
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(WriteFailed, match=rf"cannot write {path}: No space left on device; free space"):
        atomic_write_bytes(path, full)
    assert torch.load(path, weights_only=True) == {"a": 1} and sorted(os.listdir(tmp_path)) == [".f.pt.sha256", "f.pt"]

    # torch.save reports a failed write as a RuntimeError whose context is the OSError: still a WriteFailed
    def torch_full(f):
        try:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        except OSError:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    with pytest.raises(WriteFailed, match="Disk quota exceeded"):
        atomic_write_bytes(path, torch_full)
    assert sorted(os.listdir(tmp_path)) == [".f.pt.sha256", "f.pt"]

    # an append that fails (metrics.jsonl) is cut back: no half line for readers or the next append
    from lottery.core.files import appending
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 0}\n')
    with pytest.raises(WriteFailed, match="metrics.jsonl: No space left on device"):
        with appending(log) as f:
            f.write('{"step": 2')
            f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert log.read_text() == '{"step": 0}\n'
    log.unlink()

    (tmp_path / ".summary.json.tmp123").write_text("x")
    (tmp_path / ".config.yaml.tmp").write_text("x")
    (tmp_path / "keep.tmp5").write_text("x")  # not hidden: not ours
    assert len(remove_temp_files(tmp_path)) == 2
    assert sorted(os.listdir(tmp_path)) == [".f.pt.sha256", "f.pt", "keep.tmp5"]


# --- full disk: a real 4 MB filesystem -------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 4 MB tmpfs here (needs root and mount rights): {r.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_real_full_disk_then_more_space_resumes(small_disk, tmp_path):
    """LeNet-300-100 with Adam: init.pt and rewind.pt (1 MB each) fit on 4 MB, the first 3 MB checkpoint does not."""
    run_dir = small_disk / "run"
    args = (*TINY, "pruning.levels=2", "pruning.branches=[]", f"hydra.run.dir={run_dir}")
    out = run_cli(*args, cwd=tmp_path)
    assert out.returncode == WRITE_FAILED_EXIT, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    [line] = error_lines(out.stderr)
    assert f"cannot write {run_dir / 'levels' / 'level_0' / 'ticket' / 'checkpoint.pt'}: No space left" in line, line
    assert not temp_files(run_dir)
    assert (run_dir / "init.pt").exists() and (run_dir / "rewind.pt").exists()

    r = subprocess.run(["mount", "-o", "remount,size=32m", str(small_disk)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = run_cli(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert [x["level"] for x in json.loads((run_dir / "summary.json").read_text())] == [0, 1]
    assert not temp_files(run_dir) and not (run_dir / "error.txt").exists()


def test_log_file_on_a_full_disk_prints_no_traceback(tmp_path, capsys):
    import errno
    import logging

    from lottery.cli import _quiet_log_file_errors

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            pass

    handler = logging.FileHandler(tmp_path / "train.log")
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        handler.stream.close()
        handler.stream = Full()
        logging.getLogger("lottery").error("a line the full disk cannot take")
        before = capsys.readouterr().err  # logging's own handling: a traceback per line
        _quiet_log_file_errors()
        logging.getLogger("lottery").error("a line the full disk cannot take")
        after = capsys.readouterr().err
        handler.stream = None  # a failure that is not the disk's still shows
        handler.format = lambda record: 1 / 0
        logging.getLogger("lottery").error("a line with a broken formatter")
        other = capsys.readouterr().err
    finally:
        root.removeHandler(handler)
    assert "Traceback" in before and "No space left" in before  # the test reaches the full-disk path
    assert after == ""  # the dropped line leaves nothing on stderr
    assert "ZeroDivisionError" in other
