"""Every check before the first write, one experiment per folder, no result that is silently wrong (issue 20).

Driven through the command line as a hurried researcher would: each known bad value fails with one `error:` line and
exit status 2 before anything of a run is written, and the corrected command then runs in the same folder; a refused
process leaves the folder it does not own exactly as it was; replicas and single runs never mix in one folder; broken
files and read-only folders are one line each; what would be silently wrong (GraSP asked for more examples than there
are, lmc levels the run lacks, a layer pruned away, a run that learns nothing, a diverged replicate) is named.
"""
from __future__ import annotations

import fcntl
import json
import math
import shutil
import signal
import subprocess

import pytest
import torch

from lottery.core import signals
from lottery.core.divergence import Diverged
from lottery.core.signals import Preempted
from lottery.experiment import run_experiment, session, units

from conftest import DATA, TINY, needs_data, run_cli, tiny_cfg

ENV = {"OMP_NUM_THREADS": "1"}
RUN_FILES = ("config.yaml", "device.json", "init.pt", "rewind.pt", "summary.json", "replicas.json", "metrics.jsonl")


def cli(run_dir, *args, env=None):
    r = run_cli(*TINY, *args, f"hydra.run.dir={run_dir}", cwd=run_dir.parent, env={**ENV, **(env or {})})
    r.log = r.stdout + r.stderr
    r.errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    return r


def snapshot(folder) -> dict:
    """Every file below `folder` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1. every check before the first write ---------------------------------------------------------------------------

BAD_THEN_FIXED = {
    "rewind after the end of training": (["pruning.rewind=100it"], ["pruning.rewind=10it"], "pruning.rewind=100it"),
    "lmc step after the end of training": (["pruning.branches=[lmc]", "branch.lmc.steps=[500]"],
                                           ["pruning.branches=[lmc]", "branch.lmc.steps=[20]"],
                                           "branch 'lmc' starts from step 500, outside training"),
    "batch larger than the training set": (["train.batch_size=5000"], ["train.batch_size=32"],
                                           "train.batch_size must be in [1, 896]"),
    "a criterion's own setting": (["criterion=snip", "pruning.criterion.num_batches=0"],
                                  ["criterion=snip", "pruning.criterion.num_batches=1"],
                                  "pruning.criterion.num_batches must be >= 1, got 0"),
    "a target that empties a layer": (["pruning.target=0.0001", "pruning.one_shot=true"],
                                      ["pruning.target=0.05", "pruning.one_shot=true"],
                                      "layerwise pruning to 0.0101% of the weights (level 1) would remove every weight "
                                      "of 'out.weight'"),
    "a seed out of range": (["seed=99999999999999999999"], ["seed=9"],
                            "seed must be in [-9223372036854775808, 9223372036854775807], got 99999999999999999999"),
    "GraSP asked for more examples per class than there are": (
        ["method=grasp", "pruning.target=0.1", "pruning.one_shot=true", "pruning.criterion.samples_per_class=500"],
        ["method=grasp", "pruning.target=0.1", "pruning.one_shot=true", "pruning.criterion.samples_per_class=5"],
        "grasp: pruning.criterion.samples_per_class=500, but the training split has only"),
    "lmc levels the run does not have": (["pruning.branches=[lmc]", "branch.lmc.levels=[5]"],
                                         ["pruning.branches=[lmc]", "branch.lmc.levels=[1]"],
                                         "branch.lmc.levels names level 5, which this run does not have (it trains "
                                         "levels 0, 1)"),
    "a bad setting of a feature not in use": (["replica_batching=bogus"], ["replica_batching=auto"],
                                              "unknown replica_batching 'bogus'; accepted: auto, stacked"),
    "a bad setting of a branch not listed": (["branch.lmc.points=0"], ["branch.lmc.points=5"],
                                             "branch.lmc.points must be >= 2"),
}


@pytest.mark.parametrize("case", sorted(BAD_THEN_FIXED))
def test_bad_value_then_the_fix_in_the_same_folder(tmp_path, case):
    bad, fixed, message = BAD_THEN_FIXED[case]
    run = tmp_path / "run"
    common = ["pruning.levels=2", "pruning.branches=[]"]
    r = cli(run, *common, *bad)
    assert r.returncode == 2, r.log
    assert len(r.errors) == 1 and message in r.errors[0], r.log
    assert "Traceback" not in r.log
    assert not any((run / f).exists() for f in RUN_FILES), sorted(p.name for p in run.iterdir())
    assert not (run / "levels").exists()
    r = cli(run, *common, *fixed)
    assert r.returncode == 0, r.log
    assert json.loads((run / "summary.json").read_text())
    assert not (run / "error.txt").exists()  # the failed start's record is gone once the run owns its folder


# --- 2. a folder holds one experiment, and only its owner writes there ----------------------------------------------

@pytest.fixture
def finished(tmp_path):
    run = tmp_path / "run"
    r = cli(run, "pruning.levels=2", "pruning.branches=[reinit]")
    assert r.returncode == 0, r.log
    return run


def test_refused_processes_write_nothing(finished):
    before = snapshot(finished)
    # another experiment in a finished folder
    r = cli(finished, "pruning.levels=2", "pruning.branches=[reinit]", "optimizer.lr=0.5")
    assert r.returncode == 2 and len(r.errors) == 1, r.log
    assert "already holds a different experiment (differs in: optimizer.lr)" in r.errors[0]
    assert snapshot(finished) == before  # no error.txt, no log line, no .hydra file
    # the folder's owner is running: a second process of the same command is refused, and writes nothing
    with open(finished / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = cli(finished, "pruning.levels=2", "pruning.branches=[reinit]")
        fcntl.flock(f, fcntl.LOCK_UN)
    assert r.returncode == 2 and len(r.errors) == 1 and "another process is running in" in r.errors[0], r.log
    assert snapshot(finished) == before
    # the report still sees a finished run, not a failed one
    from lottery.report import collect_runs
    assert not any(row.get("error") for row in collect_runs([finished]))


@pytest.mark.slow
def test_replicas_and_single_runs_never_mix(finished, tmp_path):
    before = snapshot(finished)
    r = cli(finished, "pruning.levels=2", "pruning.branches=[reinit]", "replicas=2")
    assert r.returncode == 2 and "holds a single run (its config.yaml), not replicas" in r.errors[0], r.log
    assert snapshot(finished) == before
    parent = tmp_path / "replicas"
    assert cli(parent, "pruning.levels=2", "pruning.branches=[]", "replicas=[0,1]").returncode == 0
    parent_before = snapshot(parent)
    r = cli(parent, "pruning.levels=2", "pruning.branches=[]")
    assert r.returncode == 2 and "holds replicas (replicas.json, replicate_<seed>/ folders), not a single run" \
        in r.errors[0], r.log
    r = cli(parent, "pruning.levels=2", "pruning.branches=[]", "replicas=[7]", "optimizer.lr=0.5")
    assert r.returncode == 2, r.log
    assert "already holds replicates of a different experiment (differs in: optimizer.lr)" in r.errors[0]
    assert snapshot(parent) == parent_before
    # the same experiment with another seed: one more replicate beside the others
    r = cli(parent, "pruning.levels=2", "pruning.branches=[]", "replicas=[7]")
    assert r.returncode == 0, r.log
    assert json.loads((parent / "replicas.json").read_text())["replicas"] == [0, 1, 7]
    for s in (0, 1):  # untouched
        assert snapshot(parent / f"replicate_{s}") == {k[len(f"replicate_{s}/"):]: v for k, v in parent_before.items()
                                                        if k.startswith(f"replicate_{s}/")}


def test_truncated_result_file_on_resume_names_the_file_and_the_remedy(finished):
    result = finished / "levels" / "level_1" / "reinit" / "result.json"
    result.write_text(result.read_text()[:40])
    r = cli(finished, "pruning.levels=2", "pruning.branches=[reinit]")
    assert r.returncode == 2 and len(r.errors) == 1, r.log
    assert str(result) in r.errors[0] and "is damaged" in r.errors[0] and f"delete the unit's folder {result.parent} " \
        in r.errors[0]
    shutil.rmtree(result.parent)  # what the message says to do
    r = cli(finished, "pruning.levels=2", "pruning.branches=[reinit]")
    assert r.returncode == 0, r.log
    assert json.loads(result.read_text())["branch"] == "reinit"


def test_broken_summary_and_result_files_are_one_warning_in_the_report(finished, tmp_path):
    other = tmp_path / "other"
    assert cli(other, "pruning.levels=2", "pruning.branches=[]", "seed=1").returncode == 0
    (finished / "summary.json").write_text("[{\"level\": 0,")
    r = run_cli(str(tmp_path), "--out", str(tmp_path / "report"), entry="lottery.report:main", cwd=tmp_path)
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(finished / "summary.json") in warnings[0], r.stderr
    assert (tmp_path / "report" / "runs.csv").exists() and str(other) in (tmp_path / "report" / "runs.csv").read_text()


def _immutable(path) -> bool:
    r = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    return r.returncode == 0


def test_read_only_folders_are_one_line_and_exit_74(finished, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    if shutil.which("chattr") is None or not _immutable(locked):
        pytest.skip("needs chattr +i (root on a file system with attributes) to make a folder read-only for root")
    try:
        r = cli(locked / "run", "pruning.levels=1")  # Hydra would create the folder: caught before it
        assert r.returncode == 74 and len(r.errors) == 1 and "cannot create the run folder" in r.errors[0], r.log
        assert "Traceback" not in r.log
        assert _immutable(finished)  # a finished run's folder made undeletable: resuming cannot write
        r = cli(finished, "pruning.levels=2", "pruning.branches=[reinit]")
        assert r.returncode == 74 and len(r.errors) == 1 and "cannot write" in r.errors[0], r.log
    finally:
        subprocess.run(["chattr", "-i", str(locked), str(finished)], capture_output=True)


# --- 3. results that are silently wrong ------------------------------------------------------------------------------

@needs_data("MNIST", "raw")
def test_a_run_that_learns_nothing_is_flagged(tmp_path):
    """Adam at a rate of 10 on real MNIST: the losses stay finite, the network predicts one class."""
    run = tmp_path / "run"
    r = run_cli(f"dataset.root={DATA}", "dataset.val_size=1000", "train.duration=100it", "train.eval_every=50it",
                "pruning.levels=1", "optimizer.lr=10", "threads=1", "train.progress=false", f"hydra.run.dir={run}",
                cwd=tmp_path, env=ENV)
    assert r.returncode == 0, r.stderr
    [rec] = json.loads((run / "summary.json").read_text())
    assert rec["at_chance"] is True and not rec["diverged"] and math.isfinite(rec["test_loss"])
    assert "ends at chance" in r.stdout + r.stderr and "learned nothing" in r.stdout + r.stderr
    rep = run_cli(str(run), "--out", str(tmp_path / "report"), entry="lottery.report:main", cwd=tmp_path)
    assert "1 units at chance" in rep.stdout
    assert "at chance: learned nothing" in (tmp_path / "report" / "lottery_ticket.svg").read_text()
    # a run that learns is not flagged
    ok = run_experiment(tiny_cfg("pruning.levels=1"), tmp_path / "ok")
    assert ok[0]["at_chance"] is False


# --- 4. many replicates ----------------------------------------------------------------------------------------------

def test_a_diverged_replicate_is_named_and_the_others_finish(tmp_path, monkeypatch):
    real = units._train

    def poisoned(group, *args):
        for job, _ in group:  # replicate 1's level-1 ticket starts from NaN weights
            if job.rep.seed == 1 and job.level == 1 and job.branch == "ticket":
                with torch.no_grad():
                    next(job.model.parameters()).fill_(math.nan)
        return real(group, *args)

    monkeypatch.setattr(units, "_train", poisoned)
    with pytest.raises(Diverged) as e:
        run_experiment(tiny_cfg("pruning.levels=3", "pruning.branches=[reinit]", "replicas=[0,1]",
                                "replica_batching=interleaved"), tmp_path / "run")
    assert "replicate 1: level 1 ticket has a non-finite loss by step" in str(e.value)
    assert "replicate 0" not in str(e.value) and "the other replicates finished" in str(e.value)
    done = {s: [(r["level"], r["branch"]) for r in json.loads((tmp_path / "run" / f"replicate_{s}" /
                                                                 "summary.json").read_text())] for s in (0, 1)}
    assert done[0] == [(0, "ticket"), (1, "ticket"), (1, "reinit"), (2, "ticket"), (2, "reinit")]
    assert (1, "ticket") in done[1] and not any(level == 2 for level, _ in done[1])


def test_many_replicates_warn_before_starting_and_log_set_up_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(session, "MANY_REPLICATES", 3)
    with caplog.at_level("INFO"):
        run_experiment(tiny_cfg("pruning=none", "replicas=3", "train.duration=20it"), tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records]
    [warning] = [m for m in lines if m.startswith("replicas=3:")]
    assert "GiB" in warning and "times a single run's training time" in warning
    assert sum("device: cpu" in m for m in lines) == 1
    caplog.clear()
    with caplog.at_level("INFO"):
        run_experiment(tiny_cfg("pruning=none", "replicas=3", "train.duration=20it"), tmp_path / "run")
    assert [m for m in (r.getMessage() for r in caplog.records) if m.startswith("resuming")] == \
        [f"resuming 3 of 3 replicate folders in {tmp_path / 'run'}"]


def test_a_stop_signal_during_set_up_stops_before_anything_is_written(tmp_path):
    signals._stop["signal"] = signal.SIGTERM
    try:
        with pytest.raises(Preempted, match="stopped before set-up"):
            run_experiment(tiny_cfg("replicas=4"), tmp_path / "run")
    finally:
        signals._stop["signal"] = None
    assert not any((tmp_path / "run" / f).exists() for f in RUN_FILES)


@pytest.mark.slow
def test_submitit_local_replicas_rows_carry_their_jobs_overrides(tmp_path):
    sweep = tmp_path / "sweep"
    r = run_cli("-m", "launcher=submitit_local", *TINY, "pruning=none", "replicas=2", "train.duration=20it",
                "optimizer.lr=0.002", f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    import csv
    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {row["replicate"] for row in rows} == {"0", "1"}
    assert all("optimizer.lr=0.002" in row["overrides"] for row in rows), rows
