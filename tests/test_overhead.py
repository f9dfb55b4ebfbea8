"""Per-unit overhead cut without giving up crash safety.

- A kill at any point between (or inside) the writes that finish a unit (final.pt, ticket.pt, result.json, the
  checkpoints' removal, summary.json) leaves a folder that the same command resumes, to the same summary.json as an
  uninterrupted run (tests/plugins/crash_writes.py kills the process at named points of its writes).
- summary.json is not fsynced after every unit (every run of the command rebuilds it from the result files) but is
  when the process leaves the folder; the files that mark progress are still fsynced before they are moved into place.
- The result files are parsed once per process, not once per unit, and what `results()` hands out is a copy.
"""
from __future__ import annotations

import json
import os
import signal

import pytest

from conftest import PLUGINS, run_cli, stable

STEPS = 60
# Two levels with a control: three units; checkpoints every 20 steps, so each unit has checkpoint files to remove
# when it finishes. One thread, as in the other resume tests.
ARGS = ["dataset=synthetic", "model=mlp", "model.hidden=[32]", "train.batch_size=32", f"train.duration={STEPS}it",
        "train.eval_every=30it", "checkpoint.every=20it", "pruning.levels=2", "pruning.branches=[reinit]",
        "train.progress=false", "device=cpu"]
ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")])}


def _train(run_dir, **env):
    """The command, with the crash points of tests/plugins/crash_writes.py (told by `env`)."""
    r = run_cli(*ARGS, "imports=[crash_writes]", f"hydra.run.dir={run_dir}", cwd=run_dir.parent,
                env={**ENV, **env})
    r.log = r.stdout + r.stderr
    return r


def _finish(unit: str, level_files: bool) -> list[str]:
    """The writes that finish one unit, in order (the level's files first for a ticket), inside and after each."""
    level = unit.rsplit("/", 1)[0]
    files = [f"{level}/final.pt", f"{level}/ticket.pt"] if level_files else []
    files += [f"{unit}/result.json", f"clear:{unit}", f"summary.json<{unit}/result.json#1"]
    return [f"{f}@{when}" for f in files for when in ("inside", "after")]


FINISHES = [*_finish("levels/level_0/ticket", True), *_finish("levels/level_1/ticket", True),
            *_finish("levels/level_1/reinit", False)]


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """One uninterrupted run (the reference), and the run folder as a kill would have left it at every point where
    the run writes or removes a file (inside and after each)."""
    tmp = tmp_path_factory.mktemp("crash")
    r = _train(tmp / "run", LOTTERY_CRASH_SNAPSHOTS=str(tmp / "snapshots"))
    assert r.returncode == 0, r.log
    points = (tmp / "snapshots" / "points.txt").read_text().split()
    return (json.loads((tmp / "run" / "summary.json").read_text()),
            [(p, tmp / "snapshots" / f"{i:03d}") for i, p in enumerate(points)])


@pytest.mark.slow
def test_the_points_include_every_write_of_a_units_finish(snapshots):
    _, points = snapshots
    names = [p for p, _ in points]
    assert [p for p in names if p in FINISHES] == FINISHES
    assert {"config.yaml@inside", "init.pt@after", "levels/level_1/reinit/checkpoint.pt@inside",
            "summary.json<levels/level_1/reinit/result.json#2@inside"} <= set(names)  # the run's last summary too
    assert len(names) == len(set(names)) > 40


@pytest.mark.slow  # 40-odd resumes; the fast lane resumes three kills through the command below
def test_a_kill_at_any_point_leaves_a_folder_that_resumes_to_the_same_summary(snapshots):
    """Each point's folder resumed as the rerun command would (in this process: run_experiment, the command's body,
    for speed; test_rerunning_the_command_after_kills below goes through the command line)."""
    from conftest import make_cfg
    from lottery.experiment import run_experiment
    reference, points = snapshots
    cfg = make_cfg(*ARGS)
    for point, folder in points:
        summary = run_experiment(cfg, folder)
        assert stable(summary) == stable(reference), point
        assert stable(json.loads((folder / "summary.json").read_text())) == stable(reference), point
        assert not [p for p in folder.rglob(".*.tmp*")], f"{point}: temporary files are removed"
        assert not list(folder.glob("levels/**/checkpoint*.pt")), f"{point}: a finished unit keeps no checkpoint"
        for path in folder.glob("levels/**/result.json"):
            json.loads(path.read_text())


@pytest.mark.slow
def test_rerunning_the_command_after_kills_resumes_to_the_same_summary(snapshots, tmp_path):
    """SIGKILLs inside a ticket's write, right after a result.json (before its checkpoints are removed and the
    summary rewritten) and in the middle of removing a control's checkpoints; each time the same command again."""
    reference, _ = snapshots
    run_dir, markers = tmp_path / "run", tmp_path / "markers"
    kills = ["levels/level_1/ticket.pt@inside", "levels/level_1/ticket/result.json@after",
             "clear:levels/level_1/reinit@inside"]
    env = {"LOTTERY_CRASH": ";".join(kills), "LOTTERY_CRASH_MARKERS": str(markers)}
    for n in range(len(kills)):
        r = _train(run_dir, **env)
        assert r.returncode == -signal.SIGKILL, r.log
        assert len(list(markers.iterdir())) == n + 1, r.log
    r = _train(run_dir, **env)
    assert r.returncode == 0, r.log
    assert stable(json.loads((run_dir / "summary.json").read_text())) == stable(reference)
    assert not list(run_dir.glob("levels/**/checkpoint*.pt"))
    assert "removed 1 temporary file(s) of an unfinished write" in (run_dir / "train.log").read_text()


# --- fsync: which writes, and when ------------------------------------------------------------------------------

def test_summary_is_fsynced_once_when_the_folder_is_left_and_results_at_once(tmp_path, monkeypatch):
    import lottery.core.files as files
    from lottery.experiment.folder import RunFolder
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)
    monkeypatch.setattr(files.os, "fsync", fsync)
    folder = RunFolder(tmp_path / "run")
    with folder.lock():
        for level in range(3):
            folder.save_result(level, "ticket", {"level": level, "branch": "ticket", "evals": [{"step": 0}]})
            folder.write_summary()
        names = [os.path.basename(p).split(".tmp")[0].lstrip(".") for p in synced]
        assert names == ["result.json"] * 3, "each result is durable before it is moved into place; the summary not"
    assert [os.path.basename(p) for p in synced[3:]] == ["summary.json"], "the last summary once, on leaving"
    assert json.loads(folder.summary.read_text()) == [{"level": lv, "branch": "ticket"} for lv in range(3)]


def test_summary_is_fsynced_when_the_run_fails_too(tmp_path, monkeypatch):
    import lottery.core.files as files
    from lottery.experiment.folder import RunFolder
    synced = []
    monkeypatch.setattr(files.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")))
    folder = RunFolder(tmp_path / "run")
    with pytest.raises(KeyError):
        with folder.lock():
            folder.save_result(0, "ticket", {"level": 0, "branch": "ticket"})
            folder.write_summary()
            raise KeyError("the run failed")
    assert os.path.basename(synced[-1]) == "summary.json"


# --- result records: read once, handed out as copies ------------------------------------------------------------

def test_results_are_parsed_once_per_process_and_handed_out_as_copies(tmp_path, monkeypatch):
    import lottery.experiment.folder as folder_mod
    from lottery.experiment.folder import RunFolder
    folder = RunFolder(tmp_path / "run")
    for level in range(4):
        folder.save_result(level, "ticket", {"level": level, "branch": "ticket", "layer_density": {"w": 0.5},
                                             "evals": [{"step": 0, "val_loss": 1.0}]})
    other = RunFolder(tmp_path / "run")  # another process's view: nothing cached
    reads = []
    real = folder_mod.load_json
    monkeypatch.setattr(folder_mod, "load_json", lambda p: reads.append(p) or real(p))
    assert folder.results() == other.results()
    assert reads and all(str(p).startswith(str(tmp_path)) for p in reads)
    n = len(reads)
    assert n == 4, "the other view read each file once; this one had them from its own writes"
    for _ in range(5):
        other.results()
    assert len(reads) == n, "read once per process, not once per summary"

    got = folder.results()
    got[0]["layer_density"]["w"] = 99.0
    got[0]["level"] = 7
    assert folder.results()[0] == {"level": 0, "branch": "ticket", "layer_density": {"w": 0.5}}
    full = folder.load_result(0, "ticket")
    full["evals"].append({"step": 1})
    assert folder.load_result(0, "ticket")["evals"] == [{"step": 0, "val_loss": 1.0}]


def test_a_result_changed_on_disk_is_read_again(tmp_path):
    from lottery.experiment.folder import RunFolder
    folder = RunFolder(tmp_path / "run")
    folder.save_result(0, "ticket", {"level": 0, "branch": "ticket", "test_accuracy": 0.5})
    assert folder.results()[0]["test_accuracy"] == 0.5
    path = folder.unit_dir(0, "ticket") / "result.json"
    # rewritten by the run (a resumed unit): the cache sees the new file
    folder.save_result(0, "ticket", {"level": 0, "branch": "ticket", "test_accuracy": 0.75, "extra": 1})
    assert folder.results()[0]["test_accuracy"] == 0.75
    # changed by anything else: its checksum no longer matches, and the file is named, not read from the cache
    path.write_text(json.dumps({"level": 0, "branch": "ticket", "test_accuracy": 0.9}))
    with pytest.raises(ValueError, match="result.json is damaged"):
        folder.results()
    path.write_text("{trunc")
    with pytest.raises(ValueError, match="result.json is damaged"):
        folder.load_result(0, "ticket")
