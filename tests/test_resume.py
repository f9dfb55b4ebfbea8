"""Resume after a hard kill, a stop signal, or a damaged checkpoint ends bit-identical to an uninterrupted run.

Every test runs the real CLI in a subprocess, breaks it with the test-only fault injection (tests/plugins/faults.py), starts
it again with the same command in the same folder, and compares `summary.json` with `==` against a reference run.
Kill points are drawn from seeded RNGs: random, but the same on every run of the suite.
"""
from __future__ import annotations

import json
import random
import signal

import pytest

from conftest import fault, run_cli, stable

from lottery.core.files import load_torch
from lottery.cli import PREEMPTED_EXIT

STEPS, REWIND = 80, 10
# Three levels with a control: five units, checkpoints every 20 steps, rewinding to step 10 (so level 0 also
# saves rewind weights mid-level). One thread: the same arithmetic in every process, and no oversubscription.
ARGS = ["dataset=synthetic", "model=mlp", "model.hidden=[64,32]", "train.batch_size=32", f"train.duration={STEPS}it",
        "train.eval_every=40it", "checkpoint.every=20it", "pruning.levels=3", "pruning.branches=[reinit]",
        f"pruning.rewind={REWIND}it", "train.progress=false", "device=cpu"]
UNITS = [(0, "ticket"), (1, "ticket"), (1, "reinit"), (2, "ticket"), (2, "reinit")]
ENV = {"OMP_NUM_THREADS": "1"}


def train(run_dir, faults=None):
    """The same command each time; `faults`: what `fault(...)` gives, to break this start."""
    args, env = faults or ([], {})
    r = run_cli(*ARGS, f"hydra.run.dir={run_dir}", *args, cwd=run_dir.parent, env={**ENV, **env})
    r.log = r.stdout + r.stderr
    return r


def summary(run_dir) -> list[dict]:
    return json.loads((run_dir / "summary.json").read_text())


def result_mtimes(run_dir) -> dict:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.glob("levels/*/*/result.json")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    r = train(run_dir)
    assert r.returncode == 0, r.log
    records = summary(run_dir)
    assert [(x["level"], x["branch"]) for x in records] == UNITS
    assert all(isinstance(x["test_loss"], float) for x in records)
    return records


@pytest.mark.slow
def test_sigkill_inside_a_level_resumes_bit_identical(reference, tmp_path):
    rng = random.Random(20240611)
    level, branch = rng.choice(UNITS)
    start = 0 if level == 0 else REWIND
    step = rng.randint(start + 1, STEPS - 1)
    run_dir = tmp_path / "run"
    faults = fault(kill_at=step, level=level, branch=branch)
    where = f"killed at step {step} of level {level} {branch}"

    r = train(run_dir, faults)
    assert r.returncode == -signal.SIGKILL, f"{where}: {r.log}"
    done_before = result_mtimes(run_dir)
    assert len(done_before) == UNITS.index((level, branch)), where

    r = train(run_dir, faults)  # the same command again, as a person or SLURM would
    assert r.returncode == 0, f"{where}: {r.log}"
    assert stable(summary(run_dir)) == stable(reference), where
    after = result_mtimes(run_dir)
    assert {k: after[k] for k in done_before} == done_before, f"{where}: a finished unit was trained again"
    if step > 20:  # a checkpoint (every 20 steps; the kill comes first within a step) was on disk: it was used
        assert f"level {level} {branch}: resuming from step" in r.log, where
    assert not list(run_dir.glob("levels/*/*/checkpoint*.pt")), "checkpoints are removed once a unit is done"


@pytest.mark.slow
def test_sigkill_between_levels_resumes_bit_identical(reference, tmp_path):
    level = random.Random(7).choice([0, 1])
    run_dir = tmp_path / "run"
    faults = fault(kill_after_level=level)

    r = train(run_dir, faults)
    assert r.returncode == -signal.SIGKILL, r.log
    done_before = result_mtimes(run_dir)
    assert sorted(done_before) == sorted(f"levels/level_{lv}/{b}/result.json" for lv, b in UNITS if lv <= level)
    assert not (run_dir / "levels" / f"level_{level + 1}").exists(), "the next level must not have started"

    r = train(run_dir, faults)
    assert r.returncode == 0, r.log
    assert stable(summary(run_dir)) == stable(reference)
    after = result_mtimes(run_dir)
    assert {k: after[k] for k in done_before} == done_before, "a finished level was trained again"
    assert f"level {level} ticket " not in r.log


@pytest.mark.slow
def test_corrupt_checkpoint_falls_back_to_previous(reference, tmp_path):
    run_dir = tmp_path / "run"
    faults = fault(kill_at=75, level=1)  # level 1 checkpoints at steps 20, 40 and 60
    assert train(run_dir, faults).returncode == -signal.SIGKILL
    unit = run_dir / "levels" / "level_1" / "ticket"
    assert load_torch(unit / "checkpoint.pt")["step"] == 60
    assert load_torch(unit / "checkpoint.prev.pt")["step"] == 40
    data = (unit / "checkpoint.pt").read_bytes()
    (unit / "checkpoint.pt").write_bytes(data[: len(data) // 2])  # a truncated write

    r = train(run_dir, faults)
    assert r.returncode == 0, r.log
    assert "checkpoint.pt is unreadable" in r.log and "resuming from the previous checkpoint" in r.log
    assert "level 1 ticket: resuming from step 40" in r.log
    assert stable(summary(run_dir)) == stable(reference)


@pytest.mark.slow
def test_stop_signal_checkpoints_exits_and_resumes(reference, tmp_path):
    """SIGUSR2 without a launcher to hand it to (launcher=local, the sbatch script): checkpoint at once, exit with
    the 'try again' status and no error recorded; the same command continues from that exact step."""
    step = random.Random(3).randint(REWIND + 1, STEPS - 1)
    run_dir = tmp_path / "run"
    faults = fault(signal_at=step, level=1)

    r = train(run_dir, faults)
    assert r.returncode == PREEMPTED_EXIT, r.log
    assert load_torch(run_dir / "levels" / "level_1" / "ticket" / "checkpoint.pt")["step"] == step
    assert not (run_dir / "error.txt").exists()

    r = train(run_dir, faults)
    assert r.returncode == 0, r.log
    assert f"level 1 ticket: resuming from step {step}" in r.log
    assert stable(summary(run_dir)) == stable(reference)
