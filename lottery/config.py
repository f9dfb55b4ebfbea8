"""Typed description of an experiment.

The dataclasses are registered with Hydra's ConfigStore as the schema of `conf/config.yaml`, so a misspelled key or a
wrong type fails when the config is composed. `validate` then checks values (names, ranges, paths) before any work, so
a bad run fails in a second with one message instead of after data loading.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    hidden: Optional[List[int]] = None  # mlp / deep_mlp hidden widths
    depth: Optional[int] = None  # deep_mlp: number of hidden layers
    width: Optional[int] = None  # deep_mlp units per layer; resnet20 base channels


@dataclass
class DatasetConfig:
    name: str = MISSING
    root: str = "data"
    download: bool = True
    verify: bool = True
    val_size: int = 5000
    augment: bool = False
    synthetic_shape: str = "mnist"
    synthetic_train: int = 1024
    synthetic_test: int = 256


@dataclass
class InitConfig:
    name: str = MISSING
    variance: Optional[float] = None
    mode: str = "fan_in"
    nonlinearity: str = "relu"
    gain: Optional[float] = None
    bias: str = "zero"
    _target_: Optional[str] = None


@dataclass
class OptimizerConfig:
    name: str = MISSING
    lr: float = 1e-3
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class TrainConfig:
    duration: str = "3ep"
    batch_size: int = 60
    eval_every: str = "100it"
    eval_batch_size: int = 10000
    schedule: str = "constant"
    milestones: List[str] = field(default_factory=list)
    gamma: float = 0.1
    warmup: str = "0it"
    precision: str = "fp32"
    compile: bool = False
    progress: bool = True


@dataclass
class PruningConfig:
    strategy: str = "magnitude"
    scope: str = "layerwise"
    levels: int = 1
    target: Optional[float] = None
    one_shot: bool = False
    rewind: str = "0"
    rate: float = 0.2
    rates: Dict[str, float] = field(default_factory=dict)
    layer_rates: Dict[str, float] = field(default_factory=dict)
    exclude: List[str] = field(default_factory=list)
    prune_biases: bool = False
    prune_batchnorm: bool = False
    branches: List[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    name: str = "none"
    project: str = "lottery"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    job_type: Optional[str] = None
    log_every: int = 100
    log_artifacts: bool = False


@dataclass
class CheckpointConfig:
    every: str = "500it"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    init: InitConfig = field(default_factory=InitConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    name: str = "default"
    seed: int = 0
    data_seed: Optional[int] = None
    device: str = "auto"
    threads: Optional[int] = None
    ticket: Optional[str] = None  # lottery-retrain: path of the ticket file to retrain
    # Faults for the resume tests: a job signals itself once at this step (SIGUSR2), or exits hard (kill).
    fault: Dict[str, Any] = field(default_factory=dict)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="lottery_schema", node=Config)


# --- durations ---------------------------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(it|ep)?\s*$")


def parse_steps(value: Any, steps_per_epoch: int, what: str = "duration") -> int:
    """'500it' -> 500, '2ep' -> 2 * steps_per_epoch, 300 -> 300 (iterations)."""
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"bad {what} '{value}'; accepted: '<N>it' (iterations), '<N>ep' (epochs) or a plain integer")
    number, unit = float(m.group(1)), m.group(2) or "it"
    steps = number * steps_per_epoch if unit == "ep" else number
    if unit == "it" and not number.is_integer():
        raise ValueError(f"bad {what} '{value}': iterations must be a whole number")
    return int(math.floor(steps + 0.5))


# --- validation --------------------------------------------------------------------------------------------------

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")
STRATEGIES = ("none", "magnitude", "random")
SCOPES = ("layerwise", "global")
BRANCHES = ("reinit", "random_prune", "shuffle")
RATE_KINDS = ("linear", "conv", "output")


def _choice(value: str, accepted, what: str) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {what} '{value}'; accepted: {', '.join(accepted)}")


def validate(cfg) -> None:
    """Raise ValueError (or FileNotFoundError) naming the bad value and the accepted ones. No side effects."""
    from lottery.data import DATASETS
    from lottery.init import INITIALIZERS
    from lottery.models import MODELS

    _choice(cfg.model.name, sorted(MODELS), "model")
    _choice(cfg.dataset.name, DATASETS, "dataset")
    if not cfg.init.get("_target_"):
        if cfg.init.name not in INITIALIZERS:
            raise ValueError(f"unknown init '{cfg.init.name}'; accepted: {', '.join(sorted(INITIALIZERS))}, "
                             "or set init._target_ to a callable")
    if cfg.init.name == "normal" and not cfg.init.get("_target_"):
        if cfg.init.variance is None or cfg.init.variance <= 0:
            raise ValueError(f"init.variance must be a positive float for init=normal, got {cfg.init.variance}")
    _choice(cfg.init.bias, ("zero", "default"), "init.bias")
    _choice(cfg.optimizer.name, OPTIMIZERS, "optimizer")
    if not cfg.optimizer.lr > 0:
        raise ValueError(f"optimizer.lr must be > 0, got {cfg.optimizer.lr}")
    if cfg.optimizer.momentum < 0 or cfg.optimizer.weight_decay < 0:
        raise ValueError(f"optimizer.momentum and optimizer.weight_decay must be >= 0, got "
                         f"{cfg.optimizer.momentum} and {cfg.optimizer.weight_decay}")
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
    _choice(cfg.device.split(":")[0], DEVICES, "device")
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"threads must be >= 1 (or null for PyTorch's default), got {cfg.threads}")
    p = cfg.pruning
    _choice(p.strategy, STRATEGIES, "pruning.strategy")
    _choice(p.scope, SCOPES, "pruning.scope")
    if p.levels < 1:
        raise ValueError(f"pruning.levels counts level 0 (dense) too and must be >= 1, got {p.levels}")
    if p.target is not None and not 0 < p.target < 1:
        raise ValueError(f"pruning.target is the fraction of weights to keep, in (0, 1); got {p.target}")
    for name, rate in [("rate", p.rate), *[(f"rates.{k}", v) for k, v in p.rates.items()],
                       *[(f"layer_rates.{k}", v) for k, v in p.layer_rates.items()]]:
        if not 0 <= rate < 1:
            raise ValueError(f"pruning.{name} must be in [0, 1), got {rate}")
    for kind in p.rates:
        _choice(kind, RATE_KINDS, "pruning.rates key")
    for b in p.branches:
        _choice(b, BRANCHES, "pruning.branches entry")
    parse_steps(p.rewind, 1, "pruning.rewind")
    parse_steps(cfg.checkpoint.every, 1, "checkpoint.every")
    _choice(cfg.logger.name, ("none", "wandb"), "logger")
    if cfg.dataset.name != "synthetic":
        _choice(cfg.dataset.synthetic_shape, ("mnist", "cifar10"), "dataset.synthetic_shape")
        root = Path(cfg.dataset.root).expanduser()
        # With download on, a missing root is created by torchvision, but only inside a folder that exists: a root
        # under a missing parent is almost always a typo, and a download there would hide it.
        if not root.is_dir() and (not cfg.dataset.download or not root.parent.is_dir()):
            raise FileNotFoundError(
                f"dataset.root '{cfg.dataset.root}' does not exist (looked at {root.resolve()}); point the run at a "
                f"folder that holds MNIST/raw or cifar-10-batches-py with dataset.root=/path/to/data"
                + ("" if cfg.dataset.download else ", or allow a download with dataset.download=true"))
