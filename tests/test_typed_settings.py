"""Below the session's start the run reads typed settings, not a DictConfig (issue 28): the training loop gets a
`Training` (the `train` settings and the optimizer's node), a branch's `ctx.cfg` is the typed config
(lottery.config.Config, whose open nodes are read-only `Node`s), the pruning gets the typed `pruning` settings. A
user's branch that reads `ctx.cfg.seed` keeps working. tests/test_architecture.py keeps the config library out of
those packages' imports; this test follows what a real run hands them."""
from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Mapping

import pytest
from omegaconf import OmegaConf

import lottery.experiment.units as units_module
import lottery.pruning as pruning_module
from lottery.branches import BRANCHES, Unit
from lottery.branches.base import Branch
from lottery.config import Config, Node, PruningConfig, TrainConfig, plain_values, typed
from lottery.experiment import run_experiment
from lottery.experiment.check import checked
from lottery.training import Training

from conftest import tiny_cfg


def config_objects(value, where: str = "") -> list[str]:
    """Where below `value` (dataclasses, mappings, lists) an OmegaConf object is."""
    if OmegaConf.is_config(value):
        return [where or "(itself)"]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [w for f in dataclasses.fields(value) for w in config_objects(getattr(value, f.name), f"{where}.{f.name}")]
    if isinstance(value, Mapping):
        return [w for k, v in value.items() for w in config_objects(v, f"{where}.{k}")]
    if isinstance(value, (list, tuple)):
        return [w for i, v in enumerate(value) for w in config_objects(v, f"{where}[{i}]")]
    return []


def test_the_loop_the_branches_and_the_pruning_receive_typed_settings(tmp_path, monkeypatch):
    seen = {"loop": [], "branch": [], "pruning": []}

    def probe(ctx):  # a user's branch as README shows them: reads ctx.cfg
        seen["branch"].append((ctx.cfg, ctx.cfg.seed, ctx.cfg.dataset.name, ctx.cfg.train.batch_size,
                               ctx.cfg.optimizer["name"], ctx.cfg.pruning.criterion.name))
        return [Unit(ctx.ticket_model(), ctx.masks, data_seed=ctx.cfg.seed + 1)]

    monkeypatch.setitem(BRANCHES, "typed_probe", Branch("typed_probe", probe, "probe"))
    real_train, real_prune = units_module.train, pruning_module.prune

    def train(networks, run, **kwargs):
        seen["loop"].append(run)
        return real_train(networks, run, **kwargs)

    def prune(model, masks, prunable, pcfg, **kwargs):
        seen["pruning"].append(pcfg)
        return real_prune(model, masks, prunable, pcfg, **kwargs)

    monkeypatch.setattr(units_module, "train", train)
    monkeypatch.setattr(pruning_module, "prune", prune)
    run_experiment(tiny_cfg("pruning.levels=2", "pruning.branches=[typed_probe,reinit]", "seed=7"), tmp_path / "run")

    assert len(seen["loop"]) == 4 and len(seen["branch"]) == 1 and seen["pruning"]  # 2 tickets, 2 branch units
    for run in seen["loop"]:
        assert type(run) is Training and type(run.train) is TrainConfig and type(run.optimizer) is dict
        assert not config_objects(run), config_objects(run)
    cfg, seed, dataset, batch_size, optimizer, criterion = seen["branch"][0]
    assert type(cfg) is Config and not config_objects(cfg), config_objects(cfg)
    assert (seed, dataset, batch_size, optimizer, criterion) == (7, "synthetic", 32, "adam", "magnitude")
    for pcfg in seen["pruning"]:
        assert type(pcfg) is PruningConfig and not config_objects(pcfg)


def test_typed_holds_every_value_of_the_checked_config():
    cfg = checked(tiny_cfg("pruning.branches=[lmc]", "dst=rigl", "criterion=snip", "+pruning.layer_rates={out: 0.1}"))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    settings = typed(resolved)
    assert plain_values(settings) == {k: v for k, v in resolved.items() if k in {f.name for f in
                                                                                   dataclasses.fields(Config)}}
    assert isinstance(settings.train, TrainConfig) and settings.pruning.layer_rates == {"out": 0.1}
    assert isinstance(settings.dst, Node) and settings.dst.name == settings.dst["name"] == "rigl"
    assert settings.branch.lmc.points == 30 and settings.pruning.criterion.get("num_batches") == 1
    assert pickle.loads(pickle.dumps(settings)) == settings
    with pytest.raises(AttributeError, match="read-only"):
        settings.dst.alpha = 0.5
    with pytest.raises(AttributeError, match="no key 'nothing'; it has: name, delta_t"):
        settings.dst.nothing  # noqa: B018


def test_the_loop_takes_the_same_training_from_a_dictconfig_or_the_typed_config():
    cfg = checked(tiny_cfg("optimizer=sgd", "optimizer.momentum=0.9", "train.schedule=cosine"))
    assert Training.of(cfg) == Training.of(typed(OmegaConf.to_container(cfg, resolve=True)))
