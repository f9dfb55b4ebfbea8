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
from lottery.config import import_extensions
from lottery.core.device import check_device
from lottery.core.divergence import POLICIES
from lottery.core.steps import parse_steps
from lottery.data import dataset_settings
from lottery.init import INITIALIZERS
from lottery.models import MODELS
from lottery.pruning import DISTRIBUTIONS, criterion_settings, scores_at
from lottery.training import BATCHING, optimizer_settings
from lottery.training.dst import dst_settings

SCHEDULES = ("constant", "step", "cosine")
PRECISIONS = ("fp32", "tf32", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")
SCOPES = ("layerwise", "global", "uniform", "er", "erk")
WHEN = ("after_training", "at_init")
RETRAIN = ("weight_rewind", "lr_rewind", "finetune")
RATE_KINDS = ("linear", "conv", "output")
BATCHNORM_INITS = ("ones", "uniform")
# Seeds feed torch.Generator.manual_seed, which takes 64-bit integers.
SEED_RANGE = (-(2**63), 2**63 - 1)


def _choice(value, accepted, what: str) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {what} '{value}'; accepted: {', '.join(map(str, accepted))}")


def checked(cfg: DictConfig) -> DictConfig:
    """`cfg` validated, as a new config with the dataset, optimizer and criterion nodes expanded. No side effects
    besides importing the modules in `imports`."""
    import_extensions(cfg)
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    OmegaConf.set_struct(out, False)

    _choice(cfg.model.name, sorted(MODELS), "model")
    entry, common, own = dataset_settings(cfg.dataset)
    out.dataset = {"name": entry.name, **common, **own}
    if not cfg.init.get("_target_"):
        if cfg.init.name not in INITIALIZERS:
            raise ValueError(f"unknown init '{cfg.init.name}'; accepted: {', '.join(sorted(INITIALIZERS))}, "
                             "or set init._target_ to a callable")
        if cfg.init.name == "normal" and (cfg.init.variance is None or cfg.init.variance <= 0):
            raise ValueError(f"init.variance must be a positive float for init=normal, got {cfg.init.variance}")
    _choice(cfg.init.bias, ("zero", "default"), "init.bias")
    _choice(cfg.init.batchnorm, BATCHNORM_INITS, "init.batchnorm")
    opt, settings = optimizer_settings(cfg.optimizer)
    out.optimizer = {"name": opt.name, **settings}

    t = cfg.train
    if t.batch_size < 1:
        raise ValueError(f"train.batch_size must be >= 1, got {t.batch_size}")
    if t.eval_batch_size < 1:
        raise ValueError(f"train.eval_batch_size must be >= 1, got {t.eval_batch_size}")
    for what in ("duration", "eval_every", "warmup"):
        parse_steps(t[what], 1, f"train.{what}")
    if parse_steps(t.duration, 1, "train.duration") < 1:
        raise ValueError(f"train.duration must be at least one step, got '{t.duration}'")
    if parse_steps(t.eval_every, 1, "train.eval_every") < 1:
        raise ValueError(f"train.eval_every must be at least one step, got '{t.eval_every}'")
    for m in t.milestones:
        parse_steps(m, 1, "train.milestones entry")
    _choice(t.schedule, SCHEDULES, "train.schedule")
    _choice(t.precision, PRECISIONS, "train.precision")
    _choice(t.on_divergence, POLICIES, "train.on_divergence")
    if t.get("progress_every", 0) < 0:
        raise ValueError(f"train.progress_every is in seconds and must be >= 0 (0: a line after each unit only), got "
                         f"{t.progress_every}")
    if not 0 <= cfg.get("match_tolerance", 0) < 1:
        raise ValueError(f"match_tolerance is a test accuracy difference and must be in [0, 1), got "
                         f"{cfg.match_tolerance}")
    _choice(str(cfg.device).split(":")[0], DEVICES, "device")
    check_device(cfg.device)  # cuda:7 on a two-GPU machine fails here, naming the GPUs there are
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"threads must be >= 1 (or null for PyTorch's default), got {cfg.threads}")
    for key in ("seed", "data_seed"):
        value = cfg.get(key)
        if value is not None and not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
            raise ValueError(f"{key}={value} is outside the 64-bit integers a seed can be "
                             f"({SEED_RANGE[0]} to {SEED_RANGE[1]})")
    _choice(cfg.get("replica_batching") or "auto", BATCHING, "replica_batching")

    rule, dst = dst_settings(cfg.get("dst"))
    out.dst = {"name": rule.name, **dst} if rule is not None else {"name": "none"}

    p = cfg.pruning
    out.pruning.criterion = {"name": p.criterion["name"], **criterion_settings(p.criterion)}
    _choice(p.retrain, RETRAIN, "pruning.retrain")
    if p.retrain_steps is not None:
        parse_steps(p.retrain_steps, 1, "pruning.retrain_steps")
    if p.retrain != "weight_rewind" and not p.train_dense:
        raise ValueError(f"pruning.retrain={p.retrain} keeps the trained weights a level is pruned from, but "
                         "pruning.train_dense=false trains no dense network to keep; use pruning.retrain=weight_rewind")
    _choice(p.scope, SCOPES, "pruning.scope")
    _choice(p.when, WHEN, "pruning.when")
    if p.levels < 1:
        raise ValueError(f"pruning.levels counts level 0 (dense) too and must be >= 1, got {p.levels}")
    if p.target is not None and not 0 < p.target < 1:
        raise ValueError(f"pruning.target is the fraction of weights to keep, in (0, 1); got {p.target}")
    if p.one_shot and p.target is None:
        raise ValueError("pruning.one_shot=true prunes straight to pruning.target, which is not set; set "
                         "pruning.target=<fraction to keep> or pruning.one_shot=false")
    if p.rounds < 1:
        raise ValueError(f"pruning.rounds must be >= 1, got {p.rounds}")
    if not p.get("train_dense", True):
        if scores_at(p) != "at_init" or parse_steps(p.rewind, 1, "pruning.rewind") != 0:
            raise ValueError(f"pruning.train_dense=false skips the dense network, which pruning.when="
                             f"{scores_at(p)} with pruning.rewind={p.rewind} needs; it is for pruning at "
                             "initialization (pruning.when=at_init, pruning.rewind=0)")
    if p.scope == "global" and (p.rates or p.layer_rates):
        raise ValueError("pruning.rates and pruning.layer_rates are per-layer rates, which global pruning does not "
                         "use (it removes pruning.rate of all surviving weights); use pruning.scope=layerwise or "
                         "drop them")
    if p.scope in DISTRIBUTIONS and (p.rates or p.layer_rates):
        raise ValueError(f"pruning.rates and pruning.layer_rates are per-layer rates, which pruning.scope={p.scope} "
                         "does not use (it splits each level's global count, pruning.rate of all surviving weights, "
                         f"by the {p.scope} densities); use pruning=global pruning.scope={p.scope} (pruning=lth "
                         "sets per-kind rates)")
    for name, rate in [("rate", p.rate), *[(f"rates.{k}", v) for k, v in p.rates.items()],
                       *[(f"layer_rates.{k}", v) for k, v in p.layer_rates.items()]]:
        if not 0 <= rate < 1:
            raise ValueError(f"pruning.{name} must be in [0, 1), got {rate}")
    for kind in p.rates:
        _choice(kind, RATE_KINDS, "pruning.rates key")
    for b in p.branches:
        _choice(b, [n for n, br in BRANCHES.items() if br.selectable], "pruning.branches entry")
    for b in cfg.get("branch") or {}:  # every branch's settings, listed or not: a bad one fails now, not when added
        _choice(b, sorted(BRANCHES), "branch settings key")
        branch_settings(b, cfg)
    parse_steps(p.rewind, 1, "pruning.rewind")
    parse_steps(cfg.checkpoint.every, 1, "checkpoint.every")
    _choice(cfg.logger.name, ("none", "wandb"), "logger")
    if entry.reads_files:
        root = Path(common["root"]).expanduser()
        # With download on, a missing root is created by torchvision, but only inside a folder that exists: a root
        # under a missing parent is almost always a typo, and a download there would hide it.
        if not root.is_dir() and (not common["download"] or not root.parent.is_dir()):
            raise FileNotFoundError(
                f"dataset.root '{common['root']}' does not exist (looked at {root.resolve()}); point the run at a "
                f"folder that holds the {entry.name} files with dataset.root=/path/to/data"
                + ("" if common["download"] else ", or allow a download with dataset.download=true"))
    OmegaConf.set_struct(out, True)
    return out
