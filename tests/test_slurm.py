"""SLURM without a cluster: fake `sbatch`, `srun`, `sacct` and `scontrol` on PATH.

The fake sbatch keeps a copy of each submitted script and runs the array's tasks in the background, one after the
other, with the environment variables SLURM gives a task; the fake scontrol records `requeue` and the task runs
again, as SLURM would restart it. So the launcher config, submitit's requeue and the example sbatch script all run
for real, only the scheduler is pretend.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli

from lottery.checkpoint import load_torch
from lottery.cli import PREEMPTED_EXIT

TINY = ["dataset=synthetic", "model=mlp", "model.hidden=[64,32]", "train.batch_size=32", "train.duration=80it",
        "train.eval_every=40it", "checkpoint.every=20it", "pruning.levels=2", "pruning.branches=[]",
        "train.progress=false", "device=cpu"]

FAKE_SBATCH = """
import os, re, shutil, subprocess, sys
from pathlib import Path

state = Path(os.environ["FAKE_SLURM"])
if sys.argv[1] == "--run":  # detached: the tasks of one submission, one at a time
    script, jid, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
    for i in range(n):
        task = f"{jid}_{i}" if n > 1 else jid
        for restart in range(4):
            env = dict(os.environ, SLURM_JOB_ID=str(int(jid) + 1 + i), SLURM_PROCID="0", SLURM_LOCALID="0",
                       SLURM_NODEID="0", SLURM_NTASKS="1", SLURM_JOB_NUM_NODES="1", SLURM_RESTART_COUNT=str(restart))
            if n > 1:
                env.update(SLURM_ARRAY_JOB_ID=jid, SLURM_ARRAY_TASK_ID=str(i))
            subprocess.run(["bash", script], env=env)
            requeued = state / f"requeue_{task}"
            if not requeued.exists():
                break
            requeued.unlink()
    (state / f"done_{jid}").touch()
    sys.exit(0)
script = Path(sys.argv[-1])
jid = str(12345 + len(list(state.glob("sbatch_*.sh"))))
shutil.copy(script, state / f"sbatch_{jid}.sh")
m = re.search(r"^#SBATCH --array=0-(\\d+)", script.read_text(), re.M)
n = int(m.group(1)) + 1 if m else 1
(state / f"tasks_{jid}").write_text(str(n))
log = open(state / f"run_{jid}.log", "a")
runner = subprocess.Popen([sys.executable, __file__, "--run", str(script), jid, str(n)], stdout=log, stderr=log,
                          stdin=subprocess.DEVNULL, start_new_session=True)
(state / f"runner_{jid}.pid").write_text(str(runner.pid))
print(f"Submitted batch job {jid}")
"""

FAKE_SRUN = """
import os, sys
args = sys.argv[1:]
while args and args[0].startswith("--"):  # srun's own options: --unbuffered, --output X, --error X
    args = args[2:] if args[0] in ("--output", "--error") else args[1:]
os.execvp(args[0], args)
"""

FAKE_SACCT = """
import os, sys
from pathlib import Path
state = Path(os.environ["FAKE_SLURM"])
jids = [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "-j"]
print("JobID|State|NodeList")
for jid in jids:
    n = int((state / f"tasks_{jid}").read_text())
    status = "COMPLETED" if (state / f"done_{jid}").exists() else "RUNNING"
    for i in range(n):
        print(f"{jid}_{i}|{status}|node1" if n > 1 else f"{jid}|{status}|node1")
"""

FAKE_SCONTROL = """
import os, sys
from pathlib import Path
state = Path(os.environ["FAKE_SLURM"])
with open(state / "scontrol.log", "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
if sys.argv[1] == "requeue":
    (state / f"requeue_{sys.argv[2]}").touch()
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm"
    bin_dir.mkdir()
    state.mkdir()
    for name, code in [("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("sacct", FAKE_SACCT),
                       ("scontrol", FAKE_SCONTROL)]:
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{code}")
        path.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM": str(state), "OMP_NUM_THREADS": "1"}
    procs: list[subprocess.Popen] = []
    yield env, state, procs
    # Nothing of ours outlives a failed test: the fake scheduler's task runners and the batch script, each in its
    # own process group, are stopped if (and only if) they are still running.
    groups = [p.pid for p in procs if p.poll() is None]
    groups += [int(f.read_text()) for f in state.glob("runner_*.pid")
               if not (state / f"done_{f.stem.split('_')[1]}").exists()]
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_slurm_launcher_script_requeue_and_table(fake_slurm, tmp_path):
    env, state, _ = fake_slurm
    sweep_dir = tmp_path / "sweep"
    r = run_cli("-m", "launcher=slurm", "hydra.launcher.partition=gpu_p", "hydra.launcher.account=lab42",
                "hydra.launcher.gpus_per_node=2", "hydra.launcher.timeout_min=90",
                "hydra.launcher.array_parallelism=1", *TINY, "+fault.level=1", "+fault.signal_at=50,null",
                f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, env=env, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log + "".join(p.read_text() for p in state.glob("run_*.log"))

    scripts = list(state.glob("sbatch_*.sh"))
    assert len(scripts) == 1, "one array job for the whole sweep"
    lines = scripts[0].read_text().splitlines()
    for flag in ["--partition=gpu_p", "--account=lab42", "--gpus-per-node=2", "--time=90", "--array=0-1%1",
                 "--signal=USR2@120", "--requeue", "--open-mode=append", "--cpus-per-task=8", "--mem=32GB",
                 "--nodes=1", "--ntasks-per-node=1"]:
        assert f"#SBATCH {flag}" in lines, (flag, lines)
    assert any(line.startswith("srun ") and "submitit.core._submit" in line for line in lines)
    assert f"{sweep_dir}/.submitit/" in scripts[0].read_text(), "submitit's files belong inside the sweep folder"

    # Task 0 signalled itself: submitit asked SLURM to requeue it, and the restarted task resumed mid-level.
    assert (state / "scontrol.log").read_text().split("\n")[0] == "requeue 12345_0"
    preempted, plain = sorted((d for d in sweep_dir.iterdir() if d.name[0].isdigit()), key=lambda d: d.name)
    job_log = (preempted / "train.log").read_text()
    assert "level 1 ticket: resuming from step 50" in job_log
    assert job_log.count("level 0 ticket       weights remaining") == 1
    assert json.loads((preempted / "summary.json").read_text()) == json.loads((plain / "summary.json").read_text())
    with open(sweep_dir / "summary.csv", newline="") as f:
        assert {Path(row["run_dir"]).name for row in csv.DictReader(f)} == {preempted.name, plain.name}


def test_example_sbatch_script_checkpoints_and_requeues_itself(fake_slurm, tmp_path):
    """SLURM sends USR2 to the batch shell (--signal=B:USR2@120): the trap passes it on, lottery-train checkpoints
    and exits, the script requeues its job; the requeued job (same id, same folder) resumes and finishes."""
    env, state, procs = fake_slurm
    bin_dir = Path(env["PATH"].split(os.pathsep)[0])
    (bin_dir / "lottery-train").write_text(f'#!/bin/bash\nexec {sys.executable} -m lottery "$@"\n')
    (bin_dir / "lottery-train").chmod(0o755)
    run_dir = tmp_path / "run"
    env = {**os.environ, **env, "SLURM_JOB_ID": "777", "SLURM_JOB_NAME": "lottery", "RUN_DIR": str(run_dir)}
    # One long level, so the signal surely comes while it trains.
    args = ["dataset=synthetic", "model=mlp", "model.hidden=[64,32]", "train.batch_size=32",
            "train.duration=3000it", "train.eval_every=1000it", "checkpoint.every=20it", "pruning.levels=1",
            "train.progress=false", "device=cpu"]
    cmd = ["bash", str(REPO / "scripts" / "slurm" / "train.sbatch"), *args]
    job = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    procs.append(job)
    checkpoint = run_dir / "levels" / "level_0" / "ticket" / "checkpoint.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists(), job.communicate()[0] if job.poll() is not None else "no checkpoint in time"
    os.kill(job.pid, signal.SIGUSR2)  # to the batch shell only, as B: does
    out = job.communicate(timeout=300)[0]
    assert job.returncode == PREEMPTED_EXIT, out
    assert (state / "scontrol.log").read_text() == "requeue 777\n", out
    stopped_at = load_torch(checkpoint)["step"]
    assert 20 <= stopped_at < 3000 and not (run_dir / "summary.json").exists()

    requeued = subprocess.run(cmd, cwd=tmp_path, env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True,
                              text=True, timeout=600)
    out = requeued.stdout + requeued.stderr
    assert requeued.returncode == 0, out
    assert f"level 0 ticket: resuming from step {stopped_at}" in out
    assert [x["level"] for x in json.loads((run_dir / "summary.json").read_text())] == [0]
    assert (state / "scontrol.log").read_text() == "requeue 777\n", "a finished job must not requeue itself"
