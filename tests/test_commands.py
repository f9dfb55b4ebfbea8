"""Commands as the documentation (README.md, docs/) documents them: a multirun's exit status, one-line errors for a
config group's unknown option, each entry point's own --help, and scripts/gpu_check.py's quick mode."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lottery.cli import unknown_option

from conftest import CONF, PLUGINS, REPO, TINY, run_cli

ENV = {"OMP_NUM_THREADS": "1"}


# --- a multirun in which a job failed -----------------------------------------------------------------------------

def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted((d for d in sweep_dir.iterdir() if d.is_dir() and not d.name.startswith(".")),
                  key=lambda d: int(d.name.split("_")[0]))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("launcher, bad", [
    ("local", "optimizer.lr=-1"),  # a bad value, refused before any work, in this process
    # a diverged job, in another process: only its folder tells
    pytest.param("submitit_local", "optimizer.lr=1e6", marks=pytest.mark.slow),
])
@pytest.mark.slow
def test_multirun_with_a_failed_job_exits_1_after_finishing_the_others(tmp_path, launcher, bad):
    sweep_dir = tmp_path / "sweep"
    key, value = bad.split("=")
    run = ["-m", f"launcher={launcher}", *TINY, "optimizer=sgd", "pruning.levels=2", "pruning.branches=[]",
           f"hydra.sweep.dir={sweep_dir}"]
    r = run_cli(*run, f"{key}={value},0.01", cwd=tmp_path, env=ENV)
    assert r.returncode == 1, r.stdout + r.stderr
    failed, finished = job_dirs(sweep_dir)
    assert (failed / "error.txt").exists() and not (finished / "error.txt").exists()
    assert len(json.loads((finished / "summary.json").read_text())) == 2  # the other job ran to its end
    assert (sweep_dir / "summary.csv").exists()  # and the sweep's table was written before the exit
    last = error_lines(r.stderr)[-1]
    assert last.startswith(f"error: 1 job of the multirun in {sweep_dir} failed: {failed.name} ("), last
    assert finished.name not in last

    # the same sweep folder again, with only the job that works: the old job's error.txt fails nothing now
    r = run_cli(*run, f"{key}=0.01", cwd=tmp_path, env=ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not any("of the multirun" in line for line in error_lines(r.stderr))


@pytest.mark.parametrize("launcher", ["local", pytest.param("submitit_local", marks=pytest.mark.slow)])
def test_multirun_job_refused_its_folder_counts_as_failed(tmp_path, launcher):
    """A job whose folder holds another experiment writes nothing there, but the command still exits 1."""
    sweep = [f"launcher={launcher}", *TINY, "pruning=none", f"hydra.sweep.dir={tmp_path / 'sweep'}",
             "hydra.sweep.subdir=job"]
    assert run_cli("-m", "seed=0", *sweep, cwd=tmp_path, env=ENV).returncode == 0
    before = sorted(p.name for p in (tmp_path / "sweep" / "job").iterdir())
    r = run_cli("-m", "seed=1", *sweep, cwd=tmp_path, env=ENV)
    assert r.returncode == 1, r.stdout + r.stderr
    assert sorted(p.name for p in (tmp_path / "sweep" / "job").iterdir()) == before  # not even error.txt
    assert error_lines(r.stderr)[-1].startswith(f"error: 1 job of the multirun in {tmp_path / 'sweep'} failed: job (")


# --- an unknown option of a config group: one line, before Hydra starts --------------------------------------------

GROUPS = ["model", "dataset", "init", "optimizer", "criterion", "method", "experiment", "sweep", "launcher", "logger",
          "pruning"]


@pytest.mark.parametrize("group", GROUPS)
def test_unknown_option_of_every_group_is_one_line_naming_the_options(group):
    options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    assert options, group
    assert unknown_option([f"{group}=nope"]) == f"unknown {group} 'nope'; accepted: {', '.join(options)}"
    assert unknown_option([f"{group}={options[0]}"]) is None
    assert unknown_option(["-m", f"{group}={options[-1]},nope2"]) == \
        f"unknown {group} 'nope2'; accepted: {', '.join(options)}"


def test_options_follow_hydra_searchpath_and_leave_the_rest_to_hydra():
    user_conf = f"hydra.searchpath=[file://{PLUGINS / 'conf'}]"
    assert unknown_option(["dataset=stripes"]).startswith("unknown dataset 'stripes'; accepted: cifar10, mnist")
    assert unknown_option([user_conf, "dataset=stripes"]) is None  # a user's conf folder (tests/plugins/conf)
    assert unknown_option([user_conf, "dataset=nope"]) == "unknown dataset 'nope'; accepted: cifar10, mnist, " \
                                                          "stripes, synthetic"
    for args in (["model.name=resnet99"], ["experiment=null"], ["~experiment"], ["hydra/launcher=nope"],
                 ["model=choice(conv2,conv4)"], ["--cfg", "job"], ["model=conv2", "--info", "defaults"]):
        assert unknown_option(args) is None, args  # keys, no option, deletion, Hydra's own groups, sweep functions


@pytest.mark.parametrize("entry", ["lottery.cli:train", "lottery.cli:retrain"])
def test_unknown_option_on_the_command_line(tmp_path, entry):
    r = run_cli("model=resnet99", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, entry=entry)
    assert r.returncode == 2
    assert r.stderr == "error: unknown model 'resnet99'; accepted: conv2, conv4, conv6, deep_mlp, lenet_300_100, " \
                       "mlp, resnet20, vgg11, vgg16, vgg19\n"
    assert not (tmp_path / "run").exists()


# --- each entry point's own help --------------------------------------------------------------------------------

def test_retrain_help_says_ticket_is_required_and_how_overrides_work(tmp_path):
    r = run_cli("--help", cwd=tmp_path, entry="lottery.cli:retrain")
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert text.startswith("lottery-retrain ticket=PATH [overrides]")
    assert "ticket=PATH   required" in text
    assert "Every setting comes from the ticket's own run config" in text
    assert "only the keys you give on the command line replace the ticket's" in text
    assert "model: conv2, conv4" in text and "optimizer: adam, adamw, sgd" in text  # the groups it takes
    assert "find winning lottery tickets" not in text  # not lottery-train's text


@pytest.mark.slow
def test_train_help_and_python_m(tmp_path):
    for cmd in ([sys.executable, "-m", "lottery", "--help"],
                [sys.executable, "-c", "from lottery.cli import train; train()", "--help"]):
        r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("lottery-train: find winning lottery tickets")
        assert "model: conv2, conv4" in r.stdout and "Examples:" in r.stdout


# --- scripts/gpu_check.py --quick -------------------------------------------------------------------------------

@pytest.mark.slow
def test_gpu_check_quick_on_the_cpu_in_under_two_minutes(tmp_path):
    """docs/gpus.md: `--device cpu` is the dry run and `--quick` a short one. Run as a user would (no
    OMP_NUM_THREADS), with every check, Conv-2's included (it once ran past its 600 s time-out): the script imports,
    its CPU-runnable checks pass and the GPU rows say SKIP. Measured: 40-80 s on the busy 2-core CPU."""
    out = tmp_path / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--device", "cpu", "--quick",
                        "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    rows = {row["check"]: row["status"] for row in json.loads(out.read_text())["rows"]}
    # every check that can run on a CPU passes; the GPU-only ones say SKIP
    assert rows == {"device": "INFO", "bad_device": "PASS", "batches_cpu": "PASS", "fp32_conv": "PASS",
                    "fused_optimizer": "PASS", "eval_chunks": "PASS", "lenet_repeat": "PASS", "lenet_resume": "PASS",
                    "lenet_no_sync": "SKIP", "conv2_repeat": "PASS", "conv2_resume": "PASS", "conv2_no_sync": "SKIP",
                    "bf16": "SKIP", "compile": "SKIP", "semi_structured": "SKIP"}, rows
    assert "PASS: all checks that ran" in r.stdout
    assert seconds < 120, f"gpu_check --device cpu --quick took {seconds:.0f} s"


# --- the pruning-at-initialization ResNet-20 experiment trains as lmc_resnet20_cifar10 ---------------------------

def test_pai_resnet20_trains_and_prunes_as_lmc_resnet20():
    """docs/pruning-at-init.md: pai_resnet20_cifar10 is ResNet-20 "as lmc_resnet20_cifar10" (open_lth's setup), so
    IMP's runs of the two experiments are the same runs; only the levels, branches and name differ."""
    from omegaconf import OmegaConf

    from conftest import make_cfg
    pai, lmc = (OmegaConf.to_container(make_cfg(f"experiment={e}"), resolve=True)
                for e in ("pai_resnet20_cifar10", "lmc_resnet20_cifar10"))
    for key in ("model", "dataset", "init", "optimizer", "train"):
        assert pai[key] == lmc[key], key
    differ = {k for k in pai["pruning"] if pai["pruning"][k] != lmc["pruning"][k]}
    assert differ == {"levels", "branches"}, differ
    assert (pai["init"]["batchnorm"], pai["dataset"]["val_size"], pai["pruning"]["exclude"]) == ("uniform", 0, [])
