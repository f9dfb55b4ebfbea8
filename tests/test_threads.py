"""The threading default (lottery.core.threads): set before torch is imported by the entry points, seen by the OpenMP
runtime, never over what the user set, and off once torch is loaded (too late to matter)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO

from lottery.core.threads import DEFAULT_WAIT, WAIT_VARIABLES, default_wait_policy

NAME, VALUE = DEFAULT_WAIT


def _python(code: str, **env) -> str:
    """Run `code` in a fresh interpreter whose environment has none of the wait variables but `env`."""
    base = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES and k != "OMP_DISPLAY_ENV"}
    r = subprocess.run([sys.executable, "-c", code], env={**base, **env, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip() + "\n" + r.stderr


def test_default_is_set_only_when_the_environment_says_nothing():
    env = {}
    assert default_wait_policy(env) is None, "torch is imported in this process: too late, nothing is set"
    code = ("import os\nfrom lottery.core.threads import default_wait_policy\n"
            "print(default_wait_policy(), os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")
    assert _python(code).split("\n")[0] == f"{NAME}={VALUE} " + " ".join(
        [VALUE if NAME == "OMP_WAIT_POLICY" else "None", VALUE if NAME == "GOMP_SPINCOUNT" else "None"])
    for var, value in [("OMP_WAIT_POLICY", "ACTIVE"), ("OMP_WAIT_POLICY", ""), ("GOMP_SPINCOUNT", "123"),
                       ("KMP_BLOCKTIME", "0")]:
        out = _python(code + "\nprint(os.environ.get(%r))" % var, **{var: value}).split("\n")
        assert out[0].split()[0] == "None", (var, value, out)  # nothing set by lottery
        assert out[1] == value, (var, value, out)  # the user's value stands


def test_default_is_off_once_torch_is_imported():
    out = _python("import os, torch\nfrom lottery.core.threads import default_wait_policy\n"
                  "print(default_wait_policy(), os.environ.get('OMP_WAIT_POLICY'))")
    assert out.split("\n")[0] == "None None"


@pytest.mark.parametrize("entry", ["lottery.cli:train", "lottery.cli:retrain", "lottery.__main__"])
@pytest.mark.slow
def test_the_entry_points_set_it_before_torch_and_openmp_sees_it(entry):
    """The console scripts (lottery-train, lottery-retrain; `python -m lottery` too) set the variable when they run,
    before torch is imported, and libgomp reports it (OMP_DISPLAY_ENV prints what it read); a user's value stands.
    `--version` ends the entry point before torch loads; torch is imported after it, as a run would."""
    if ":" in entry:
        module, function = entry.split(":")
        call = f"from {module} import {function}\nsys.argv = [{function!r}, '--version']\n{function}()"
    else:
        call = f"sys.argv = ['lottery', '--version']\nimport {entry}"
    code = (f"import os, sys\ntry:\n" + "".join(f"    {line}\n" for line in call.split("\n")) +
            "except SystemExit:\n    pass\nassert 'torch' not in sys.modules\nimport torch\ntorch.ones(4).sum()\n"
            f"print(os.environ.get({NAME!r}))")
    out = _python(code, OMP_DISPLAY_ENV="VERBOSE")
    assert out.split("\n")[1] == VALUE, out  # the first line is the version
    spin = {"OMP_WAIT_POLICY": "0", "GOMP_SPINCOUNT": VALUE}[NAME]  # PASSIVE: libgomp spins 0 times
    assert f"GOMP_SPINCOUNT = '{spin}'" in out, out
    user = _python(code, OMP_DISPLAY_ENV="VERBOSE", OMP_WAIT_POLICY="ACTIVE")
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in user and "GOMP_SPINCOUNT = '30000000000'" in user, user
    assert user.split("\n")[1] == "ACTIVE", user


@pytest.mark.parametrize("module", ["lottery", "lottery.cli", "lottery.core.threads", "lottery.experiment"])
def test_importing_lottery_as_a_library_changes_no_environment_variable(module):
    """Only running an entry point sets the wait policy; importing lottery.cli loads no torch either, so that its
    entry points run before torch is loaded."""
    out = _python(f"import os, sys\nbefore = dict(os.environ)\nimport {module}\n"
                  "print(dict(os.environ) == before, 'torch' in sys.modules)")
    changed, torch_loaded = out.split("\n")[0].split()
    assert changed == "True", out
    if module in ("lottery.cli", "lottery.core.threads"):
        assert torch_loaded == "False", out


def test_set_threads_takes_threads_then_slurm_then_every_core(monkeypatch):
    import torch
    from omegaconf import OmegaConf
    from lottery.core.threads import describe, set_threads
    before = torch.get_num_threads()
    try:
        set_threads(OmegaConf.create({"threads": 3}))
        assert torch.get_num_threads() == 3
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
        set_threads(OmegaConf.create({"threads": None}))
        assert torch.get_num_threads() == 2
        set_threads(OmegaConf.create({"threads": 1}))
        assert torch.get_num_threads() == 1
        assert describe().startswith("1 CPU thread, ")
        torch.set_num_threads(2)
        assert describe().startswith("2 CPU threads, ")
    finally:
        torch.set_num_threads(before)


def test_small_training_steps_get_one_thread_only_when_threads_sleep(monkeypatch):
    """threads: null -> one thread for a step below SMALL_STEP_FLOPS when waiting threads sleep (lottery's default),
    in a SLURM job too (its sleeping threads pay the same wake-ups; larger steps get SLURM's count); never over
    `threads`, and not with a spinning wait policy the user chose."""
    from omegaconf import OmegaConf
    from lottery.core.threads import SMALL_STEP_FLOPS, default_threads
    null, two = OmegaConf.create({"threads": None}), OmegaConf.create({"threads": 2})
    for var in WAIT_VARIABLES + ("SLURM_CPUS_PER_TASK",):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert default_threads(null, SMALL_STEP_FLOPS / 10) == 1
    assert default_threads(null, SMALL_STEP_FLOPS * 10) is None  # every core
    assert default_threads(null, None) is None
    assert default_threads(two, SMALL_STEP_FLOPS / 10) == 2
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    assert default_threads(null, SMALL_STEP_FLOPS / 10) == 1
    assert default_threads(null, SMALL_STEP_FLOPS * 10) == 4
    assert default_threads(null, None) == 4
    assert default_threads(two, SMALL_STEP_FLOPS / 10) == 2
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    for var, value, one in [("OMP_WAIT_POLICY", "ACTIVE", False), ("GOMP_SPINCOUNT", "0", True),
                            ("GOMP_SPINCOUNT", "1000", False), ("KMP_BLOCKTIME", "0", True)]:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
        monkeypatch.setenv(var, value)
        assert default_threads(null, SMALL_STEP_FLOPS / 10) == (1 if one else None), (var, value)


def test_a_run_records_its_threads_and_warns_when_a_resume_changes_them(tmp_path, monkeypatch):
    """lottery-train on LeNet-300-100 (a small step) with threads: null runs on one thread, says so in its log and
    device.json; resuming that folder with threads=2 warns that the results are no longer bit-identical."""
    from conftest import run_cli
    import json
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # conftest's one thread would hide the default
    args = ["model=lenet_300_100", "dataset=synthetic", "pruning=none", "train.duration=4it", "train.eval_every=4it",
            "device=cpu", "train.progress=false", f"hydra.run.dir={tmp_path / 'run'}"]
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "1 CPU thread, OMP_WAIT_POLICY=PASSIVE" in log, log
    assert json.loads((tmp_path / "run" / "device.json").read_text())["threads"] == 1
    r = run_cli(*args, "threads=2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "cpu (torch" in log and "1 threads) and continues on cpu" in log and "differs in threads" in log, log


@pytest.mark.slow
def test_stacked_replicas_keep_every_core(tmp_path, monkeypatch):
    """R small networks trained stacked are one large step: threads: null leaves PyTorch's count (every core)."""
    from conftest import run_cli
    import json
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # conftest's one thread would hide the default
    every = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], capture_output=True,
                           text=True)
    assert int(every.stdout) > 1, "needs a machine with two cores or more"
    r = run_cli("model=lenet_300_100", "dataset=synthetic", "pruning=none", "train.duration=4it", "train.eval_every=4it",
                "device=cpu", "train.progress=false", "replicas=2", "replica_batching=stacked",
                f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, process=True)  # a new process's thread count
    assert r.returncode == 0, r.stderr[-3000:]
    for seed in (0, 1):
        info = json.loads((tmp_path / "run" / f"replicate_{seed}" / "device.json").read_text())
        assert info["threads"] == int(every.stdout), info


def test_a_run_in_this_process_gives_the_thread_count_back(tmp_path, monkeypatch):
    """run_experiment sets the run's threads and restores the caller's on leaving (a notebook, a test suite)."""
    import torch
    from conftest import tiny_cfg
    from lottery.experiment import run_experiment
    before = torch.get_num_threads()
    summary = run_experiment(tiny_cfg("pruning=none", "threads=2"), tmp_path / "run")
    assert summary[0]["device_info"]["threads"] == 2
    assert torch.get_num_threads() == before
    from lottery.core import threads as T
    state = {k: v for k, v in vars(T).items() if not k.startswith("__")}
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    torch.set_num_threads(2)
    try:  # a small step: trains on one thread, evaluates on two
        summary = run_experiment(tiny_cfg("pruning=none"), tmp_path / "run2")
        assert summary[0]["device_info"]["threads"] == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert {k: v for k, v in vars(T).items() if not k.startswith("__")} == state  # no thread count kept there


def test_evaluation_gets_every_core_back_only_where_small_steps_got_one(monkeypatch):
    import torch
    from omegaconf import OmegaConf
    from lottery.core import threads as T
    before = torch.get_num_threads()
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    try:
        torch.set_num_threads(2)
        chosen = T.set_threads(OmegaConf.create({"threads": None}), T.SMALL_STEP_FLOPS / 10)
        assert torch.get_num_threads() == 1 and chosen == T.Threads(1, 2)
        with T.evaluation_threads(chosen.evaluation):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
        for cfg, flops in [({"threads": 1}, T.SMALL_STEP_FLOPS / 10), ({"threads": None}, T.SMALL_STEP_FLOPS * 10)]:
            torch.set_num_threads(2)
            chosen = T.set_threads(OmegaConf.create(cfg), flops)
            n = torch.get_num_threads()
            with T.evaluation_threads(chosen.evaluation):
                assert torch.get_num_threads() == n, cfg  # the user's count, or every core already
        # a SLURM job of 3 CPUs: small steps train on one, evaluation gets the job's 3 (not the 2 torch had)
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
        torch.set_num_threads(2)
        chosen = T.set_threads(OmegaConf.create({"threads": None}), T.SMALL_STEP_FLOPS / 10)
        assert torch.get_num_threads() == 1
        with T.evaluation_threads(chosen.evaluation):
            assert torch.get_num_threads() == 3
        chosen = T.set_threads(OmegaConf.create({"threads": None}), T.SMALL_STEP_FLOPS * 10)
        assert torch.get_num_threads() == 3
        with T.evaluation_threads(chosen.evaluation):
            assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
