"""One typed, range-checked config (issue 28): every key's range is declared on its schema field, and checked before
anything is written.

The walk below reads the schema (lottery.config.Config and the registries' settings classes) and, for every numeric
key, tries a value outside its declared range, NaN and inf: each is refused with one line naming the key, in process
and before the run folder exists. A numeric key added to the schema without a rule fails
`test_every_numeric_key_of_the_schema_declares_its_range`, so none can skip its check.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
from omegaconf import OmegaConf

from lottery.config import Config
from lottery.core.ranges import Rule, check_fields, numeric_fields, rule_of
from lottery.core.registry import check_settings
from lottery.experiment import run_experiment

from conftest import tiny_cfg

def registered_settings() -> list[tuple[str, type]]:
    """(config node, settings class) of every registered thing with settings."""
    from lottery.branches import BRANCHES
    from lottery.data import DATASETS
    from lottery.pruning import CRITERIA
    from lottery.training import OPTIMIZERS
    from lottery.training.updaters import UPDATERS
    from lottery.training.optimizers import CommonSettings
    out = [("optimizer", CommonSettings)]
    out += [("optimizer", e.settings) for e in OPTIMIZERS.values()]
    out += [("dataset", e.settings) for e in DATASETS.values()]
    out += [("pruning.criterion", e.settings) for e in CRITERIA.values()]
    out += [("dst", e.Settings) for e in UPDATERS.values()]
    out += [(f"branch.{n}", e.settings) for n, e in BRANCHES.items()]
    seen, unique = set(), []
    for where, cls in out:  # lottery's own: a test's or a user's settings class registered in this process is theirs
        if cls is not None and cls.__module__.startswith("lottery.") and (where, cls) not in seen:
            seen.add((where, cls))
            unique.append((where, cls))
    return unique


def outside(rule: Rule, kind: type):
    """A value of type `kind` just outside `rule`'s range."""
    if rule.lo is not None:
        return rule.lo if rule.lo_open else (rule.lo - 1 if kind is int or rule.integer else rule.lo - 0.5)
    return rule.hi if rule.hi_open else rule.hi + 1


def bad_values(kind: type, rule: Rule | None) -> list:
    out = [outside(rule, kind)] if rule is not None and rule.choices is None else []
    return out + ([math.nan, math.inf, -math.inf] if kind is float else [])


def as_value(key: str, hint, value):
    """`value` shaped as the key holds it: an entry of a list, a value of a dict."""
    import types
    import typing
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # Optional[X] or X | None: X
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is list:
        return [value]
    if typing.get_origin(hint) is dict:
        return {"linear": value}
    return value


SCHEMA_CASES = [(key, kind, rule, v) for key, kind, rule in numeric_fields(Config) for v in bad_values(kind, rule)]


def _hint(cls, dotted: str):
    import typing
    *parents, last = dotted.split(".")
    for part in parents:
        cls = typing.get_type_hints(cls)[part]
    return typing.get_type_hints(cls)[last]


@pytest.mark.parametrize("key,kind,rule,value", SCHEMA_CASES,
                         ids=[f"{k}={v}" for k, _, _, v in SCHEMA_CASES])
def test_every_numeric_key_refuses_a_value_outside_its_range_before_anything_is_written(tmp_path, key, kind, rule,
                                                                                          value):
    cfg = tiny_cfg()
    OmegaConf.set_struct(cfg, False)
    OmegaConf.update(cfg, key, as_value(key, _hint(Config, key), value), merge=False)
    run = tmp_path / "run"
    with pytest.raises(ValueError) as e:
        run_experiment(cfg, run)
    message = str(e.value)
    assert "\n" not in message and message.startswith(key), message
    assert str(value) in message
    assert not run.exists()


SETTINGS_CASES = [(where, cls, key, kind, rule, v) for where, cls in registered_settings()
                  for key, kind, rule in numeric_fields(cls) for v in bad_values(kind, rule)]


@pytest.mark.parametrize("where,cls,key,kind,rule,value", SETTINGS_CASES,
                         ids=[f"{w}.{k}={v}({c.__name__})" for w, c, k, _, _, v in SETTINGS_CASES])
def test_every_numeric_setting_of_a_registered_thing_refuses_a_value_outside_its_range(where, cls, key, kind, rule,
                                                                                     value):
    values = {key: as_value(key, _hint(cls, key), value)}
    with pytest.raises(ValueError) as e:
        if cls.__name__ == "CommonSettings":
            check_fields(cls, values, where)
        else:
            check_settings(values, cls, where)
    message = str(e.value)
    assert "\n" not in message and f"{where}.{key}" in message, message


def test_every_numeric_key_of_the_schema_declares_its_range():
    missing = [key for key, _, rule in numeric_fields(Config) if rule is None]
    missing += [f"{where}.{key} ({cls.__name__})" for where, cls in registered_settings()
                for key, _, rule in numeric_fields(cls) if rule is None]
    assert not missing, ("numeric keys without a declared range (give the field `setting(default, rule)`, "
                         f"lottery.core.ranges): {missing}")


def test_the_walk_sees_nested_list_and_dict_fields():
    keys = {key for key, _, _ in numeric_fields(Config)}
    assert {"model.hidden", "train.gamma", "pruning.rates", "pruning.layer_rates", "seed", "threads"} <= keys
    assert rule_of(next(f for f in dataclasses.fields(Config) if f.name == "seed")).integer


@pytest.mark.parametrize("overrides,message", [
    (["train.schedule=step", "train.milestones=[10it]", "train.gamma=-1"], "train.gamma must be > 0, got -1"),
    (["optimizer.lr=inf"], "optimizer.lr must be in (0, 1000000], got inf"),
    (["optimizer.lr=1e308"], "optimizer.lr must be in (0, 1000000], got 1e+308"),
    (["optimizer.weight_decay=nan"], "optimizer.weight_decay must be >= 0, got nan"),
    (["optimizer=sgd", "optimizer.momentum=1.5"], "optimizer.momentum must be in [0, 1), got 1.5"),
    (["optimizer.betas=[0.9,1.0]"], "optimizer.betas entries must be in [0, 1), got 1.0"),
    (["init=normal", "init.variance=inf"], "init.variance must be > 0, got inf"),
    (["init.gain=nan"], "init.gain must be > 0, got nan"),
    (["init.gain=-1"], "init.gain must be > 0, got -1"),
    (["model=deep_mlp", "model.width=0"], "model.width must be >= 1, got 0"),
    (["model=mlp", "model.hidden=[0]"], "model.hidden entries must be >= 1, got 0"),
    (["model=mlp", "model.hidden=[-5]"], "model.hidden entries must be >= 1, got -5"),
    (["init._target_=nonexistent.mod.fn"], "init._target_=nonexistent.mod.fn: module 'nonexistent.mod' cannot be "
                                           "imported"),
    (["init._target_=os.path"], "init._target_=os.path is a module, not a callable"),
    (["init._target_=os.nothing_here"], "init._target_=os.nothing_here: module 'os' has no 'nothing_here'"),
    (["dst=rigl", "dst.alpha=nan"], "dst.alpha must be in [0, 1], got nan"),
    (["dst=set", "dst.end=0"], "dst.end must be in (0, 1], got 0"),
    (["criterion=grasp", "pruning.criterion.temperature=inf"], "pruning.criterion.temperature must be > 0, got inf"),
    (["criterion=snip", "pruning.criterion.num_batches=0"], "pruning.criterion.num_batches must be >= 1, got 0"),
    (["dataset.synthetic_train=0"], "dataset.synthetic_train must be >= 1, got 0"),
    (["train.schedule=sometimes"], "unknown train.schedule 'sometimes'; accepted: constant, step, cosine"),
    # cross-key rules (need the training's length, so checked once the data is known, still before any write)
    (["train.schedule=step", "train.milestones=[30it,100it]"],
     "train.milestones=['30it', '100it']: 100it is not inside the training (train.duration=60it, 60 steps), so that "
     "decay would never happen; accepted: milestones below 60 steps, e.g. train.milestones=[14it,45it]"),
    (["train.warmup=500it"], "train.warmup=500it (500 steps) is not shorter than the training"),
    (["dst=rigl"], "dst.delta_t=100 is longer than the part of training with mask updates (dst.end=0.75 x 60 steps "
                   "= 45 steps), so no mask would ever change; accepted: dst.delta_t <= 45"),
    (["pruning.exclude=[nonexistent.weight]"], "pruning.exclude entry 'nonexistent.weight' names no parameter of "
                                               "model 'lenet_300_100'"),
    (["+pruning.layer_rates={hiden.0: 0.5}"], "pruning.layer_rates key 'hiden.0' names no pruned tensor"),
    (["pruning.levels=1000"], "pruning.levels=1000: level 52 would keep the same 8 weights as level 51"),
])
def test_issue_probes_are_one_line_before_anything_is_written(tmp_path, overrides, message):
    run = tmp_path / "run"
    with pytest.raises(ValueError) as e:
        run_experiment(tiny_cfg(*overrides), run)
    assert "\n" not in str(e.value)
    assert message in str(e.value), str(e.value)
    # the lock file is the only thing a check after the lock leaves; no file of a run
    assert not run.exists() or [p.name for p in run.iterdir()] == [".lock"]


def test_the_corrected_values_are_accepted_in_the_same_folder(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError):
        run_experiment(tiny_cfg("pruning=none", "train.schedule=step", "train.milestones=[30it,100it]"), run)
    run_experiment(tiny_cfg("pruning=none", "train.schedule=step", "train.milestones=[14it,45it]"), run)
    assert (run / "config.yaml").is_file()


def test_an_imported_module_that_raises_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "broken_ext.py").write_text("raise RuntimeError('oops, a bug in my module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"^imports entry 'broken_ext' raised RuntimeError while being imported: "
                                         r"oops, a bug in my module; fix that module$"):
        run_experiment(tiny_cfg("imports=[broken_ext]"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
