"""SLURM: the launcher, submitit and scripts/slurm/train.sbatch against a real one-node cluster (tests marked
`slurm`, scripts/slurm/local-cluster.sh), plus fake programs for what that cluster cannot show: a GPU cluster's site
settings in the job script, and an accounting database that hangs.
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

from conftest import REPO, fault, run_cli, stable

TINY = ["dataset=synthetic", "model=mlp", "model.hidden=[64,32]", "train.batch_size=32", "train.duration=80it",
        "train.eval_every=40it", "checkpoint.every=20it", "pruning.levels=2", "pruning.branches=[]",
        "train.progress=false", "device=cpu"]

# --- fakes: sbatch runs the array's tasks in the background, one after the other, with SLURM's variables ---------

FAKE_SBATCH = """
import os, re, shutil, subprocess, sys
from pathlib import Path

state = Path(os.environ["FAKE_SLURM"])
if sys.argv[1] == "--run":  # detached: the tasks of one submission, one at a time
    script, jid, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
    for i in range(n):
        env = dict(os.environ, SLURM_JOB_ID=str(int(jid) + 1 + i), SLURM_PROCID="0", SLURM_LOCALID="0",
                   SLURM_NODEID="0", SLURM_NTASKS="1", SLURM_JOB_NUM_NODES="1", SLURM_RESTART_COUNT="0",
                   SLURM_ARRAY_JOB_ID=jid, SLURM_ARRAY_TASK_ID=str(i))
        subprocess.run(["bash", script], env=env)
    (state / f"done_{jid}").touch()
    sys.exit(0)
script = Path(sys.argv[-1])
jid = str(12345 + len(list(state.glob("sbatch_*.sh"))))
shutil.copy(script, state / f"sbatch_{jid}.sh")
m = re.search(r"^#SBATCH --array=0-(\\d+)", script.read_text(), re.M)
(state / f"tasks_{jid}").write_text(str(int(m.group(1)) + 1))
log = open(state / f"run_{jid}.log", "a")
runner = subprocess.Popen([sys.executable, __file__, "--run", str(script), jid, str(int(m.group(1)) + 1)],
                          stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
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
    status = "COMPLETED" if (state / f"done_{jid}").exists() else "RUNNING"
    for i in range(int((state / f"tasks_{jid}").read_text())):
        print(f"{jid}_{i}|{status}|node1")
"""


def _fake_programs(bin_dir: Path, programs: dict[str, str]) -> None:
    bin_dir.mkdir(exist_ok=True)
    for name, code in programs.items():
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{code}")
        path.chmod(0o755)


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm"
    state.mkdir()
    # squeue: the launcher asks it whether a controller answers before it submits (sacct gives the jobs' states)
    _fake_programs(bin_dir, {"sbatch": FAKE_SBATCH, "srun": FAKE_SRUN, "sacct": FAKE_SACCT, "squeue": ""})
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM": str(state), "OMP_NUM_THREADS": "1"}
    yield env, state
    # Nothing of ours outlives a failed test: the fake scheduler's task runners, each in its own process group.
    for f in state.glob("runner_*.pid"):
        if not (state / f"done_{f.stem.split('_')[1]}").exists():
            try:
                os.killpg(int(f.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_slurm_launcher_puts_site_settings_in_the_job_script(fake_slurm, tmp_path):
    """Partition, account, GPUs and slurm.yaml's defaults reach the one array job's #SBATCH lines (the one-node
    cluster has no GPUs nor partitions to choose from)."""
    env, state = fake_slurm
    sweep_dir = tmp_path / "sweep"
    r = run_cli("-m", "launcher=slurm", "hydra.launcher.partition=gpu_p", "hydra.launcher.account=lab42",
                "hydra.launcher.gpus_per_node=2", "hydra.launcher.timeout_min=90",
                "hydra.launcher.array_parallelism=1", *TINY, "seed=0,1", f"hydra.sweep.dir={sweep_dir}",
                cwd=tmp_path, env=env, timeout=600)
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
    with open(sweep_dir / "summary.csv", newline="") as f:
        assert len({row["run_dir"] for row in csv.DictReader(f)}) == 2


def test_the_cluster_tests_share_one_worker(request):
    """Under xdist (the suite's default) every `slurm` test carries loadgroup's "@slurm" suffix, so one worker runs
    them one after another and only it starts the cluster."""
    if not hasattr(request.config, "workerinput"):
        pytest.skip("not under pytest-xdist (-n0): one process runs everything")
    cluster = [item for item in request.session.items if item.get_closest_marker("slurm") is not None]
    if not cluster:
        pytest.skip("no slurm test selected")
    assert all(item.nodeid.endswith("@slurm") for item in cluster), [i.nodeid for i in cluster]


def test_hanging_sacct_gives_way_to_squeue(tmp_path, monkeypatch):
    """An accounting database that does not answer: after SACCT_TIMEOUT_S the states come from squeue; a job that
    squeue no longer lists has ended, and one it lists keeps its state."""
    from lottery.launch import slurm
    _fake_programs(tmp_path / "bin", {
        "sacct": "import time; time.sleep(30)",
        "squeue": "print('77_0|RUNNING')\nprint('77_1|CANCELLED')",
    })
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(slurm, "SACCT_TIMEOUT_S", 1)
    watcher = slurm._queue_watcher_class()(delay_s=60)
    for job in ("77_0", "77_1", "77_2"):
        watcher.register_job(job)
    started = time.time()
    watcher.update()
    assert time.time() - started < 10
    assert [watcher.get_state(j, mode="cache") for j in ("77_0", "77_1", "77_2")] == \
        ["RUNNING", "CANCELLED", slurm.GONE]
    assert [watcher.is_done(j, mode="cache") for j in ("77_0", "77_1", "77_2")] == [False, True, True]


# --- the real scheduler: a one-node cluster (scripts/slurm/local-cluster.sh) ------------------------------------------
# What fakes cannot show: when SLURM really delivers signals, how long a requeue takes, what submitit reads to learn a
# job's state (no accounting database here: sacct fails, the launcher asks squeue). Jobs are tiny (one CPU, synthetic
# data); the cluster requeues in ~10 s instead of ~2 min (AuthInfo=cred_expire=10).

# Long enough (about 28 s a level here) that a time-limit signal surely comes while it trains (see below).
LONG = ["dataset=synthetic", "model=mlp", "model.hidden=[64,32]", "train.batch_size=32", "train.duration=20000it",
        "train.eval_every=5000it", "checkpoint.every=100it", "pruning.levels=2", "pruning.branches=[]",
        "train.progress=false", "device=cpu", "threads=1"]
# What the one-node cluster can give (slurm.yaml's defaults ask for a GPU, 8 CPUs and 32 GB).
ONE_CPU = ["launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.mem_gb=1"]
WAIT_S = 900  # a time-limit run needs ~2 min alone, but several on a machine busy with other work


def _cli_popen(*args: str, cwd: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    code = "import sys; sys.argv[0] = 'lottery-train'; from lottery.cli import train; train()"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=cwd, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(what: str, check, timeout: float = WAIT_S, every: float = 0.1, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the command ended first (status {proc.returncode})")
        time.sleep(every)
    pytest.fail(f"{what}: not within {timeout} s")


def _queue(name: str) -> dict[str, str]:
    """{job id: state} of the jobs named `name`, array tasks one by one, ended ones too (for MinJobAge)."""
    r = subprocess.run(["squeue", "--noheader", "--array", "--states=all", "--name", name, "--format=%i|%T"],
                       capture_output=True, text=True, timeout=30)
    return dict(line.split("|") for line in r.stdout.split())


@pytest.fixture
def job_name(request, slurm_cluster):
    """A job name of this test's own; whatever of it is still queued at the end is cancelled."""
    name = f"lt-{request.node.name[5:30]}-{os.getpid()}"
    yield name
    subprocess.run(["scancel", "--name", name], capture_output=True, timeout=30)


@pytest.fixture
def cli(tmp_path):
    """Start lottery-train in the background; whatever of it still runs at the end is killed."""
    procs = []

    def start(*args, env=None):
        log = tmp_path / f"cli{len(procs)}.log"
        procs.append(_cli_popen(*args, cwd=tmp_path, log=log, env=env))
        procs[-1].log = log
        return procs[-1]

    yield start
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """summary.json of an uninterrupted LONG run, trained in the background while the first test's jobs run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = _cli_popen(*LONG, f"hydra.run.dir={run_dir}", cwd=run_dir.parent, log=run_dir.parent / "cli.log")
    results = {}

    def get():
        if not results:
            assert proc.wait(timeout=WAIT_S) == 0, (run_dir.parent / "cli.log").read_text()
            results["summary"] = json.loads((run_dir / "summary.json").read_text())
        return results["summary"]

    yield get
    if proc.poll() is None:
        proc.kill()


def _finish(proc: subprocess.Popen, timeout: float = WAIT_S) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the sweep did not end within {timeout} s: {proc.log.read_text()[-3000:]}")
    return proc.log.read_text()


def _submitit_logs(sweep_dir: Path, task: str) -> str:
    return "".join(p.read_text() for p in sweep_dir.glob(f".submitit/{task}/*_log.*"))


def _with(args: list[str], *changes: str) -> list[str]:
    keys = {c.split("=")[0] for c in changes}
    return [a for a in args if a.split("=")[0] not in keys] + list(changes)


def _job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted((d for d in sweep_dir.iterdir() if d.name[0].isdigit()), key=lambda d: int(d.name.split("_")[0]))


def _table_rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))



# A few seconds a level: a signal sent at level 1's first checkpoint lands inside it.
SHORT = _with(LONG, "train.duration=3000it", "train.eval_every=1000it", "checkpoint.every=20it")


@pytest.mark.slurm
def test_sweep_array_usr2_checkpoints_requeues_and_resumes(job_name, cli, tmp_path):
    """A two-job sweep is one job array. `scancel --signal=USR2` to task 0 inside level 1: it checkpoints, submitit
    requeues it (as a preemption: timeout_min is long), the requeued task resumes in level 1 and ends equal to task 1,
    the same run uninterrupted (the tasks differ only in checkpoint.every). The sweep's table has both."""
    sweep_dir = tmp_path / "sweep"
    started = time.time()
    proc = cli("-m", *ONE_CPU, f"hydra.launcher.name={job_name}", "hydra.launcher.timeout_min=20",
               *_with(SHORT, "checkpoint.every=20it,25it"), f"hydra.sweep.dir={sweep_dir}")
    checkpoint = _wait_for("level 1 checkpoint of job 0",
                           lambda: next(sweep_dir.glob("0_*/levels/level_1/ticket/checkpoint.pt"), None), proc=proc)
    task = next(j for j in _queue(job_name) if j.endswith("_0"))
    subprocess.run(["scancel", "--signal=USR2", task], check=True, timeout=30)
    signalled = time.time()
    log = _finish(proc)
    assert proc.returncode == 0, log

    preempted, plain = _job_dirs(sweep_dir)
    train_log = (preempted / "train.log").read_text()
    assert "received SIGUSR2" in train_log, train_log
    assert "level 1 ticket: resuming from step" in train_log, train_log
    assert train_log.count("level 0 ticket       weights remaining") == 1, "level 0 was not trained again"
    jobs_log = _submitit_logs(sweep_dir, task)
    assert "this job is preempted" in jobs_log and f"Requeued job {task}" in jobs_log, jobs_log
    assert "resuming" not in (plain / "train.log").read_text()
    assert stable(json.loads((preempted / "summary.json").read_text())) == \
        stable(json.loads((plain / "summary.json").read_text()))
    assert len(list(sweep_dir.glob(".submitit/*/*_submission.sh"))) == 1, "one array job for the sweep"
    assert {Path(r["run_dir"]).name for r in _table_rows(sweep_dir)} == {preempted.name, plain.name}
    assert not checkpoint.exists(), "checkpoints are removed once a unit is done"
    print(f"USR2 {signalled - started:.0f} s after the start; sweep done {time.time() - signalled:.0f} s later")


@pytest.mark.slurm
def test_time_limit_signal_checkpoints_requeues_and_resumes(reference, job_name, cli, tmp_path):
    """A real time limit of one minute with USR2 10 s before it: submitit counts it as a time-out (max_num_timeout),
    the run checkpoints, the requeued job resumes, and the result equals an uninterrupted run's.
    SLURM checks time limits every 30 s and sends the warning up to 30 s early: 20 to 50 s after the start, so the run
    must train longer than that. Its speed is not enough (a level took 28 s on one CI machine, 19 s on the next, and
    that run ended before any signal): the test plugin paces it to at least 64 s (1.6 ms a step; sleeping changes no
    result). A larger signal_delay_s would not do: a requeued job starts ~14 s after the check that signalled it,
    and with a window that opens before the next check it would be signalled again after a few seconds of work,
    every 30 s."""
    sweep_dir = tmp_path / "sweep"
    started = time.time()
    args, env = fault(pace_ms=1.6)
    proc = cli("-m", *ONE_CPU, f"hydra.launcher.name={job_name}", "hydra.launcher.timeout_min=1",
               "hydra.launcher.signal_delay_s=10", "hydra.launcher.max_num_timeout=30", *LONG, *args,
               f"hydra.sweep.dir={sweep_dir}", env=env)
    log = _finish(proc)
    assert proc.returncode == 0, log
    (run_dir,) = _job_dirs(sweep_dir)
    train_log = (run_dir / "train.log").read_text()
    assert "received SIGUSR2" in train_log and "resuming from step" in train_log, train_log
    jobs_log = "".join(p.read_text() for p in sweep_dir.glob(".submitit/*/*_log.*"))
    assert "this job is timed-out" in jobs_log and "remaining timeouts" in jobs_log, jobs_log
    assert stable(json.loads((run_dir / "summary.json").read_text())) == stable(reference())
    print(f"time-limit run: {train_log.count('received SIGUSR2')} signal(s), done in {time.time() - started:.0f} s")


@pytest.mark.slurm
def test_plain_scancel_fails_that_job_and_the_sweep_ends(job_name, cli, tmp_path):
    """A plain `scancel` (SIGTERM) inside a job: the job ends CANCELLED without a result. sacct does not work on this
    cluster, so the launcher learns it from squeue; the sweep ends, with that job's folder holding error.txt and its
    row in the table saying so, and the other job finished."""
    sweep_dir = tmp_path / "sweep"
    proc = cli("-m", *ONE_CPU, f"hydra.launcher.name={job_name}", "hydra.launcher.timeout_min=20",
               *_with(SHORT, "train.duration=3000it,200it"), f"hydra.sweep.dir={sweep_dir}")
    _wait_for("a checkpoint of job 0", lambda: next(sweep_dir.glob("0_*/levels/level_0/ticket/checkpoint.pt"), None),
              proc=proc)
    task = next(j for j in _queue(job_name) if j.endswith("_0"))
    subprocess.run(["scancel", task], check=True, timeout=30)
    cancelled = time.time()
    log = _finish(proc)
    assert proc.returncode == 1, log  # the sweep ends, and the command says a job failed
    assert _queue(job_name)[task] == "CANCELLED"
    assert "sacct did not answer" in log and "ended without a result" in log, log
    cancelled_dir, finished_dir = _job_dirs(sweep_dir)
    assert f"of the multirun in {sweep_dir.absolute()} failed: {cancelled_dir.name} (" in log, log
    error = (cancelled_dir / "error.txt").read_text()
    assert f"job {task} ended without a result (SLURM state: CANCELLED)" in error, error
    assert (finished_dir / "summary.json").exists() and not (finished_dir / "error.txt").exists()
    rows = {Path(r["run_dir"]).name: r for r in _table_rows(sweep_dir)}
    assert "CANCELLED" in rows[cancelled_dir.name]["error"]
    assert not rows[finished_dir.name].get("error")
    print(f"sweep ended {time.time() - cancelled:.0f} s after the scancel")


@pytest.mark.slurm
def test_sbatch_script_requeues_itself_on_its_signal(job_name, tmp_path):
    """scripts/slurm/train.sbatch as a plain sbatch job: USR2 to its batch shell (what --signal=B:USR2@120 sends
    before the time limit; here sent at once with `scancel --batch`): the trap passes it on, lottery-train
    checkpoints, the script requeues the job, the requeued job resumes in RUN_DIR and finishes."""
    bin_dir, run_dir, out = tmp_path / "bin", tmp_path / "run", tmp_path / "job.out"
    bin_dir.mkdir()
    (bin_dir / "lottery-train").write_text(f'#!/bin/bash\nexec {sys.executable} -m lottery "$@"\n')
    (bin_dir / "lottery-train").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    # The script's #SBATCH lines are for a GPU cluster; the command line overrides them for this node.
    partition = subprocess.run(["sinfo", "--noheader", "--format=%P"], capture_output=True, text=True,
                               check=True).stdout.split()[0].rstrip("*")
    cmd = ["sbatch", "--parsable", f"--job-name={job_name}", f"--partition={partition}", "--gpus-per-node=0",
           "--cpus-per-task=1", "--mem=1G", "--time=20", f"--output={out}", f"--chdir={tmp_path}",
           f"--export=ALL,RUN_DIR={run_dir}", str(REPO / "scripts" / "slurm" / "train.sbatch"),
           *_with(SHORT, "pruning.levels=1")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    _wait_for("a checkpoint", lambda: (run_dir / "levels" / "level_0" / "ticket" / "checkpoint.pt").exists())
    subprocess.run(["scancel", "--batch", "--signal=USR2", job], check=True, timeout=30)
    signalled = time.time()
    state = _wait_for("the job's end", lambda: (lambda s: s if s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
                                                 else None)(_queue(job_name).get(job)), every=1)
    text = out.read_text()
    assert state == "COMPLETED", text
    assert "caught SIGUSR2" in text and f"requeueing job {job}" in text, text
    assert "(restart 1)" in text and "level 0 ticket: resuming from step" in text, text
    assert [x["level"] for x in json.loads((run_dir / "summary.json").read_text())] == [0]
    print(f"sbatch job finished {time.time() - signalled:.0f} s after its USR2")


@pytest.mark.slurm
def test_warns_about_requests_no_node_can_meet(slurm_cluster):
    """slurm.yaml's defaults (a GPU, 8 CPUs, 32 GB) on this node: named before anything is submitted."""
    from lottery.launch.slurm import unsatisfiable
    problems = " ".join(unsatisfiable({"gpus_per_node": 1, "cpus_per_task": 999, "mem_gb": 10_000,
                                       "tasks_per_node": 1, "timeout_min": 240}))
    assert "1 GPUs" in problems and "999 CPUs" in problems and "MB of memory" in problems, problems
    assert unsatisfiable({"gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 1, "timeout_min": 20}) == []


def test_unsatisfiable_reads_sinfo_fields():
    from lottery.launch.slurm import _gpus, _minutes, unsatisfiable
    assert [_minutes(x) for x in ["infinite", "30", "45:00", "4:00:00", "2-00:00:00"]] == \
        [float("inf"), 30, 45, 240, 2880]
    assert _gpus("gpu:a100:4(S:0-1),shard:8") == 4 and _gpus("(null)") == 0
    nodes = [{"partition": "gpu", "cpus": 64, "memory_mb": 512_000, "gpus": 4, "time_min": 2880},
             {"partition": "gpu", "cpus": 128, "memory_mb": 256_000, "gpus": 0, "time_min": 2880}]
    assert unsatisfiable({"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 32, "timeout_min": 240}, nodes) == []
    (problem,) = unsatisfiable({"gpus_per_node": 1, "cpus_per_task": 100, "mem_gb": 32, "timeout_min": 240}, nodes)
    assert "no single node" in problem
    (problem,) = unsatisfiable({"gpus_per_node": 8, "cpus_per_task": 8, "mem_gb": 32, "timeout_min": 240}, nodes)
    assert problem.startswith("8 GPUs") and "has: 4" in problem
