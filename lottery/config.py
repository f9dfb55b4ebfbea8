"""Typed description of an experiment.

The dataclasses are registered with Hydra's ConfigStore as the schema of `conf/config.yaml`, so a misspelled key or a
wrong type fails when the config is composed. The nodes of registered things with settings of their own (dataset,
optimizer, pruning.criterion, branch.<name>) are open here and checked against their registry before any work
(lottery.experiment.check), which also checks everything derived from them. Each key's range or allowed values is
metadata on its field (`setting(default, rule)`, lottery.core.ranges), checked by `check_ranges` before any work.

Imports core only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lottery.core.divergence import POLICIES
from lottery.core.ranges import at_least, between, fraction, non_negative, one_of, positive, setting

# OmegaConf's value of a key that must be set (omegaconf.MISSING), spelt here so that the dataclasses import neither
# OmegaConf nor Hydra: the typed config (`typed`) is what code below the session reads, without either library.
MISSING = "???"

# Seeds feed torch.Generator.manual_seed, which takes 64-bit integers.
SEED_RANGE = (-(2**63), 2**63 - 1)


@dataclass
class ModelConfig:
    name: str = MISSING
    hidden: list[int] | None = setting(None, at_least(1))  # mlp / deep_mlp hidden widths
    depth: int | None = setting(None, at_least(1))  # deep_mlp: number of hidden layers
    width: int | None = setting(None, at_least(1))  # deep_mlp units per layer; resnet20 base channels


@dataclass
class InitConfig:
    name: str = MISSING
    variance: float | None = setting(None, positive())
    mode: str = "fan_in"
    nonlinearity: str = "relu"
    gain: float | None = setting(None, positive())
    bias: str = setting("zero", one_of("zero", "default"))
    batchnorm: str = setting("ones", one_of("ones", "uniform"))
    _target_: str | None = None


@dataclass
class TrainConfig:
    duration: str = "3ep"
    batch_size: int = setting(60, at_least(1))
    eval_every: str = "100it"
    eval_batch_size: int = setting(10000, at_least(1))
    schedule: str = setting("constant", one_of("constant", "step", "cosine"))
    milestones: list[str] = field(default_factory=list)
    gamma: float = setting(0.1, positive())  # > 0: a negative factor turns the learning rate negative
    warmup: str = "0it"
    precision: str = setting("fp32", one_of("fp32", "tf32", "bf16"))
    compile: bool = False
    progress: bool = True
    # seconds between the whole run's progress lines inside a unit (and one per unit)
    progress_every: float = setting(60.0, non_negative())
    estimate: bool = True  # before starting: the run's cost, with a time from a few timed steps of a copy of the model
    # a non-finite loss: stop the run | continue with the units that do not depend on it
    on_divergence: str = setting("stop", one_of(*POLICIES))
    # a ticket at chance that the next IMP level would be pruned from: stop the run (exit 4) | continue (prune it
    # anyway)
    on_chance: str = setting("stop", one_of("stop", "continue"))


@dataclass
class PruningConfig:
    # The criterion's own node: `name` (a key of lottery.pruning.CRITERIA) plus the settings that criterion declares;
    # its keys are type-checked against the criterion's registered settings by `validate`.
    criterion: dict[str, Any] = field(default_factory=lambda: {"name": "magnitude"})
    # layerwise (per-tensor rates) | global (one threshold over all tensors) | uniform | er | erk: global pruning's
    # count per level, split between tensors by that density distribution (lottery.pruning.densities, RigL's ER/ERK)
    scope: str = setting("layerwise", one_of("layerwise", "global", "uniform", "er", "erk"))
    when: str = setting("after_training", one_of("after_training", "at_init"))
    levels: int = setting(1, at_least(1))  # level 0 (dense) counts too
    target: float | None = setting(None, between(0, 1, lo_open=True, hi_open=True))  # fraction kept
    one_shot: bool = False
    rounds: int = setting(1, at_least(1))
    # How each round's count and ties are decided: exact (rounded counts, stable ties) | synflow (Synaptic-Flow's
    # int((1 - d) N) with `<=` at the threshold; lottery.pruning.schedule)
    counting: str = setting("exact", one_of("exact", "synflow"))
    train_dense: bool = True  # false: no level 0 (pruning at init from rewind 0 needs no dense network)
    from_dense: bool = False  # every level pruned from the dense network to its count, not from level L-1's mask
    rewind: str = "0"
    # How a pruned level trains: weight_rewind (its survivors rewound to `rewind`, the schedule from there: IMP as in
    # the lottery-ticket papers) | lr_rewind (the trained weights kept, the schedule from `rewind`) | finetune (the
    # trained weights kept, `retrain_steps` more steps at the final learning rate): Renda, Frankle & Carbin 2020
    retrain: str = setting("weight_rewind", one_of("weight_rewind", "lr_rewind", "finetune"))
    retrain_steps: str | None = None  # finetune: steps at the final learning rate (null: duration - rewind)
    rate: float = setting(0.2, fraction())
    rates: dict[str, float] = setting(dict, fraction())
    layer_rates: dict[str, float] = setting(dict, fraction())
    exclude: list[str] = field(default_factory=list)
    prune_biases: bool = False
    prune_batchnorm: bool = False
    branches: list[str] = field(default_factory=list)
    # Levels the branches run at (0: the dense network, for the branches that run there); empty: every level. Controls
    # at the few densities a figure needs cost a fraction of controls at every level.
    branch_levels: list[int] = setting(list, at_least(0))
    # What one selected entry is (lottery.pruning.granularity): unstructured (a weight) | channel (an output channel
    # with its bias and BatchNorm entries) | nm (n kept of every m consecutive weights along the input dimension)
    granularity: str = "unstructured"
    n: int = setting(2, at_least(1))  # nm: weights kept per block
    m: int = setting(4, at_least(2))  # nm: block length along the input dimension
    group_score: str = "sum"  # channel: a channel's score: sum | l1 | l2 of its weights' scores, bn (BatchNorm scale)


@dataclass
class LoggerConfig:
    name: str = setting("none", one_of("none", "wandb"))
    project: str = "lottery"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    job_type: str | None = None
    log_every: int = setting(100, at_least(1))
    log_artifacts: bool = False


@dataclass
class CheckpointConfig:
    every: str = "500it"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    # The dataset's node: `name` (lottery.data.DATASETS), root, download, val_size, augment and the dataset's own
    # settings; checked against its registered settings before any work (lottery.experiment.check).
    dataset: dict[str, Any] = field(default_factory=lambda: {"name": MISSING})
    init: InitConfig = field(default_factory=InitConfig)
    # The optimizer's node: `name` (lottery.training.OPTIMIZERS), lr, weight_decay and the optimizer's own settings.
    optimizer: dict[str, Any] = field(default_factory=lambda: {"name": MISSING})
    train: TrainConfig = field(default_factory=TrainConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    name: str = "default"
    seed: int = setting(0, between(*SEED_RANGE, integer=True))
    data_seed: int | None = setting(None, between(*SEED_RANGE, integer=True))
    device: str = "auto"
    deterministic: bool = True  # CUDA: deterministic algorithms (lottery/device.py); false trades that for speed
    threads: int | None = setting(None, at_least(1))  # null: PyTorch's default
    # Replicates trained batched in one process (lottery.experiment.levels): a count R (seeds seed..seed+R-1) or a list
    # of seeds; each writes a normal run folder <run dir>/replicate_<seed>/. null: one run.
    replicas: Any | None = None
    # How replicas train: stacked (one batched matmul / grouped convolution per layer for all networks) | interleaved
    # (one step, each network through its own model) | sequential (one unit after another) | auto (stacked, except
    # models with convolutions on a CPU: interleaved; lottery.training.layouts.choose).
    replica_batching: str = "auto"
    # Settings of the branches in pruning.branches, one node per branch name (lottery.branches.BRANCHES).
    branch: dict[str, Any] = field(default_factory=dict)
    # The mask updater (lottery.training.updaters): `name` (none | set | rigl | gmp | a registered one) plus its
    # settings.
    dst: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    # Modules imported before the config is checked, so their @register_* calls (models, initializers, criteria,
    # branches) take effect: a user's extensions without editing lottery/.
    imports: list[str] = field(default_factory=list)
    ticket: str | None = None  # lottery-retrain: path of the ticket file to retrain
    # The published numbers a preset reproduces (lottery.core.papers): documentation, not part of the experiment
    # (NON_EXPERIMENT_KEYS), read by `lottery-report --paper`; open, checked by lottery.core.papers.check_block.
    paper: dict[str, Any] = field(default_factory=dict)
    # The end summary's answer: a ticket matches the dense network when its test accuracy is at most this far below.
    match_tolerance: float = setting(0.005, between(0, 1, hi_open=True))


# Keys that do not define an experiment: where data lives, how a run is logged, shown, checkpointed and launched,
# which controls are added. Used by resume (a changed key here is no different experiment), by `lottery-report` (never
# a condition) and by sweep folder names (never part of a job's name). A key covers the keys below it.
NON_EXPERIMENT_KEYS = (
    "name",
    "dataset.root",
    "dataset.download",
    "dataset.verify",
    "device",
    "deterministic",
    "threads",
    "logger",
    "checkpoint",
    "train.progress",
    "train.progress_every",
    "train.estimate",
    "match_tolerance",
    "train.compile",
    "train.eval_batch_size",
    "imports",
    "pruning.branches",
    "pruning.branch_levels",
    "train.on_divergence",
    "train.on_chance",
    "launcher",
    "sweep",
    "hydra",
    "replicas",
    "replica_batching",
    "paper",
)
# Keys that tell replicates of one condition apart: `lottery-report` averages over them.
REPLICATE_KEYS = ("seed", "data_seed", "ticket")


# Keys that only add work to a run: a finished IMP run extends with more levels (or a later target) in the same folder
# (lottery.experiment.folder checks that its earlier levels stay what they were), so the default run folder's name
# leaves them out too.
EXTENDING_KEYS = ("pruning.levels", "pruning.target")


def non_experiment(key: str, extra: tuple = ()) -> bool:
    return any(key == k or key.startswith(k + ".") for k in (*NON_EXPERIMENT_KEYS, *extra))


# A folder name is at most 255 bytes on common file systems; the job number and "_" come before this part.
DIRNAME_BYTES = 200


# Characters a job folder's name keeps as they are; `=` becomes `-`, a list's `,` becomes `+`, brackets, quotes and
# spaces go, anything else becomes `_`: no shell globbing or quoting hazard (`[`, `]`, `,`, `=`, `*`, ...).
_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-~")
_MAPPED = {"=": "-", ",": "+", "/": "_"}
_DROPPED = set("[](){}'\" ")


def _safe(text: str) -> str:
    return "".join(_MAPPED.get(c, c if c in _SAFE or ord(c) > 127 else "_") for c in text if c not in _DROPPED)


def _experiment_items(overrides) -> list[str]:
    return sorted(str(line) for line in overrides if not non_experiment(str(line).split("=", 1)[0].lstrip("+~")))


def _shorten(name: str) -> str:
    """Names longer than DIRNAME_BYTES keep their first part and end in "~" and 12 hex digits of the whole."""
    raw = name.encode()
    if len(raw) <= DIRNAME_BYTES:
        return name
    tail = "~" + hashlib.sha1(raw).hexdigest()[:12]
    return raw[: DIRNAME_BYTES - len(tail)].decode(errors="ignore") + tail


def job_dirname(overrides) -> str:
    """A sweep job's folder name: its overrides, sorted, without the keys that do not define an experiment, written
    with shell-safe characters only: `optimizer.lr=0.1 seed=1` is `optimizer.lr-0.1__seed-1`, a list
    `train.milestones=[10it,20it]` is `train.milestones-10it+20it`. Long names end in a digest of the whole (the same
    overrides give the same folder: resume; different ones different folders)."""
    return _shorten("__".join(_safe(item) for item in _experiment_items(overrides)))


def job_dirname_v1(overrides) -> str:
    """The name sweeps had before job_dirname (`optimizer.lr=0.1,seed=1`): such a folder still resumes."""
    return _shorten(",".join(item.replace("/", "_") for item in _experiment_items(overrides)))


def _job_dirname_here(overrides, root) -> str:
    """job_dirname, or the old name where the sweep folder holds this job under it (and not under the new one)."""
    name = job_dirname(overrides or [])
    try:
        sweep = Path(str(root.hydra.sweep.dir))
        num = root.hydra.job.num
        old = job_dirname_v1(overrides or [])
        if old != name and (sweep / f"{num}_{old}").is_dir() and not (sweep / f"{num}_{name}").exists():
            return old
    except Exception:  # noqa: BLE001, S110 - no sweep folder known: the new name
        pass
    return name


RUN_ID_HEX = 10


def run_id(root) -> str:
    """The default run folder's name below runs/<name>/ (hydra.run.dir): a digest of the settings that define the
    experiment, so rerunning the same command finds its folder and resumes. Left out: the keys that define no
    experiment (NON_EXPERIMENT_KEYS, which also leaves out where data lives and how the run is shown) and those that
    only add work (EXTENDING_KEYS: more levels find the run they extend). A replicas run and a single run of the same
    settings get different folders (one cannot hold the other)."""
    import json

    from omegaconf import OmegaConf

    flat: dict = {}

    def walk(value, prefix: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{prefix}{k}.")
        elif not non_experiment(prefix[:-1]) and not any(
            prefix[:-1] == k or prefix.startswith(k + ".") for k in EXTENDING_KEYS
        ):
            flat[prefix[:-1]] = value

    for key in root:
        if key == "hydra":
            continue
        try:
            value = OmegaConf.to_container(root[key], resolve=True) if OmegaConf.is_config(root[key]) else root[key]
        except Exception:  # noqa: BLE001 - an interpolation only a later step resolves: its text defines it as well
            value = (
                OmegaConf.to_container(root[key], resolve=False)
                if OmegaConf.is_config(root[key])
                else str(root._get_node(key))
            )
        walk(value, f"{key}.")
    flat["replicas"] = root.get("replicas") is not None
    text = json.dumps(flat, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:RUN_ID_HEX]


def conf_dir() -> str:
    """The configs: conf/ beside the package in a source checkout (editable install, PYTHONPATH), else the package
    lottery.conf that pyproject.toml builds from conf/ (a plain `pip install .` or a wheel), from any folder."""
    source = Path(__file__).resolve().parent.parent / "conf"
    return str(source) if (source / "config.yaml").is_file() else "pkg://lottery.conf"


# Nodes whose keys are a registered thing's own settings: open, so `dataset.verify=false` or `optimizer.momentum=0.9`
# needs no `+` whichever dataset or optimizer the composed config starts from (lottery-retrain starts from the
# defaults and takes the ticket's), and checked against the registry instead (lottery.experiment.check).
OPEN_NODES = ("dataset", "optimizer", "pruning.criterion", "branch", "dst", "paper")


def schema(struct: bool = False):
    """The typed schema of conf/config.yaml: every key a config can have, the OPEN_NODES open (`struct`: the rest
    closed, as in a composed config; Hydra closes it only once composed)."""
    from omegaconf import OmegaConf

    node = OmegaConf.structured(Config)
    if struct:
        OmegaConf.set_struct(node, True)
    for key in OPEN_NODES:
        OmegaConf.set_struct(OmegaConf.select(node, key), False)
    return node


class Node(Mapping):
    """An open node of the typed config (a registered thing's keys: `dataset`, `optimizer`, `pruning.criterion`,
    `dst`, `branch`, `paper`), read-only: its keys read as attributes (`cfg.dataset.name`) or items
    (`cfg.dst["name"]`, `.get`), nested nodes are Nodes. Its values were checked against the registry's settings
    class before the config became typed (lottery.experiment.check)."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping):
        object.__setattr__(self, "_values", {k: Node(v) if isinstance(v, Mapping) else v for k, v in values.items()})

    def __getitem__(self, key):
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, key):
        if key.startswith("__"):
            raise AttributeError(key)
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(
                f"config node has no key '{key}'; it has: {', '.join(self._values) or 'none'}"
            ) from None

    def __setattr__(self, key, value):
        raise AttributeError(f"the typed config is read-only (setting '{key}')")

    def __reduce__(self):
        return Node, (plain_values(self),)

    def __repr__(self) -> str:
        return f"Node({self._values!r})"


def plain_values(value: Any) -> Any:
    """Nodes and dataclasses of the typed config as plain dicts (lists as lists), e.g. for a registry's check."""
    if isinstance(value, Mapping):
        return {k: plain_values(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_values(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain_values(v) for v in value]
    return value


def typed(values: Mapping, cls: type | None = None, where: str = "") -> Config:
    """A checked, resolved config (plain values: `OmegaConf.to_container(cfg, resolve=True)` of a config that passed
    lottery.experiment.check) as the schema's dataclasses: what the code below the session reads, instead of a
    DictConfig. The open nodes become `Node`s; keys outside the schema (`hydra`, `launcher`, `sweep`: how a run is
    launched) are left out."""
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        key, value, hint = f"{where}{f.name}", values[f.name], hints[f.name]
        if key in OPEN_NODES and isinstance(value, Mapping):
            value = Node(value)
        elif isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            value = typed(value, hint, f"{key}.")
        elif isinstance(value, list):
            value = list(value)
        elif isinstance(value, Mapping):
            value = dict(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    cs = ConfigStore.instance()
    cs.store(name="lottery_schema", node=schema())
    if not OmegaConf.has_resolver("lottery_dirname"):
        OmegaConf.register_new_resolver(
            "lottery_dirname", lambda overrides, *, _root_: _job_dirname_here(overrides, _root_)
        )
    if not OmegaConf.has_resolver("lottery_run_id"):
        OmegaConf.register_new_resolver("lottery_run_id", lambda *, _root_: run_id(_root_))
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


def check_ranges(cfg) -> None:
    """Every key of the schema against the rule its field declares (lottery.core.ranges): one ValueError naming the
    first bad key, its value and the accepted range. The open nodes are checked by their registries against the
    registered settings classes' rules (lottery.core.registry.check_settings), in the same words."""
    import copy

    from omegaconf import OmegaConf

    from lottery.core.ranges import check_fields
    from lottery.core.registry import as_dict

    values = as_dict(cfg, resolve=True) if OmegaConf.is_config(cfg) else copy.deepcopy(dict(cfg))
    for key in OPEN_NODES:
        *parents, last = key.split(".")
        node = values
        for part in parents:
            node = node.get(part) or {}
        node.pop(last, None)
    check_fields(Config, values)


def import_extensions(cfg) -> None:
    """Import the modules in `imports` (a user's registered models, initializers, criteria, branches)."""
    import importlib

    for name in cfg.get("imports") or []:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f"imports entry '{name}' cannot be imported ({e}); put its folder on PYTHONPATH") from e
        except Exception as e:  # the user's module failed while importing: its error, in one line
            raise ValueError(
                f"imports entry '{name}' raised {type(e).__name__} while being imported: "
                f"{str(e).splitlines()[0] if str(e) else ''}; fix that module"
            ) from e
