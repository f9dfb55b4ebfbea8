"""Sweeps that count their failures (issue 28): a submitit_local job killed from outside (SIGKILL) counts as failed,
one stopped by SIGTERM after its checkpoint (exit 75) as stopped and resumable; the sweep still writes summary.csv and
ends with one "N jobs failed" line and exit status 1, no traceback. Subprocesses: the launcher is the point."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from conftest import fault, run_cli

TINY = ["dataset=synthetic", "model=mlp", "model.hidden=[16]", "train.batch_size=32", "train.duration=40it",
        "train.eval_every=40it", "checkpoint.every=10it", "pruning=none", "train.progress=false", "device=cpu"]
ENV = {"OMP_NUM_THREADS": "1"}


def multirun(sweep_dir: Path, *args: str, env: dict | None = None):
    r = run_cli("-m", "launcher=submitit_local", *TINY, *args, f"hydra.sweep.dir={sweep_dir}", cwd=sweep_dir.parent,
                env={**ENV, **(env or {})}, timeout=600)
    r.log = r.stdout + r.stderr
    return r


def table(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize("how,first_words", [("kill_at", "JobEnded"), ("term_at", "JobStopped")])
def test_a_killed_submitit_local_job_is_counted_and_the_summary_written(tmp_path, how, first_words):
    sweep_dir = tmp_path / "sweep"
    args, env = fault(**{how: 20}, where="*/0_*")
    r = multirun(sweep_dir, *args, "seed=0,1", env=env)
    assert r.returncode == 1, r.log
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "1 job of the multirun" in errors[0] and "failed: 0_" in errors[0], r.stderr
    rows = table(sweep_dir)
    failed = [x for x in rows if x.get("error")]
    assert [Path(x["run_dir"]).name[:2] for x in failed] == ["0_"]
    assert failed[0]["error"].startswith(first_words), failed[0]["error"]
    assert any(not x.get("error") and Path(x["run_dir"]).name.startswith("1_") for x in rows)
    if how == "term_at":  # stopped after its checkpoint: the same sweep again resumes it, and then all is done
        assert "rerun the same sweep to resume it" in failed[0]["error"]
        again = multirun(sweep_dir, *args, "seed=0,1", env=env)
        assert again.returncode == 0, again.log
        assert not any(x.get("error") for x in table(sweep_dir))


@pytest.mark.slow
def test_a_second_identical_sweep_is_refused_while_the_first_holds_the_folder(tmp_path):
    """Two identical sweeps into one folder a few seconds apart each named as failed the jobs the other completed;
    now the second is refused in one line, the first ends clean, and the second run afterwards resumes (nothing to
    do: every job is done)."""
    import os
    import subprocess
    import sys
    import time
    sweep_dir = tmp_path / "sweep"
    # each job's 200 steps take at least 6 s (the pace is checked every 100 steps): the first sweep is still running
    # while the second (in this process: 1-3 s to its refusal) starts
    args, env = fault(pace_ms=30)
    args = ["-m", *TINY, "train.duration=200it", "train.eval_every=100it", *args, "seed=0,1",
            f"hydra.sweep.dir={sweep_dir}"]
    code = "import sys; sys.argv[0] = 'train'; from lottery.cli import train; train()"
    first = subprocess.Popen([sys.executable, "-c", code, *args], cwd=tmp_path, env={**os.environ, **ENV, **env},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(sweep_dir.glob("0_*/.lock")) and time.monotonic() < deadline:
            time.sleep(0.2)
        second = run_cli(*args, cwd=tmp_path, env={**ENV, **env})
        assert second.returncode == 2, second.stdout + second.stderr
        assert second.stderr.startswith(f"error: another sweep is running in {sweep_dir}")
        assert second.stderr.count("\n") == 1, second.stderr
    finally:
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert not any(x.get("error") for x in table(sweep_dir))
    again = run_cli(*args, cwd=tmp_path, env={**ENV, **env})
    assert again.returncode == 0, again.stderr


def test_a_sweep_into_a_folder_whose_lock_is_held_is_refused_in_one_line(tmp_path):
    """The fast lane's check of the refusal above: the lock held here instead of by a running sweep."""
    import fcntl
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    with open(sweep_dir / ".sweep.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = run_cli("-m", *TINY, "seed=0,1", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, env=ENV)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith(f"error: another sweep is running in {sweep_dir}")
    assert r.stderr.count("\n") == 1, r.stderr
    assert [p.name for p in sweep_dir.iterdir()] == [".sweep.lock"]  # no job started
