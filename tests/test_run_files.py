"""Checksummed run folders (issue 28): every file a run writes whole and reads again carries a checksum recorded when
it was written; a resume verifies the folder before it writes anything and names a damaged file in one line with the
remedy. In process: one small run is trained once, and each case damages a copy of it."""
from __future__ import annotations

import logging
import os
import shutil

import pytest

from lottery.core.files import CHECKSUM_SUFFIX, Damaged, checksum_path, load_json, repair_torn_line, save_json, verify
from lottery.experiment import run_experiment
from lottery.experiment.folder import FolderRefused

from conftest import tiny_cfg

ARGS = ("pruning.levels=3", "train.duration=20it", "pruning.rewind=2it", "train.eval_every=10it")


def cfg():
    return tiny_cfg(*ARGS)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run whose last level is still to train (as after a kill between levels)."""
    run = tmp_path_factory.mktemp("orig") / "run"
    run_experiment(cfg(), run)
    shutil.rmtree(run / "levels" / "level_2")
    return run


@pytest.fixture
def run(interrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    return out


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def flip(rel):
    def damage(run):
        p = run / rel
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 1
        p.write_bytes(bytes(data))
    return damage


def truncate(rel):
    return lambda run: os.truncate(run / rel, (run / rel).stat().st_size // 2)


LEVEL_1 = "delete the level's folder {run}/levels/level_1 and rerun the same command to train that level again"
ELSEWHERE = "restore it from a copy, or rerun the command with a new folder (hydra.run.dir=...)"
CASES = {
    "a changed byte in a kept weight of final.pt": (flip("levels/level_1/final.pt"), Damaged,
                                                    "levels/level_1/final.pt is damaged (its bytes differ", LEVEL_1),
    "truncated final.pt": (truncate("levels/level_1/final.pt"), Damaged, "levels/level_1/final.pt is damaged", LEVEL_1),
    "truncated rewind.pt": (truncate("rewind.pt"), Damaged, "/rewind.pt is damaged", ELSEWHERE),
    "truncated init.pt": (truncate("init.pt"), Damaged, "/init.pt is damaged", ELSEWHERE),
    "a changed ticket.pt": (flip("levels/level_1/ticket.pt"), Damaged, "levels/level_1/ticket.pt is damaged",
                            LEVEL_1),
    "deleted ticket.pt": (lambda run: (run / "levels/level_1/ticket.pt").unlink(), Damaged,
                          "levels/level_1/ticket.pt is damaged (missing, although level_1 is recorded as done)",
                          LEVEL_1),
    "a changed result.json": (flip("levels/level_1/ticket/result.json"), Damaged,
                              "levels/level_1/ticket/result.json is damaged",
                              "delete the unit's folder {run}/levels/level_1/ticket and rerun the same command"),
    "device.json replaced by a list": (lambda run: (run / "device.json").write_text("[1, 2]"), Damaged,
                                       "device.json is damaged", "delete it to resume without comparing"),
    "levels replaced by a file": (lambda run: (shutil.rmtree(run / "levels"), (run / "levels").write_text("x")),
                                  Damaged, "/levels is damaged (a file where the run keeps a folder)", ELSEWHERE),
    "train.log a directory": (lambda run: (run / "train.log").mkdir(), Damaged,
                              "/train.log is damaged (a folder where the run keeps a file)", "remove it: the run "
                              "writes its log there again"),
    "an empty config.yaml": (lambda run: (run / "config.yaml").write_text(""), FolderRefused,
                             "config.yaml is damaged", ELSEWHERE),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_damaged_file_is_named_with_its_remedy_before_anything_is_written(run, case):
    damage, kind, names, remedy = CASES[case]
    damage(run)
    before = snapshot(run)
    with pytest.raises(kind) as e:
        run_experiment(cfg(), run)
    message = str(e.value)
    assert "\n" not in message
    assert names in message and remedy.format(run=run) in message, message
    assert {k: v for k, v in snapshot(run).items() if k != ".lock"} == \
        {k: v for k, v in before.items() if k != ".lock"}


@pytest.mark.parametrize("damaged,remove", [("levels/level_1/final.pt", "levels/level_1"),
                                            ("levels/level_1/ticket/result.json", "levels/level_1/ticket")])
def test_the_remedy_works(run, damaged, remove):
    flip(damaged)(run)
    with pytest.raises(Damaged):
        run_experiment(cfg(), run)
    shutil.rmtree(run / remove)
    run_experiment(cfg(), run)
    assert (run / "levels/level_2/ticket/result.json").is_file()
    assert verify(run / damaged)


def test_every_checksummed_file_of_a_run_is_verified_on_resume(interrupted, tmp_path):
    """Whatever file carries a checksum (checkpoints aside, which fall back to the previous one), a changed byte in it
    is named: a file added to the run later is covered without a new case."""
    files = sorted(str(s.relative_to(interrupted).with_name(s.name[1:-len(CHECKSUM_SUFFIX)]))
                   for s in interrupted.rglob(f".*{CHECKSUM_SUFFIX}") if "checkpoint" not in s.name)
    assert {"config.yaml", "device.json", "init.pt", "rewind.pt", "levels/level_0/final.pt",
            "levels/level_1/ticket.pt", "levels/level_1/ticket/result.json"} <= set(files)
    for i, rel in enumerate(files):
        run = tmp_path / f"run{i}"
        shutil.copytree(interrupted, run)
        flip(rel)(run)
        with pytest.raises(ValueError, match="is damaged") as e:
            run_experiment(cfg(), run)
        assert rel in str(e.value)


def test_a_folder_written_before_checksums_resumes_unverified_said_once(run, caplog):
    for sidecar in run.rglob(f".*{CHECKSUM_SUFFIX}"):
        sidecar.unlink()
    import lottery.core.files as files
    files._UNVERIFIED_SAID.clear()
    with caplog.at_level(logging.WARNING):
        run_experiment(cfg(), run)
    said = [r for r in caplog.records if "has no checksum" in r.getMessage()]
    assert len(said) == 1
    assert (run / "levels/level_2/ticket/result.json").is_file()
    assert verify(run / "levels/level_2/final.pt")  # what this start wrote carries its checksum


def test_a_torn_last_line_of_metrics_is_repaired_on_resume(run):
    metrics = run / "metrics.jsonl"
    whole = metrics.read_bytes()
    metrics.write_bytes(whole + b'{"level": 2, "step": 1')
    run_experiment(cfg(), run)
    import json
    lines = metrics.read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    assert metrics.read_bytes().startswith(whole)


def test_repair_torn_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"a\nb\nc")
    assert repair_torn_line(path) == 1 and path.read_bytes() == b"a\nb\n"
    assert repair_torn_line(path) == 0
    path.write_bytes(b"torn")
    assert repair_torn_line(path) == 4 and path.read_bytes() == b""


def test_a_kill_between_the_checksum_and_the_file_leaves_a_file_that_verifies(tmp_path):
    """The sidecar is written before the file moves into place and vouches for the old file too."""
    path = tmp_path / "x.json"
    save_json({"a": 1}, path)
    old = path.read_bytes()
    save_json({"a": 2}, path)
    path.write_bytes(old)  # as if the move of the new file never happened
    assert verify(path)
    path.write_bytes(b'{"a": 3}')
    with pytest.raises(Damaged):
        load_json(path)
    assert checksum_path(path).name == ".x.json.sha256"


# --- lottery-retrain: a ticket is checked whole before anything is written --------------------------------------

def _edited_ticket(interrupted, tmp_path, edit):
    import torch
    data = torch.load(interrupted / "levels/level_1/ticket.pt", weights_only=True)
    edit(data)
    path = tmp_path / "ticket.pt"
    torch.save(data, path)
    return path


RETRAIN_CASES = {
    "a negative rewind step": (lambda d: d.update(rewind_step=-5), (),
                               "has rewind_step=-5; accepted: an integer >= 0"),
    "masks for 1 of 3 layers": (lambda d: d.update(masks={k: v for k, v in list(d["masks"].items())[:1]}), (),
                                "has masks for 1 of the 3 pruned tensors of lenet_300_100 (none for hidden.1.weight, "
                                "out.weight)"),
    "a synthetic ticket retrained on mnist": (lambda d: None, ("dataset=mnist",),
                                              "was made on dataset synthetic, not mnist; a ticket is retrained on "
                                              "its own dataset"),
}


@pytest.mark.parametrize("case", sorted(RETRAIN_CASES))
def test_a_bad_ticket_is_refused_before_anything_is_written(interrupted, tmp_path, case):
    from lottery.experiment import retrain_ticket
    edit, overrides, message = RETRAIN_CASES[case]
    ticket = _edited_ticket(interrupted, tmp_path, edit)
    out = tmp_path / "retrain"
    with pytest.raises(ValueError) as e:
        retrain_ticket(tiny_cfg(*ARGS, *overrides, "dataset.root=../shared/data"), ticket, out)
    assert "\n" not in str(e.value) and message in str(e.value), str(e.value)
    assert not out.exists()


def test_resuming_replicas_batched_another_way_warns(tmp_path, caplog):
    """Replicas stacked, interleaved or sequential round off differently: as a change of the thread count, a resume
    another way is said (device.json records the way)."""
    args = ("pruning=none", "train.duration=4it", "train.eval_every=4it", "replicas=2")
    run = tmp_path / "run"
    run_experiment(tiny_cfg(*args, "replica_batching=sequential"), run)
    assert load_json(run / "replicate_0" / "device.json")["batching"] == "sequential"
    with caplog.at_level(logging.WARNING):
        run_experiment(tiny_cfg(*args, "replica_batching=interleaved"), run)
    said = [r.getMessage() for r in caplog.records if "differs in batching" in r.getMessage()]
    assert said and "replicas sequential" in said[0] and "replicas interleaved" in said[0], said
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_experiment(tiny_cfg(*args, "replica_batching=interleaved"), run)
    assert not [r for r in caplog.records if "differs in" in r.getMessage()]


# --- a disk full (or out of inodes) when the run records Hydra's files: one line, exit 74 -------------------------

INJECT_HYDRA = """
import builtins, errno, os, pathlib, sys
WHAT = os.environ["FULL_AT"]
_open, _mkdir = builtins.open, pathlib.Path.mkdir

def full_open(file, mode="r", *args, **kwargs):
    if WHAT == "write" and "/.hydra/" in str(file) and any(c in mode for c in "wax"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _open(file, mode, *args, **kwargs)

def full_mkdir(self, *args, **kwargs):
    if WHAT == "mkdir" and self.name == ".hydra":  # no inode left for a new folder
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _mkdir(self, *args, **kwargs)

def main():
    builtins.open, pathlib.Path.mkdir = full_open, full_mkdir
    from lottery.cli import train
    train()
"""


@pytest.mark.parametrize("where", ["mkdir", "write"])
@pytest.mark.slow
def test_a_full_disk_before_hydra_files_are_written_is_one_line_and_exit_74(tmp_path, where):
    from conftest import TINY, run_cli
    (tmp_path / "inject_hydra.py").write_text(INJECT_HYDRA)
    env = {"FULL_AT": where, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    run = tmp_path / "run"
    r = run_cli(*TINY, "pruning=none", "train.duration=4it", f"hydra.run.dir={run}", cwd=tmp_path, env=env,
                entry="inject_hydra:main")
    assert r.returncode == 74, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "/.hydra" in errors[0] and "No space left on device" in errors[0], r.stderr
    assert not (run / ".hydra" / "config.yaml").exists()  # no empty file left behind


# --- lottery-report where it cannot write: one line suggesting --out ----------------------------------------------

def test_report_on_a_folder_it_cannot_write_is_one_line_suggesting_out(interrupted, tmp_path, monkeypatch, capsys):
    import errno
    import subprocess

    import lottery.report as report
    real = report.write_table

    def read_only(rows, path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(report, "write_table", read_only)
    assert report.main([str(interrupted)]) == 74
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: cannot write the report to {interrupted}/report/runs.csv: "
                                                   f"Permission denied; choose a folder you can write with --out DIR")
    monkeypatch.setattr(report, "write_table", real)
    # the same for real where the machine lets root make a folder immutable
    locked = tmp_path / "locked"
    shutil.copytree(interrupted, locked)
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode:
        return
    try:
        assert report.main([str(locked)]) == 74
        assert "choose a folder you can write with --out DIR" in capsys.readouterr().err
        assert report.main([str(locked), "--out", str(tmp_path / "elsewhere")]) == 0
    finally:
        subprocess.run(["chattr", "-i", str(locked)], capture_output=True)


# --- runs started in the same second without a folder name ----------------------------------------------------------

@pytest.mark.slow
def test_runs_started_together_without_a_folder_name_never_share_one(tmp_path):
    """Three `lottery-train seed=$s &` name their folder by the second they start (hydra.run.dir's default): those
    that land in the same second meet at its lock, one runs and the others are refused in one line, writing nothing;
    none ever trains into another's folder."""
    import subprocess
    import sys

    from conftest import TINY
    code = "import sys; sys.argv[0] = 'train'; from lottery.cli import train; train()"
    procs = [subprocess.Popen([sys.executable, "-c", code, *TINY, "pruning=none", "train.duration=20it", f"seed={s}"],
                              cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for s in (1, 2, 3)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    ran = [code for code, _ in results if code == 0]
    refused = [err for code, err in results if code == 2]
    assert len(ran) + len(refused) == 3, results
    for err in refused:
        # the same second: the lock (or, had the first already ended, its different seed) refuses it
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert "another process is running in" in err or "already holds a different experiment" in err, err
    folders = sorted((tmp_path / "runs" / "default").iterdir())
    assert len(folders) == len(ran)  # a refused process made no folder of its own and wrote none into the others
    import yaml
    seeds = [yaml.safe_load((f / "config.yaml").read_text())["seed"] for f in folders]
    assert len(set(seeds)) == len(seeds)
