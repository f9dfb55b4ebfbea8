"""Typed description of an experiment.

The dataclasses are registered with Hydra's ConfigStore as the schema of `conf/config.yaml`, so a misspelled key or a
wrong type fails when the config is composed. `validate` then checks values (names, ranges, paths) before any work, so
a bad run fails in a second with one message instead of after data loading.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from lottery.core.steps import parse_steps


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
    batchnorm: str = "ones"
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
    on_divergence: str = "stop"  # a non-finite loss: stop the run | continue with the units that do not depend on it


@dataclass
class PruningConfig:
    # The criterion's own node: `name` (a key of lottery.pruning.CRITERIA) plus the settings that criterion declares;
    # its keys are type-checked against the criterion's registered settings by `validate`.
    criterion: Dict[str, Any] = field(default_factory=lambda: {"name": "magnitude"})
    # layerwise (per-tensor rates) | global (one threshold over all tensors) | uniform | er | erk: global pruning's
    # count per level, split between tensors by that density distribution (lottery.pruning.densities, RigL's ER/ERK)
    scope: str = "layerwise"
    when: str = "after_training"
    levels: int = 1
    target: Optional[float] = None
    one_shot: bool = False
    rounds: int = 1
    train_dense: bool = True  # false: no level 0 (pruning at init from rewind 0 needs no dense network)
    from_dense: bool = False  # every level pruned from the dense network to its count, not from level L-1's mask
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
    deterministic: bool = True  # CUDA: deterministic algorithms (lottery/device.py); false trades that for speed
    threads: Optional[int] = None
    # Replicates trained batched in one process (lottery.replicas): a count R (seeds seed..seed+R-1) or a list of
    # seeds; each writes a normal run folder <run dir>/replicate_<seed>/. null: one run.
    replicas: Optional[Any] = None
    # How replicas train: stacked (one batched matmul / grouped convolution per layer for all networks) | interleaved
    # (one step, each network through its own model) | sequential (one unit after another) | auto (stacked, except
    # models with convolutions on a CPU: interleaved; lottery.replicas.layout).
    replica_batching: str = "auto"
    # Settings of the branches in pruning.branches, one node per branch name (lottery.branches.BRANCHES).
    branch: Dict[str, Any] = field(default_factory=dict)
    # Modules imported before the config is checked, so their @register_* calls (models, initializers, criteria,
    # branches) take effect: a user's extensions without editing lottery/.
    imports: List[str] = field(default_factory=list)
    ticket: Optional[str] = None  # lottery-retrain: path of the ticket file to retrain
    # Faults for the resume tests: a job signals itself once at this step (SIGUSR2), or exits hard (kill).
    fault: Dict[str, Any] = field(default_factory=dict)


# Keys that do not define an experiment: where data lives, how a run is logged, shown, checkpointed and launched,
# which controls are added. Used by resume (a changed key here is no different experiment), by `lottery-report` (never
# a condition) and by sweep folder names (never part of a job's name). A key covers the keys below it.
NON_EXPERIMENT_KEYS = ("name", "dataset.root", "dataset.download", "dataset.verify", "device", "deterministic",
                       "threads", "logger",
                       "checkpoint", "train.progress", "train.compile", "train.eval_batch_size", "fault", "imports",
                       "pruning.branches", "train.on_divergence", "launcher", "sweep", "hydra", "replicas",
                       "replica_batching")
# Keys that tell replicates of one condition apart: `lottery-report` averages over them.
REPLICATE_KEYS = ("seed", "data_seed", "ticket")


def non_experiment(key: str, extra: tuple = ()) -> bool:
    return any(key == k or key.startswith(k + ".") for k in (*NON_EXPERIMENT_KEYS, *extra))


def job_dirname(overrides) -> str:
    """A sweep job's folder name: its overrides, sorted, without the keys that do not define an experiment."""
    items = []
    for line in overrides:
        key = str(line).split("=", 1)[0].lstrip("+~")
        if not non_experiment(key):
            items.append(str(line).replace("/", "_"))
    return ",".join(sorted(items))


def register_configs() -> None:
    from omegaconf import OmegaConf
    cs = ConfigStore.instance()
    cs.store(name="lottery_schema", node=Config)
    if not OmegaConf.has_resolver("lottery_dirname"):
        OmegaConf.register_new_resolver("lottery_dirname", lambda overrides: job_dirname(overrides or []))
    _register_device_resolvers()


def _register_device_resolvers() -> None:
    """`${lottery_gpus:}` (GPUs this machine has) and `${lottery_local_device:N}` (job N's GPU), used by
    conf/launcher/submitit_local.yaml; see lottery.core.device.local_job_device."""
    from omegaconf import OmegaConf

    def gpus() -> int:
        from lottery.core.device import local_gpus
        return local_gpus()

    def local_device(job_num=0) -> str:
        from lottery.core.device import local_job_device
        return local_job_device(job_num)

    OmegaConf.register_new_resolver("lottery_gpus", gpus, replace=True)
    OmegaConf.register_new_resolver("lottery_local_device", local_device, replace=True)


def import_extensions(cfg) -> None:
    """Import the modules in `imports` (a user's registered models, initializers, criteria, branches)."""
    import importlib
    for name in cfg.get("imports") or []:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f"imports entry '{name}' cannot be imported ({e}); put its folder on PYTHONPATH") from e


# --- validation --------------------------------------------------------------------------------------------------

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")
PRECISIONS = ("fp32", "tf32", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")
SCOPES = ("layerwise", "global", "uniform", "er", "erk")
WHEN = ("after_training", "at_init")
RATE_KINDS = ("linear", "conv", "output")
BATCHNORM_INITS = ("ones", "uniform")


def _choice(value: str, accepted, what: str) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {what} '{value}'; accepted: {', '.join(accepted)}")


def validate(cfg) -> None:
    """Raise ValueError (or FileNotFoundError) naming the bad value and the accepted ones. No side effects."""
    from lottery.branches import BRANCHES, branch_settings
    from lottery.data import DATASETS
    from lottery.init import INITIALIZERS
    from lottery.models import MODELS
    from lottery.pruning import DISTRIBUTIONS, criterion_settings

    import_extensions(cfg)

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
    _choice(cfg.init.batchnorm, BATCHNORM_INITS, "init.batchnorm")
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
    from lottery.core.divergence import POLICIES
    _choice(t.on_divergence, POLICIES, "train.on_divergence")
    _choice(cfg.device.split(":")[0], DEVICES, "device")
    from lottery.core.device import check_device
    check_device(cfg.device)  # cuda:7 on a two-GPU machine fails here, naming the GPUs there are
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"threads must be >= 1 (or null for PyTorch's default), got {cfg.threads}")
    p = cfg.pruning
    criterion_settings(p.criterion)  # unknown criterion, unknown key or wrong type: one line naming it
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
        from lottery.pruning import scores_at
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
    for b in cfg.get("branch") or {}:
        _choice(b, sorted(BRANCHES), "branch settings key")
    for b in p.branches:
        branch_settings(b, cfg)
    parse_steps(p.rewind, 1, "pruning.rewind")
    parse_steps(cfg.checkpoint.every, 1, "checkpoint.every")
    _choice(cfg.logger.name, ("none", "wandb"), "logger")
    if cfg.dataset.name == "synthetic":
        _choice(cfg.dataset.synthetic_shape, ("mnist", "cifar10"), "dataset.synthetic_shape")
    else:
        root = Path(cfg.dataset.root).expanduser()
        # With download on, a missing root is created by torchvision, but only inside a folder that exists: a root
        # under a missing parent is almost always a typo, and a download there would hide it.
        if not root.is_dir() and (not cfg.dataset.download or not root.parent.is_dir()):
            raise FileNotFoundError(
                f"dataset.root '{cfg.dataset.root}' does not exist (looked at {root.resolve()}); point the run at a "
                f"folder that holds MNIST/raw or cifar-10-batches-py with dataset.root=/path/to/data"
                + ("" if cfg.dataset.download else ", or allow a download with dataset.download=true"))
