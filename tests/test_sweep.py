"""Multiruns: named sweeps, the combined table, failing jobs, and a preempted job under submitit that is requeued
and resumes where it stopped."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import CONF, fault, run_cli, stable

from lottery.config import register_configs

TINY = ["dataset=synthetic", "model=mlp", "model.hidden=[64,32]", "train.batch_size=32", "train.duration=80it",
        "train.eval_every=40it", "checkpoint.every=20it", "pruning.levels=2", "pruning.branches=[]",
        "train.progress=false", "device=cpu"]
ENV = {"OMP_NUM_THREADS": "1"}  # parallel jobs on two cores: one thread each


def multirun(sweep_dir: Path, *args: str, timeout: int = 600, env: dict | None = None):
    r = run_cli(*args, f"hydra.sweep.dir={sweep_dir}", cwd=sweep_dir.parent, env={**ENV, **(env or {})},
                timeout=timeout)
    r.log = r.stdout + r.stderr
    return r


def jobs(sweep_dir: Path) -> list[Path]:
    """Job folders in job order (Hydra names them <job num>_<overrides>)."""
    return sorted((d for d in sweep_dir.iterdir() if d.is_dir() and not d.name.startswith(".")),
                  key=lambda d: int(d.name.split("_")[0]))


def table(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def sweep_config(name: str):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[f"sweep={name}"], return_hydra_config=True)


@pytest.mark.parametrize("name, swept", [("init_x_seed", "init"), ("rate_x_seed", "pruning.rates.linear")])
def test_named_sweeps_are_multiruns_over_real_keys(name, swept):
    cfg = sweep_config(name)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.name == "lth_lenet_mnist"  # the experiment the grid is about
    params = cfg.hydra.sweeper.params
    assert set(params) == {swept, "seed"} and len(str(params.seed).split(",")) >= 3
    for value in str(params[swept]).split(","):  # every grid point composes
        if swept == "init":
            assert (CONF / "init" / f"{value}.yaml").exists(), value
        else:
            assert 0 < float(value) < 1 and swept.split(".")[-1] in cfg.pruning.rates


def test_named_sweep_runs_without_m_and_writes_combined_table(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # The grid shrunk from the command line: two initializers, one seed, tiny training.
    r = multirun(sweep_dir, "sweep=init_x_seed", "init=kaiming_normal,xavier_normal", "seed=0", *TINY,
                 "dataset.val_size=128")  # the experiment's 5000 is for MNIST
    assert r.returncode == 0, r.log
    folders = jobs(sweep_dir)
    assert len(folders) == 2, r.log
    for folder, init in zip(folders, ("kaiming_normal", "xavier_normal")):
        summary = json.loads((folder / "summary.json").read_text())
        assert [(x["level"], x["init"], x["experiment"]) for x in summary] == \
            [(0, init, "lth_lenet_mnist"), (1, init, "lth_lenet_mnist")]
    rows = table(sweep_dir)
    assert sorted((Path(x["run_dir"]).name, x["level"]) for x in rows) == \
        sorted((f.name, str(lv)) for f in folders for lv in (0, 1))
    assert {x["init"] for x in rows} == {"kaiming_normal", "xavier_normal"}


def test_failing_job_does_not_stop_the_sweep(tmp_path):
    sweep_dir = tmp_path / "sweep"
    r = multirun(sweep_dir, "-m", "optimizer.lr=-1,0.001", *TINY)
    assert r.returncode == 1, r.log  # after every job, naming the failed one (tests/test_commands.py)
    bad, good = jobs(sweep_dir)
    assert "optimizer.lr must be in (0, 1000000]" in (bad / "error.txt").read_text()
    assert not (bad / "summary.json").exists()
    assert len(json.loads((good / "summary.json").read_text())) == 2
    rows = table(sweep_dir)
    failed = [x for x in rows if x["error"]]
    assert [Path(x["run_dir"]).name for x in failed] == [bad.name]
    assert "optimizer.lr must be in (0, 1000000]" in failed[0]["error"]
    assert sorted(x["level"] for x in rows if not x["error"]) == ["0", "1"]


@pytest.mark.slow
def test_submitit_local_requeues_preempted_job_which_resumes(tmp_path):
    """Job 0 sends itself SIGUSR2 at step 50 of level 1: it checkpoints, submitit requeues it, the new process
    resumes at step 50 (level 0 is not trained again) and ends bit-identical to job 1, the same run uninterrupted."""
    sweep_dir = tmp_path / "sweep"
    # two jobs of the same run (train.progress defines no experiment), the fault only in job 0's folder
    args, env = fault(level=1, signal_at=50, where="*/0_*")
    r = multirun(sweep_dir, "-m", "launcher=submitit_local", *TINY, *args, "train.progress=false,true", env=env)
    assert r.returncode == 0, r.log
    preempted, plain = jobs(sweep_dir)
    log = (preempted / "train.log").read_text()
    assert "handing SIGUSR2 to the launcher" in log and "Requeued job" in log, log
    assert "level 1 ticket: resuming from step 50" in log, log
    assert log.count("level 0 ticket       weights remaining") == 1, "level 0 was trained again after the requeue"
    assert "Requeued job" not in (plain / "train.log").read_text()
    a = json.loads((preempted / "summary.json").read_text())
    b = json.loads((plain / "summary.json").read_text())
    assert len(a) == 2 and stable(a) == stable(b)
    rows = table(sweep_dir)
    assert sorted({Path(x["run_dir"]).name for x in rows}) == sorted(d.name for d in (preempted, plain))
    assert not any(x.get("error") for x in rows)


def test_job_folder_names_stay_within_the_file_system_limit():
    """Overrides past DIRNAME_BYTES: the name keeps its start and ends in a digest of the whole, so it is the same for
    the same overrides (a sweep resumes into it) and differs for others; short names are the overrides themselves."""
    from lottery.config import DIRNAME_BYTES, job_dirname
    short = ["optimizer.lr=0.1", "seed=1"]
    assert job_dirname(short) == "optimizer.lr-0.1__seed-1"
    long = [f"train.milestones=[{','.join(f'{i}it' for i in range(60))}]", "seed=1"]
    name = job_dirname(long)
    assert len(name.encode()) <= DIRNAME_BYTES and name.startswith("seed-1__train.milestones-0it+1it")
    assert name == job_dirname(list(reversed(long))) and name != job_dirname([*long[:1], "seed=2"])
    assert len(job_dirname(["x=" + "é" * 300]).encode()) <= DIRNAME_BYTES  # cut on a character, not inside one


def test_job_folder_names_are_shell_safe_and_readable():
    from lottery.config import job_dirname
    name = job_dirname(["train.milestones=[10it,20it]", "optimizer.lr=-0.1", "init=custom/mine", "model.hidden=[64, 32]",
                        "pruning.branches=[reinit]", "name=x"])  # the last two define no experiment
    assert name == "init-custom_mine__model.hidden-64+32__optimizer.lr--0.1__train.milestones-10it+20it"
    assert not set(name) & set("[],=*?'\" ;&|$`()<>{}!#/")


def test_a_sweep_folder_named_the_old_way_resumes(tmp_path):
    """A job folder of an earlier version (`0_seed=1`) is found by the same sweep again, not trained anew."""
    from lottery.config import job_dirname, job_dirname_v1
    sweep_dir = tmp_path / "sweep"
    args = [*TINY, "seed=1"]
    r = multirun(sweep_dir, "-m", *args)
    assert r.returncode == 0, r.log
    [new] = jobs(sweep_dir)
    assert new.name == f"0_{job_dirname(args)}" and "__seed-1__" in new.name
    old = sweep_dir / f"0_{job_dirname_v1(args)}"
    assert ",seed=1," in old.name
    new.rename(old)
    before = (old / "summary.json").read_bytes()
    r = multirun(sweep_dir, "-m", *args)
    assert r.returncode == 0, r.log
    assert jobs(sweep_dir) == [old] and "nothing was trained" in r.log
    assert (old / "summary.json").read_bytes() == before
