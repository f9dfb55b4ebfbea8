"""Every check of a config that needs no data, and the config as it is recorded: `checked(cfg)`.

A bad value raises ValueError (or FileNotFoundError) with one line naming it and the accepted values; nothing is
written or loaded before this passes. The nodes of registered things (dataset, optimizer, pruning.criterion) come back
expanded with their settings' defaults, so `config.yaml` records every setting a run used and a resumed run compares
all of them. What needs the data (the training set's size, hence durations in steps, rewind points, levels and
counts) is checked by lottery.experiment.session before the first write.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lottery.branches import BRANCHES, branch_settings
from lottery.config import check_ranges, import_extensions
from lottery.core.device import check_device
from lottery.core.papers import check_block
from lottery.core.registry import as_dict
from lottery.core.steps import parse_steps
from lottery.data import dataset_settings
from lottery.init import INITIALIZERS
from lottery.models import MODELS
from lottery.pruning import DISTRIBUTIONS, criterion_settings, scores_at
from lottery.pruning.granularity import GRANULARITIES, GROUP_SCORES
from lottery.training import BATCHING, optimizer_settings
from lottery.training.dst import dst_settings

# Each key's type, range and allowed values are declared on its field in lottery.config (check_ranges); what is
# checked here needs a registry, another key or the file system.
DEVICES = ("auto", "cpu", "cuda", "mps")
RATE_KINDS = ("linear", "conv", "output")


def _choice(value, accepted, what: str) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {what} '{value}'; accepted: {', '.join(map(str, accepted))}")


def _check_granularity(cfg: DictConfig, dst_rule) -> None:
    p = cfg.pruning
    g = p.get("granularity", "unstructured")
    _choice(g, GRANULARITIES, "pruning.granularity")
    _choice(p.get("group_score", "sum"), GROUP_SCORES, "pruning.group_score")
    if dst_rule is not None and g not in dst_rule.granularities:
        raise ValueError(
            f"dst={dst_rule.name} {dst_rule.granularity_note}; pruning.granularity={g} is not "
            f"supported with it (accepted: {', '.join(dst_rule.granularities)})"
        )
    if g == "channel":
        if p.scope in ("er", "erk"):
            raise ValueError(
                f"pruning.scope={p.scope} is a density per weight tensor; with pruning.granularity="
                "channel use layerwise, global or uniform"
            )
        if str(cfg.model.name).startswith("resnet"):
            raise ValueError(
                f"pruning.granularity=channel: the shortcuts of model={cfg.model.name} add the block's "
                "input to its output, tying channels across layers, which channel pruning does not "
                "handle; use a model without shortcuts (conv2/4/6, vgg*, mlp, lenet_300_100)"
            )
    if g == "nm":
        n, m = p.n, p.m
        if not 1 <= n < m:
            raise ValueError(f"pruning.n:pruning.m must satisfy 1 <= n < m, got {n}:{m} (e.g. 2:4)")
        if not p.one_shot:
            raise ValueError(
                f"pruning.granularity=nm prunes in one shot to density n/m = {n}/{m}, not by IMP "
                "levels; set pruning.one_shot=true"
            )
        if p.target is not None and abs(p.target - n / m) > 1e-9:
            raise ValueError(
                f"pruning.target={p.target} but pruning.granularity=nm keeps exactly {n} of every {m} "
                f"(density {n / m:g}); set pruning.target=null or {n / m:g}"
            )


def checked(cfg: DictConfig) -> DictConfig:
    """`cfg` validated, as a new config with the dataset, optimizer and criterion nodes expanded. No side effects
    besides importing the modules in `imports`."""
    import_extensions(cfg)
    check_block(OmegaConf.to_container(cfg.paper, resolve=True) if cfg.get("paper") is not None else None)
    check_ranges(cfg)
    out = OmegaConf.create(as_dict(cfg, resolve=False))
    OmegaConf.set_struct(out, False)

    _choice(cfg.model.name, sorted(MODELS), "model")
    entry, common, own = dataset_settings(cfg.dataset)
    out.dataset = {"name": entry.name, **common, **own}
    if cfg.init.get("_target_"):
        check_target(cfg.init._target_)
    else:
        if cfg.init.name not in INITIALIZERS:
            raise ValueError(
                f"unknown init '{cfg.init.name}'; accepted: {', '.join(sorted(INITIALIZERS))}, "
                "or set init._target_ to a callable"
            )
        if cfg.init.name == "normal" and cfg.init.variance is None:
            raise ValueError(f"init.variance must be a positive float for init=normal, got {cfg.init.variance}")
    opt, settings = optimizer_settings(cfg.optimizer)
    out.optimizer = {"name": opt.name, **settings}

    t = cfg.train
    for what in ("duration", "eval_every", "warmup"):
        parse_steps(t[what], 1, f"train.{what}")
    if parse_steps(t.duration, 1, "train.duration") < 1:
        raise ValueError(f"train.duration must be at least one step, got '{t.duration}'")
    if parse_steps(t.eval_every, 1, "train.eval_every") < 1:
        raise ValueError(f"train.eval_every must be at least one step, got '{t.eval_every}'")
    for m in t.milestones:
        parse_steps(m, 1, "train.milestones entry")
    _choice(str(cfg.device).split(":")[0], DEVICES, "device")
    check_device(cfg.device)  # cuda:7 on a two-GPU machine fails here, naming the GPUs there are
    _choice(cfg.get("replica_batching") or "auto", BATCHING, "replica_batching")

    rule, dst = dst_settings(cfg.get("dst"))
    out.dst = {"name": rule.name, **dst} if rule is not None else {"name": "none"}

    p = cfg.pruning
    out.pruning.criterion = {"name": p.criterion["name"], **criterion_settings(p.criterion)}
    if p.retrain_steps is not None:
        parse_steps(p.retrain_steps, 1, "pruning.retrain_steps")
    if p.retrain != "weight_rewind" and not p.train_dense:
        raise ValueError(
            f"pruning.retrain={p.retrain} keeps the trained weights a level is pruned from, but "
            "pruning.train_dense=false trains no dense network to keep; use pruning.retrain=weight_rewind"
        )
    _check_granularity(cfg, rule)
    if p.one_shot and p.target is None and p.get("granularity") != "nm":
        raise ValueError(
            "pruning.one_shot=true prunes straight to pruning.target, which is not set; set "
            "pruning.target=<fraction to keep> or pruning.one_shot=false"
        )
    if not p.get("train_dense", True) and (
        scores_at(p) != "at_init" or parse_steps(p.rewind, 1, "pruning.rewind") != 0
    ):
        raise ValueError(
            f"pruning.train_dense=false skips the dense network, which pruning.when="
            f"{scores_at(p)} with pruning.rewind={p.rewind} needs; it is for pruning at "
            "initialization (pruning.when=at_init, pruning.rewind=0)"
        )
    if p.scope == "global" and (p.rates or p.layer_rates):
        raise ValueError(
            "pruning.rates and pruning.layer_rates are per-layer rates, which global pruning does not "
            "use (it removes pruning.rate of all surviving weights); use pruning.scope=layerwise or "
            "drop them"
        )
    if p.scope in DISTRIBUTIONS and (p.rates or p.layer_rates):
        raise ValueError(
            f"pruning.rates and pruning.layer_rates are per-layer rates, which pruning.scope={p.scope} "
            "does not use (it splits each level's global count, pruning.rate of all surviving weights, "
            f"by the {p.scope} densities); use pruning=global pruning.scope={p.scope} (pruning=lth "
            "sets per-kind rates)"
        )
    for kind in p.rates:
        _choice(kind, RATE_KINDS, "pruning.rates key")
    for b in p.branches:
        _choice(b, [n for n, br in BRANCHES.items() if br.selectable], "pruning.branches entry")
    for b in cfg.get("branch") or {}:  # every branch's settings, listed or not: a bad one fails now, not when added
        _choice(b, sorted(BRANCHES), "branch settings key")
        branch_settings(b, cfg)
    parse_steps(p.rewind, 1, "pruning.rewind")
    parse_steps(cfg.checkpoint.every, 1, "checkpoint.every")
    if entry.reads_files:
        root = Path(common["root"]).expanduser()
        # With download on, a missing root is created by torchvision, but only inside a folder that exists: a root
        # under a missing parent is almost always a typo, and a download there would hide it.
        if not root.is_dir() and (not common["download"] or not root.parent.is_dir()):
            raise FileNotFoundError(
                f"dataset.root '{common['root']}' does not exist (looked at {root.resolve()}); point the run at a "
                f"folder that holds the {entry.name} files with dataset.root=/path/to/data"
                + ("" if common["download"] else ", or allow a download with dataset.download=true")
            )
    OmegaConf.set_struct(out, True)
    return out


def check_target(target: str) -> None:
    """`init._target_` names a callable that imports: one line otherwise (before any file is written)."""
    import importlib

    module, _, attr = str(target).rpartition(".")
    where = f"init._target_={target}"
    if not module:
        raise ValueError(f"{where} is not a dotted path; accepted: module.function, e.g. mypackage.inits.my_init")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise ValueError(f"{where}: module '{module}' cannot be imported ({e}); put its folder on PYTHONPATH") from None
    except AttributeError:
        raise ValueError(f"{where}: module '{module}' has no '{attr}'") from None
    except Exception as e:  # noqa: BLE001 - the module raised while importing
        raise ValueError(
            f"{where}: importing '{module}' raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    if not callable(fn) or isinstance(fn, type(importlib)):
        raise ValueError(
            f"{where} is a {type(fn).__name__}, not a callable; accepted: a function taking (weight, generator=...)"
        )
