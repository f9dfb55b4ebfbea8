"""The command line as a user meets it: help, config composition, clear errors, user initializers."""
import json
import textwrap

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from lottery.experiment.check import checked

from conftest import CONF, TINY, make_cfg, run_cli


def test_help_lists_config_groups(tmp_path):
    out = run_cli("--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for group in ("model:", "dataset:", "init:", "optimizer:", "pruning:", "logger:", "experiment:", "launcher:"):
        assert group in out.stdout
    assert "lenet_300_100, mlp" in out.stdout and "kaiming_normal" in out.stdout


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_validates(experiment, tmp_path):
    cfg = make_cfg(f"experiment={experiment}", f"dataset.root={tmp_path}")
    checked(cfg)
    assert cfg.name == experiment
    text = (CONF / "experiment" / f"{experiment}.yaml").read_text()
    assert "arXiv" in text or "ICML" in text or "ICLR" in text  # each states its source


def test_paper_settings_in_experiments():
    cfg = make_cfg("experiment=lth_lenet_mnist")
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.train.batch_size, cfg.train.duration) == \
        ("adam", 1.2e-3, 60, "50000it")
    assert dict(cfg.pruning.rates) == {"linear": 0.2, "conv": 0.1, "output": 0.1}
    assert cfg.init.name == "xavier_normal"
    conv6 = make_cfg("experiment=lth_conv6_cifar10")
    assert conv6.pruning.rates.conv == 0.15 and conv6.optimizer.lr == 3e-4 and conv6.train.duration == "30000it"
    resnet = make_cfg("experiment=lmc_resnet20_cifar10")
    assert resnet.pruning.scope == "global" and resnet.pruning.rewind == "500it" and resnet.optimizer.name == "sgd"
    assert list(resnet.train.milestones) == ["32000it", "48000it"] and resnet.train.batch_size == 128


def test_misspelled_key_fails_at_compose_time():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        make_cfg("train.batch_sise=10")
    with pytest.raises((ConfigCompositionException, ValidationError)):
        make_cfg("train.batch_size=ten")


@pytest.mark.parametrize("override, message", [
    ("model=resnet99", "unknown model 'resnet99'; accepted: conv2, conv4, conv6, deep_mlp, lenet_300_100"),
    ("model.name=resnet99", "unknown model 'resnet99'; accepted: conv2, conv4, conv6, deep_mlp, lenet_300_100"),
    ("optimizer.lr=-0.1", "optimizer.lr must be in (0, 1000000], got -0.1"),
    ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
    ("dataset.root=/no/such/folder", "dataset.root '/no/such/folder' does not exist"),
    ("init.name=he", "unknown init 'he'; accepted:"),
    ("pruning.branches=[reinit,rnd]", "unknown pruning.branches entry 'rnd'; accepted: reinit, random_prune, shuffle"),
    ("train.duration=3epochs", "bad train.duration '3epochs'"),
])
def test_bad_values_fail_before_work_with_clear_message(override, message, tmp_path):
    out = run_cli(override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "summary.json").exists() and not (tmp_path / "run" / "init.pt").exists()


def test_missing_data_without_download_says_where_and_how(tmp_path):
    (tmp_path / "empty").mkdir()
    out = run_cli(f"dataset.root={tmp_path / 'empty'}", "dataset.download=false", f"hydra.run.dir={tmp_path / 'r'}",
                  cwd=tmp_path)
    assert out.returncode != 0
    assert str(tmp_path / "empty") in out.stderr and "dataset.root=" in out.stderr


@pytest.mark.slow
def test_user_initializer_from_command_line(tmp_path):
    (tmp_path / "my_inits.py").write_text(textwrap.dedent("""
        import torch
        def constant_small(weight, generator=None, gain=None):
            with torch.no_grad():
                weight.fill_(0.001 * (gain or 1.0))
    """))
    run = tmp_path / "run"
    out = run_cli(*TINY, "pruning=none", "init=custom", "init._target_=my_inits.constant_small", "init.gain=2.0",
                  f"hydra.run.dir={run}", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    import torch
    init = torch.load(run / "init.pt")
    assert torch.all(init["hidden.0.weight"] == 0.002) and torch.all(init["out.weight"] == 0.002)
    summary = json.loads((run / "summary.json").read_text())
    assert summary[0]["init"] == "my_inits.constant_small"


@pytest.mark.slow
def test_dense_training_mode_via_python_m(tmp_path):
    import subprocess
    import sys
    run = tmp_path / "dense"
    out = subprocess.run([sys.executable, "-m", "lottery", *TINY, "pruning=none", f"hydra.run.dir={run}"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert [(r["level"], r["branch"], r["weights_remaining"]) for r in summary] == [(0, "ticket", 1.0)]
    assert (run / "train.log").exists() and (run / "config.yaml").exists()


def test_retrain_cli_overrides_only_what_is_given(tmp_path):
    run = tmp_path / "imp"
    assert run_cli(*TINY, "pruning.levels=2", "pruning.branches=[]", f"hydra.run.dir={run}",
                   cwd=tmp_path).returncode == 0
    ticket = run / "levels" / "level_1" / "ticket.pt"
    out = run_cli(f"ticket={ticket}", "optimizer.lr=0.01", "train.progress=false", f"hydra.run.dir={tmp_path / 're'}",
                  cwd=tmp_path, entry="lottery.cli:retrain")
    assert out.returncode == 0, out.stderr
    cfg = (tmp_path / "re" / "config.yaml").read_text()
    assert "lr: 0.01" in cfg and "duration: 60it" in cfg and "name: synthetic" in cfg  # the rest from the ticket
    summary = json.loads((tmp_path / "re" / "summary.json").read_text())
    assert summary[0]["branch"] == "retrain" and summary[0]["level"] == 1
