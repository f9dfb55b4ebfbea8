"""Extension points: a user's criterion and branches registered from their own module run through `lottery-train`
with command-line overrides only; bad criterion or branch settings fail before any work."""
import json
import os

import pytest
import torch

from lottery.core.files import load_torch
from lottery.experiment.check import checked
from lottery.experiment.ticket import load_ticket

from conftest import REPO, TINY, run_cli, tiny_cfg

PLUGINS = REPO / "tests" / "plugins"
ENV = {"PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_user_criterion_and_branch_from_own_module_via_cli(tmp_path):
    run = tmp_path / "ext"
    out = run_cli(*TINY, "imports=[my_lottery_ext]", "pruning.levels=2", "pruning.criterion.name=smallest_kept",
                  "+pruning.criterion.power=2.0", "pruning.branches=[other_data,two_copies]",
                  "+branch.other_data.offset=3", f"hydra.run.dir={run}", cwd=tmp_path, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    s = {(r["level"], r["branch"]): r for r in summary}
    # the criterion ran: level 1 kept the smallest trained weights of level 0, tensor by tensor
    final0 = load_torch(run / "levels" / "level_0" / "final.pt")
    masks = load_ticket(run / "levels" / "level_1" / "ticket.pt").masks
    for name, m in masks.items():
        w = final0[name].abs()
        assert 0 < m.sum() < m.numel()
        assert w[m].max() <= w[~m].min(), name
    # the branch ran on the ticket's masks with its own data order (branch.other_data.offset)
    assert s[(1, "other_data")]["layer_density"] == s[(1, "ticket")]["layer_density"]
    assert s[(1, "other_data")]["test_loss"] != s[(1, "ticket")]["test_loss"]
    assert (0, "other_data") not in s  # pruned levels only
    # a two-unit branch with an analysis: at level 0 too (dense=True), units in their own folders, one record
    for level in (0, 1):
        rec = s[(level, "two_copies")]
        assert rec["copies"] == 2 and 0 <= rec["mean_copy_accuracy"] <= 1
        for i in range(2):
            unit = run / "levels" / f"level_{level}" / "two_copies" / f"copy_{i}"
            assert (unit / "result.json").exists() and (unit / "final.pt").exists()
    # the report labels branches from the registry (falls back to the name for branches it cannot import)
    rep = run_cli(str(run), "--out", str(tmp_path / "rep"), entry="lottery.report:main", cwd=tmp_path, env=ENV)
    assert rep.returncode == 0, rep.stderr[-2000:]


@pytest.mark.parametrize("overrides, message", [
    (["pruning.criterion.name=snap"], "unknown pruning criterion 'snap'; accepted: grasp, magnitude, magnitude_init, "
                                      "random, "),  # (a test's own criteria may follow)
    (["+pruning.criterion.batches=3"], "unknown key pruning.criterion.batches for pruning criterion 'magnitude'; accepted: none"),
    (["pruning.branches=[reinit,mine]"], "unknown pruning.branches entry 'mine'; accepted: "),
    (["pruning.branches=[retrain]"], "unknown pruning.branches entry 'retrain'"),
    (["+branch.reinit.x=1", "pruning.branches=[reinit]"], "branch 'reinit' takes no settings"),
    (["pruning.one_shot=true"], "pruning.one_shot=true prunes straight to pruning.target, which is not set"),
    (["pruning=global", "+pruning.rates.linear=0.3"], "pruning.rates and pruning.layer_rates are per-layer rates"),
    (["imports=[no_such_module_here]"], "imports entry 'no_such_module_here' cannot be imported"),
])
def test_bad_extension_settings_fail_validation(overrides, message):
    with pytest.raises(ValueError) as e:
        checked(tiny_cfg(*overrides))
    assert message in str(e.value)


def test_bad_criterion_setting_is_one_error_line_before_any_work(tmp_path):
    run = tmp_path / "bad"
    out = run_cli(*TINY, "+pruning.criterion.batches=3", f"hydra.run.dir={run}", cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == ("error: unknown key pruning.criterion.batches for pruning criterion "
                                                   "'magnitude'; accepted: none")
    assert not (run / "config.yaml").exists()


def test_typed_criterion_settings_in_process():
    from dataclasses import dataclass

    from lottery.pruning import CRITERIA, criterion_settings, register_criterion

    @dataclass
    class S:
        batches: int = 1

    if "typed_test_criterion" not in CRITERIA:
        register_criterion("typed_test_criterion", settings=S)(lambda model, masks, **kw: {})
    assert criterion_settings({"name": "typed_test_criterion", "batches": "4"}) == {"batches": 4}
    with pytest.raises(ValueError, match="bad setting for pruning criterion 'typed_test_criterion'"):
        criterion_settings({"name": "typed_test_criterion", "batches": "many"})
    with pytest.raises(ValueError, match="already registered"):
        register_criterion("magnitude")(lambda model, masks, **kw: {})


def test_rounds_reach_the_same_count_and_one_round_is_plain(tmp_path):
    """pruning.rounds splits a step into exponentially spaced rounds that end at exactly the same count."""
    one = tiny_cfg("pruning.target=0.1", "pruning.one_shot=true", "pruning.branches=[]")
    from lottery.experiment import run_experiment
    a = run_experiment(one, tmp_path / "one")
    b = run_experiment(tiny_cfg("pruning.target=0.1", "pruning.one_shot=true", "pruning.branches=[]",
                                "pruning.rounds=5"), tmp_path / "five")
    assert a[1]["weights_remaining_count"] == b[1]["weights_remaining_count"]
    assert a[1]["layer_density"] == b[1]["layer_density"]  # layerwise: per-tensor counts are exact either way
    ma = load_ticket(tmp_path / "one" / "levels" / "level_1" / "ticket.pt").masks
    mb = load_ticket(tmp_path / "five" / "levels" / "level_1" / "ticket.pt").masks
    # magnitude on fixed weights: re-scoring between rounds changes nothing, so the masks agree too
    assert all(torch.equal(ma[n], mb[n]) for n in ma)


def test_when_at_init_scores_the_weights_a_level_starts_from(tmp_path):
    """pruning.when=at_init: level 1's masks come from the initial weights (magnitude at initialization), not from
    level 0's trained ones; level 0 still trains the dense network as the baseline."""
    from lottery.experiment import run_experiment
    run_experiment(tiny_cfg("pruning.levels=2", "pruning.when=at_init", "pruning.branches=[]"), tmp_path / "r")
    init = load_torch(tmp_path / "r" / "init.pt")
    final0 = load_torch(tmp_path / "r" / "levels" / "level_0" / "final.pt")
    masks = load_ticket(tmp_path / "r" / "levels" / "level_1" / "ticket.pt").masks
    for name, m in masks.items():
        assert init[name].abs()[m].min() >= init[name].abs()[~m].max(), name
    assert any(final0[n].abs()[m].min() < final0[n].abs()[~m].max() for n, m in masks.items())


USER_DATA = ["imports=[my_lottery_ext]", f"hydra.searchpath=[file://{PLUGINS / 'conf'}]", "dataset=stripes",
             "optimizer=signsgd", "dataset.noise=0.3", "optimizer.momentum=0.5", "optimizer.lr=0.003", "model=mlp",
             "model.hidden=[32]", "train.duration=60it", "train.eval_every=30it", "train.batch_size=32",
             "train.progress=false", "checkpoint.every=30it", "pruning.levels=2", "pruning.branches=[reinit]"]


@pytest.mark.slow
def test_user_dataset_and_optimizer_from_own_module_single_and_replicas(tmp_path):
    """A user's dataset (its own setting dataset.noise, 4 classes, 1x8x8 inputs) and optimizer (its own setting
    optimizer.momentum) from their module: selected as config group options from their own conf folder, they run
    through lottery-train and through replicas=2 (each replicate exactly as its single run: interleaved)."""
    one = tmp_path / "one"
    out = run_cli(*USER_DATA, f"hydra.run.dir={one}", cwd=tmp_path, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = (one / "config.yaml").read_text()
    assert "name: stripes" in cfg and "noise: 0.3" in cfg and "name: signsgd" in cfg and "momentum: 0.5" in cfg
    summary = json.loads((one / "summary.json").read_text())
    assert [(r["level"], r["branch"]) for r in summary] == [(0, "ticket"), (1, "ticket"), (1, "reinit")]
    assert summary[0]["dataset"] == "stripes" and summary[0]["test_accuracy"] > 0.5  # 4 classes: chance is 0.25
    # the model was built for the dataset's own input shape and classes
    assert tuple(load_torch(one / "init.pt")["out.weight"].shape) == (4, 32)
    assert tuple(load_torch(one / "init.pt")["hidden.0.weight"].shape) == (32, 64)
    # the setting reaches the dataset: other noise, other data, other results
    noisy = tmp_path / "noisy"
    assert run_cli(*USER_DATA, "dataset.noise=2.0", "pruning.levels=1", f"hydra.run.dir={noisy}", cwd=tmp_path,
                   env=ENV).returncode == 0
    assert json.loads((noisy / "summary.json").read_text())[0]["test_accuracy"] < summary[0]["test_accuracy"]

    many = tmp_path / "many"
    out = run_cli(*USER_DATA, "replicas=2", "replica_batching=interleaved", f"hydra.run.dir={many}", cwd=tmp_path,
                  env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    rep0 = json.loads((many / "replicate_0" / "summary.json").read_text())
    assert [{k: v for k, v in r.items() if k not in ("device_info", "wall_time_s")} for r in rep0] == \
        [{k: v for k, v in r.items() if k not in ("device_info", "wall_time_s")} for r in summary]
    rep1 = json.loads((many / "replicate_1" / "summary.json").read_text())
    assert rep1[0]["replicate"] == 1 and rep1[0]["test_loss"] != rep0[0]["test_loss"]
    # stacked too (the default layout for an MLP on a CPU)
    out = run_cli(*USER_DATA, "replicas=2", f"hydra.run.dir={tmp_path / 'stacked'}", cwd=tmp_path, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "batched (stacked)" in out.stdout + out.stderr


@pytest.mark.parametrize("overrides, message", [
    (["dataset.noise=-1"], "dataset.noise must be >= 0, got -1"),
    (["+dataset.colour=red"], "unknown key dataset.colour for dataset 'stripes'; accepted: noise, train_examples"),
    (["optimizer.momentum=fast"], "bad setting for optimizer 'signsgd'"),
    (["+optimizer.betas=[0.9,0.99]"], "unknown key optimizer.betas for optimizer 'signsgd'; accepted: momentum"),
])
@pytest.mark.slow
def test_user_dataset_and_optimizer_settings_are_checked_before_any_work(tmp_path, overrides, message):
    run = tmp_path / "bad"
    out = run_cli(*USER_DATA, *overrides, f"hydra.run.dir={run}", cwd=tmp_path, env=ENV)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr.strip().splitlines()[-1]
    assert not (run / "config.yaml").exists()
