"""The command line, consistent across entry points (issue 32): --version, a typo's nearest key, every entry point's
settings, one line for a missing SLURM controller and a broken torchvision; the files a user looks for first."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml

from lottery import __version__
from lottery.config import conf_dir, schema
from lottery.core.commandline import BROKEN_INSTALL_EXIT, unknown_key
from lottery.launch.slurm import NO_CLUSTER_EXIT

from conftest import REPO, TINY, run_cli

ENV = {"OMP_NUM_THREADS": "1"}


def errors(r) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.startswith("error:")]


def test_version_names_lottery_and_torch(tmp_path):
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^version = "(.+)"$', pyproject, re.M).group(1) == __version__
    for entry in ("lottery.cli:train", "lottery.cli:retrain", "lottery.init_study:main", "lottery.report:main"):
        r = run_cli("--version", cwd=tmp_path, entry=entry)
        assert r.returncode == 0 and re.fullmatch(rf"lottery {re.escape(__version__)} \(torch \S+, torchvision \S+, "
                                                  rf"Python \S+\)\n", r.stdout), r.stdout + r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["train.duraton=300it"], "unknown key 'train.duraton'; did you mean train.duration?"),
    (["-m", "seed=1,2", "trian.duration=1it"], "unknown key 'trian.duration'; did you mean train.duration?"),
    (["model=conv2", "model.widht=3"], "unknown key 'model.widht'; did you mean model.width?"),
    (["experiment=lth_lenet_mnist", "pruning.levle=3"], "unknown key 'pruning.levle'; did you mean pruning.levels?"),
    (["xyzzy=3"], "unknown key 'xyzzy'; `--cfg job` prints every key"),
    (["model.nme=resnet20"], "unknown key 'model.nme'; did you mean model.name?"),
])
def test_a_mistyped_key_names_the_nearest_one(args, message):
    assert unknown_key(args, conf_dir(), "config", schema(struct=True)) == message


@pytest.mark.parametrize("args", [["threads=1"], ["dataset.anything=1"], ["optimizer.momentum=0.9"],
                                  ["pruning.rates.linear=0.2"], ["branch.lmc.points=3"], ["+new=1"], ["ticket=x"],
                                  ["model.name=resnet99"]])  # a value (???) in the schema: checked later
def test_keys_that_exist_or_are_checked_later_pass(args):
    assert unknown_key(args, conf_dir(), "config", schema(struct=True)) is None


def test_the_typo_is_one_line_through_the_command(tmp_path):
    r = run_cli(*TINY, "train.duraton=300it", cwd=tmp_path, env=ENV)
    assert r.returncode == 2 and errors(r) == ["error: unknown key 'train.duraton'; did you mean train.duration?"]
    assert r.stderr.count("\n") == 1 and list(tmp_path.iterdir()) == []


def test_init_study_takes_threads(tmp_path):
    study = ["seeds=1", "variances=[1.0]", "model.depth=3", "model.width=20", "batch_size=50"]
    r = run_cli(*study, "threads=1", f"hydra.run.dir={tmp_path / 'study'}", cwd=tmp_path, env=ENV,
                entry="lottery.init_study:main")
    assert r.returncode == 0 and (tmp_path / "study" / "init_study.csv").exists(), r.stdout + r.stderr
    r = run_cli(*study, "thread=1", cwd=tmp_path, env=ENV, entry="lottery.init_study:main")
    assert r.returncode == 2 and errors(r) == ["error: unknown key 'thread'; did you mean threads?"], r.stderr


@pytest.mark.slow
def test_slurm_without_a_controller_is_one_line(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    bin_dir = tmp_path / "bin"  # SLURM's commands, with a controller that does not answer
    bin_dir.mkdir()
    for name in ("sbatch", "srun", "squeue"):
        (bin_dir / name).write_text("#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller "
                                    "(connect failure)' >&2\nexit 1\n")
        (bin_dir / name).chmod(0o755)
    sweep = tmp_path / "sweep"
    r = run_cli("-m", *TINY, "launcher=slurm", "seed=1", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
                env={**ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert r.returncode == NO_CLUSTER_EXIT, r.stdout + r.stderr
    assert errors(r) == ["error: launcher=slurm: the SLURM controller cannot be reached (squeue: slurm_load_jobs "
                         "error: Unable to contact slurm controller (connect failure)); check scontrol ping, or use "
                         "launcher=local"] and "Traceback" not in r.stderr
    assert not sweep.exists()


def test_a_broken_torchvision_is_one_line_where_a_run_needs_it(tmp_path):
    """torchvision is imported where the data needs it (CIFAR-10, downloads), not at every start-up: a run on
    synthetic data does not need it, one on CIFAR-10 gets the one line."""
    fake = tmp_path / "fake" / "torchvision"  # what a torchvision built for another torch raises on import
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(fake.parent), str(REPO)])}
    r = run_cli(*TINY, "hydra.run.dir=synthetic", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    (tmp_path / "data").mkdir()
    r = run_cli(*TINY, "dataset=cifar10", "dataset.root=data", "hydra.run.dir=cifar", cwd=tmp_path, env=env)
    assert r.returncode == BROKEN_INSTALL_EXIT, r.stdout + r.stderr
    [line] = errors(r)
    assert line.startswith("error: torchvision cannot be imported (RuntimeError: operator torchvision::nms does not "
                           "exist); installed: torch ") and "pip install --force-reinstall torch torchvision" in line
    assert "Traceback" not in r.stderr


def test_a_run_on_synthetic_data_starts_and_ends_light(tmp_path):
    """Two costs every command paid and none needs: torchvision's import (its models and ops: 0.2 s; torch._dynamo,
    most of its import time, comes with torch.optim's first optimizer anyway) where the data does not use it, and
    CPython's last garbage collection at exit (0.8 s of a 3.4 s run): the objects are frozen first (gc.freeze, an
    atexit handler). The handler registered here before the run's runs after its handlers."""
    code = ("import atexit, gc, sys\n"
            "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"
            "from lottery.cli import train\n"
            "sys.argv = ['lottery-train', *sys.argv[1:]]\n"
            "try:\n    train()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('torchvision imported:', 'torchvision' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, *TINY, "hydra.run.dir=r"], cwd=tmp_path, capture_output=True,
                       text=True, env={**ENV, "PYTHONPATH": str(REPO)}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[-2:] == ["torchvision imported: False", "frozen at exit: True"], r.stdout


def test_license_citation_changelog():
    assert "MIT License" in (REPO / "LICENSE").read_text()
    assert "Copyright (c) 2026 the lottery authors" in (REPO / "LICENSE").read_text()
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["version"] == __version__ and cff["license"] == "MIT"
    assert isinstance(cff["message"], str) and isinstance(cff["title"], str)
    assert cff["authors"] and all("name" in a or "family-names" in a for a in cff["authors"])
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(cff["date-released"]))
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert changelog.startswith("# Changelog") and "## [Unreleased]" in changelog
    assert "Issue 9 (extension points)" in changelog  # the history that README's changelog section held


def test_the_gpu_scripts_output_is_ignored():
    r = subprocess.run(["git", "check-ignore", "gpu_check.json", "gpu_replicas.json"], cwd=REPO, capture_output=True,
                       text=True)
    if r.returncode == 128:
        pytest.skip("not a git checkout")
    assert r.stdout.split() == ["gpu_check.json", "gpu_replicas.json"]
