"""Reading run folders into rows: one row per summary record, conditions from the settings that differ and matter.

Every folder holding `summary.json` below the given paths is a run (a single `lottery-train` run, one job of a Hydra
multirun, or one `replicate_<seed>/` folder of a replicas run); a job folder with `error.txt` and no summary becomes
one row with its error, so failed sweep jobs are seen. Conditions are the branch (ticket and its controls) plus every
config value that differs between the collected runs other than the seed, so an initializer sweep gets one line per
initializer without being told which key was swept. A setting that differs is part of a run's condition only where it
matters for that run: a per-kind rate (`pruning.rates.conv`) only for models with that layer kind, a layer rate only
for models with a matching layer, `branch.<name>.*` only for that branch's records, pruning settings never for a dense
run (`pruning=none`).

Nothing a run folder holds may stop the report: a file that cannot be read (truncated, empty, not what it should be)
is one warning line on stderr naming it, and the other runs are reported as usual; an unreadable summary becomes a
row with its error, like a failed job.
"""

from __future__ import annotations

import fnmatch
import json
import math
import sys
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

TICKET_LABEL = "winning ticket (IMP mask, {rewind})"
DENSE_LABEL = "dense network"
LMC = "lmc"  # lottery.branches.lmc's branch: figures of its own (error along the path, instability)
# Keys that only say how far pruning goes: they place a run's points along the x axis (weights remaining) and never
# split a line, so one-shot runs at several pruning.target values draw one line.
X_KEYS = ("pruning.target", "pruning.levels")
# Keys that make up a pruning method (criterion, when it scores, schedule, rewind point): when they differ between
# runs, each ticket line is labelled by its method (SNIP at init, IMP (magnitude), ...) instead of listing the keys.
METHOD_KEYS = (
    "pruning.criterion",
    "pruning.when",
    "pruning.one_shot",
    "pruning.from_dense",
    "pruning.rounds",
    "pruning.train_dense",
    "pruning.rewind",
    "pruning.retrain",
    "pruning.retrain_steps",
    "pruning.scope",
    "dst",
)
# Layer kinds with a per-kind rate (pruning.rates.<kind>); other pruned tensors (biases, BatchNorm) use pruning.rate
RATE_KINDS = ("linear", "conv", "output")

FIRST_COLUMNS = [
    "run_dir",
    "overrides",
    "experiment",
    "model",
    "dataset",
    "init",
    "replicate",
    "level",
    "branch",
    "condition",
    "diverged",
    "diverged_step",
    "percent_remaining",
    "weights_remaining",
    "params_remaining",
    "weights_remaining_count",
    "weights_total",
    "test_accuracy",
    "early_stop_test_accuracy",
    "early_stop_step",
    "test_loss",
    "val_loss",
    "val_accuracy",
    "early_stop_val_loss",
    "start_step",
    "steps",
    "rewind",
]

Warn = Callable[[str], None]


def warn_stderr(message: str) -> None:
    """One line on stderr: the report goes on."""
    print("warning: " + " ".join(str(message).split()), file=sys.stderr, flush=True)


def _why(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def number(v) -> float | None:
    """`v` as a finite float, or None (missing, text, NaN, a diverged unit's null)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


# --- reading files -------------------------------------------------------------------------------------------------


def _flatten(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return out


def _read_config(run_dir: Path, warn: Warn) -> dict | None:
    """The run's config.yaml as a plain nested dict; {} without one; None (after a warning) when it cannot be read."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return {}
    from omegaconf import OmegaConf

    try:
        node = OmegaConf.load(path)
        raw = OmegaConf.to_container(node, resolve=False)
        if raw is None:
            raise ValueError("empty file")
        if not isinstance(raw, dict):
            raise ValueError("not a mapping of settings")
        return raw
    except Exception as e:  # noqa: BLE001 - any broken file is a warning, never the end of the report
        warn(f"{path}: unreadable ({_why(e)}); the run is reported without its settings")
        return None


def _overrides(run_dir: Path, warn: Warn) -> str:
    """The command-line overrides of a Hydra job (what distinguishes sweep jobs to a reader): the run folder's own,
    or, for a replicate of a replicas run (replicate_<seed>/ below the job's folder), its job's."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists() and run_dir.name.startswith("replicate_") and (run_dir.parent / "replicas.json").exists():
        path = run_dir.parent / ".hydra" / "overrides.yaml"
    if not path.exists():
        return ""
    from omegaconf import OmegaConf

    try:
        return " ".join(str(o) for o in OmegaConf.load(path))
    except Exception as e:  # noqa: BLE001 - any unreadable overrides file is a warning, not the end
        warn(f"{path}: unreadable ({_why(e)}); overrides left empty")
        return ""


def _error(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError as e:
        return f"error ({_why(e)})"
    return text.splitlines()[0] if text else "error"


REQUIRED = ("level", "branch", "weights_remaining")


def _valid_record(rec) -> bool:
    return (
        isinstance(rec, dict)
        and isinstance(rec.get("level"), int)
        and not isinstance(rec.get("level"), bool)
        and isinstance(rec.get("branch"), str)
        and number(rec.get("weights_remaining")) is not None
    )


def read_summary(path: Path, warn: Warn) -> tuple[list | None, str | None]:
    """(records, None), or (None, why) after one warning line when the file holds no usable record."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        why = f"unreadable ({_why(e)})"
    else:
        if not text.strip():
            why = "empty file"
        else:
            try:
                data = json.loads(text)
            except ValueError as e:
                why = f"not valid JSON, truncated? ({_why(e)})"
            else:
                if not isinstance(data, list):
                    why = "not a list of records"
                else:
                    records = [r for r in data if _valid_record(r)]
                    if len(records) < len(data):
                        if not records:
                            why = f"no record with {', '.join(REQUIRED)}"
                        else:
                            warn(
                                f"{path}: {len(data) - len(records)} of {len(data)} records lack "
                                f"{', '.join(REQUIRED)}; left out"
                            )
                            return records, None
                    else:
                        return records, None
    warn(f"{path}: {why}; the run has no results in the report")
    return None, why


def read_json(path: Path, warn: Warn, what: str = "left out"):
    """A JSON file's content, or None after one warning line."""
    try:
        text = path.read_text()
        if not text.strip():
            raise ValueError("empty file")
        return json.loads(text)
    except (OSError, ValueError) as e:
        warn(f"{path}: unreadable ({_why(e)}); {what}")
        return None


# --- finding runs --------------------------------------------------------------------------------------------------


def _find(paths) -> tuple[list[Path], list[Path]]:
    """Run folders (summary.json) and job folders without a finished unit (error.txt, or config.yaml alone)."""
    runs: list[Path] = []
    other: list[Path] = []
    seen: set = set()
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"no such folder: {root}")
        markers = [*root.rglob("summary.json"), *root.rglob("error.txt"), *root.rglob("config.yaml")]
        for marker in sorted(markers):
            d = marker.parent
            inner = d.parts[len(root.parts) :]
            # .hydra/ and .submitit/ hold launcher copies; wandb/ and levels/ belong to the run above them
            if d.resolve() in seen or any(p.startswith(".") or p in ("wandb", "levels") for p in inner):
                continue
            seen.add(d.resolve())
            (runs if (d / "summary.json").exists() else other).append(d)
    return sorted(runs), sorted(other)


# --- what a setting means for a run --------------------------------------------------------------------------------


def _ignored(key: str) -> bool:
    """Config keys that never define a condition: those that define no experiment, the replicate's seeds, and the
    keys that only say how far along the x axis a run goes."""
    from lottery.config import REPLICATE_KEYS, non_experiment

    return non_experiment(key, (*REPLICATE_KEYS, *X_KEYS))


def is_method_key(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in METHOD_KEYS)


def _follows_group(key: str, swept: list[str], configs) -> bool:
    """True for an option that only differs because its group was switched (init.gain with init=xavier_normal)."""
    parts = key.split(".")
    names = [".".join(parts[:i]) + ".name" for i in range(len(parts) - 1, 0, -1)]  # innermost group first
    name = next((n for n in names if n in swept), None)
    if name is None or key == name:
        return False
    seen: dict = {}
    return all(seen.setdefault(repr(c.get(name)), repr(c.get(key))) == repr(c.get(key)) for c in configs)


@lru_cache(maxsize=64)
def _model_layer_kinds(model_json: str, dataset_json: str) -> tuple | None:
    """((parameter name, kind), ...) of a model as lottery.masks classifies them (linear, conv, output, bias,
    batchnorm), built on the meta device (no memory, no weights); None when it cannot be built here (a user's model
    whose module was not imported)."""
    try:
        import dataclasses

        import torch
        from torch import nn

        from lottery.data import DATASETS
        from lottery.models import build_model

        node = json.loads(model_json)
        name = node.pop("name")
        data = json.loads(dataset_json)  # the input shape and classes come from the dataset's registration
        entry = DATASETS[data["name"]]
        own = (
            {f.name: data.get(f.name, f.default) for f in dataclasses.fields(entry.settings)} if entry.settings else {}
        )
        with torch.device("meta"):
            model = build_model(
                name, entry.shape(own), entry.num_classes, **{k: v for k, v in node.items() if not k.startswith("_")}
            )
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        kinds = []
        for mod_name, mod in model.named_modules():
            prefix = f"{mod_name}." if mod_name else ""
            if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                kind = (
                    "output" if linears and mod is linears[-1] else "linear" if isinstance(mod, nn.Linear) else "conv"
                )
                kinds.append((prefix + "weight", kind))
                if mod.bias is not None:
                    kinds.append((prefix + "bias", "bias"))
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.affine:
                kinds += [(prefix + "weight", "batchnorm"), (prefix + "bias", "batchnorm")]
        return tuple(kinds)
    except Exception:  # noqa: BLE001 - unknown to this process: every per-kind setting is taken to matter
        return None


def pruned_kinds(raw_cfg: dict, layers: list[str]) -> set | None:
    """Kinds of the tensors a run prunes: from its records' layer_density keys when they name the model's parameters,
    else every weight kind of its model; None when unknown."""
    model = raw_cfg.get("model") if isinstance(raw_cfg, dict) else None
    dataset = raw_cfg.get("dataset") if isinstance(raw_cfg, dict) else None
    if not isinstance(model, dict) or not model.get("name") or not isinstance(dataset, dict):
        return None
    kinds = _model_layer_kinds(
        json.dumps(model, sort_keys=True, default=str), json.dumps(dataset, sort_keys=True, default=str)
    )
    if kinds is None:
        return None
    by_name = dict(kinds)
    named = {by_name[n] for n in layers if n in by_name}
    if named:
        return named
    return {k for n, k in kinds if k in RATE_KINDS}


def _matters(
    key: str, cfg: dict, branch: str, dense_only: bool, kinds: Callable[[], set | None], layers: list[str]
) -> bool:
    """Whether a setting that differs between runs says something about this record of this run."""
    if cfg.get(key) is None:  # init.variance of a kaiming run says nothing
        return False
    if key == "branch":
        return False  # no branch settings at all (an empty node) beside runs that have some
    if key.startswith("branch."):
        return key.split(".")[1] == branch  # a branch's settings change only that branch's units
    if key.startswith("pruning.") and dense_only:
        return False  # nothing was pruned
    if key.startswith("pruning.rates."):
        known = kinds()
        return known is None or key.split(".")[2] in known
    if key.startswith("pruning.layer_rates."):
        pattern = key[len("pruning.layer_rates.") :]
        return not layers or any(
            fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, pattern + ".weight") for n in layers
        )
    if key == "pruning.rate" and cfg.get("pruning.scope") != "global":
        known = kinds()  # the default rate of the kinds without a per-kind rate
        return known is None or any(k not in RATE_KINDS or cfg.get(f"pruning.rates.{k}") is None for k in known)
    return True


# --- labels --------------------------------------------------------------------------------------------------------


def method_label(cfg: dict, settings: Sequence[str] = (), scope: bool = False) -> str:
    """A run's pruning method in words, from its flattened config: 'SynFlow at init (100 rounds)', 'IMP (magnitude),
    rewound to 500it', 'one-shot magnitude after training'. `settings`: criterion keys to show (those that differ).
    A criterion this process does not know (a user's, not imported) is named by its name."""
    from lottery.pruning import CRITERIA

    name = cfg.get("pruning.criterion.name") or "magnitude"
    crit = CRITERIA.get(name)
    text = crit.label if crit is not None else str(name)
    shown = [
        f"{k.rsplit('.', 1)[1]}={cfg.get(k)}"
        for k in settings
        if k in cfg and k != "pruning.criterion.name" and cfg.get(k) is not None
    ]
    if shown:
        text += f" ({', '.join(shown)})"
    when = (crit.when if crit is not None and crit.when else None) or cfg.get("pruning.when") or "after_training"
    try:
        rounds = int(cfg.get("pruning.rounds") or 1)
    except (TypeError, ValueError):
        rounds = 1
    rewind = str(cfg.get("pruning.rewind") or "0")
    scope_name = cfg.get("pruning.scope") or "layerwise"
    densities = {"uniform": ", uniform densities", "er": ", ER densities", "erk": ", ERK densities"}.get(
        scope_name, f", {scope_name}" if scope else ""
    )  # layerwise / global only where runs differ in it
    dst = cfg.get("dst.name") or "none"
    if dst == "gmp":  # gradual magnitude pruning: its own distribution of each step's count over the layers
        dist = cfg.get("dst.distribution") or "uniform"
        return "gradual magnitude pruning" + (
            {"uniform": ", uniform densities", "er": ", ER densities", "erk": ", ERK densities"}.get(dist, f", {dist}")
        )
    if dst != "none":  # dynamic sparse training: its rule names the method (SET, RigL), from random masks
        return {"set": "SET", "rigl": "RigL"}.get(dst, str(dst)) + densities
    if when == "at_init":
        text = f"{text} at init" + (f" ({rounds} rounds)" if rounds > 1 else "") + densities
        return text if rewind in ("0", "0it", "0ep") else f"{text} (scored at {rewind})"
    if cfg.get("pruning.one_shot") or cfg.get("pruning.from_dense"):
        text = f"one-shot {text} after training"
    else:
        text = f"IMP ({text})"
    retrain = cfg.get("pruning.retrain") or "weight_rewind"
    if retrain == "finetune":
        return text + densities + ", fine-tuned"
    if retrain == "lr_rewind":
        return (
            text + densities + (", LR rewound to 0" if rewind in ("0", "0it", "0ep") else f", LR rewound to {rewind}")
        )
    return text + densities + (", original init" if rewind in ("0", "0it", "0ep") else f", rewound to {rewind}")


def branch_order() -> list[str]:
    from lottery.branches import BRANCHES

    return ["ticket", "retrain", *[b for b in BRANCHES if b != "retrain"]]


def branch_label(branch: str) -> str:
    """The registered branch's legend text, or its name for a branch this process does not know."""
    from lottery.branches import label

    return label(branch)


def ticket_label(row: dict) -> str:
    if row.get("_dense_only"):
        return DENSE_LABEL
    rewind = str(row.get("rewind") or "0")
    return TICKET_LABEL.format(rewind="original init" if rewind in ("0", "0it", "0ep") else f"rewound to {rewind}")


def label(row: dict) -> str:
    """A line's legend text from one of its rows: the ticket (or control) and the settings that make its condition."""
    branch = row["branch"]
    extra = [
        f"{k.removesuffix('.name')}={v}"
        for k, v in row.get("_settings", ())
        if "method" not in row or not is_method_key(k)
    ]
    if "method" in row:  # methods differ: the method names the line, its keys are left out of the brackets
        text = row["method"] if branch == "ticket" else f"{branch_label(branch)}: {row['method']}"
    else:
        text = ticket_label(row) if branch == "ticket" else branch_label(branch)
    return text + (f" [{', '.join(extra)}]" if extra else "")


# --- collecting ----------------------------------------------------------------------------------------------------


def _dense_only(cfg: dict, records: list, partial: bool) -> bool:
    """A run that prunes nothing (pruning=none: one level, no target): its records are the dense network's."""
    if any(r["level"] != 0 for r in records):
        return False
    if "pruning.levels" in cfg:
        return str(cfg.get("pruning.levels")) == "1" and cfg.get("pruning.target") is None
    return not partial


def collect_runs(paths, warn: Warn | None = None) -> list[dict]:
    """One row per summary record of every run folder below `paths`, plus one `error` row per failed job folder and
    per run folder whose summary cannot be read (after a warning line on stderr, or to `warn`)."""
    warn = warn or warn_stderr
    runs, failed = _find(paths)
    runs_set = set(runs)
    # a config.yaml in a folder below a run is not a job of its own (retrain folders might sit there)
    failed = [d for d in failed if not any(p in runs_set for p in d.parents)]
    raw = {d: _read_config(d, warn) for d in runs}
    configs = {d: _flatten(c) for d, c in raw.items() if c}
    keys = set().union(*configs.values()) if configs else set()
    # a key missing from some configs (an added option) differs too: None vs a value; runs without a readable config
    # do not make every key differ
    swept = sorted(k for k in keys if not _ignored(k) and len({repr(c.get(k)) for c in configs.values()}) > 1)
    swept = [k for k in swept if not _follows_group(k, swept, configs.values())]
    method_keys = [k for k in swept if is_method_key(k)]
    criterion_settings = [k for k in method_keys if k.startswith("pruning.criterion.")]
    # layerwise against global ranking is named in the labels only where runs differ in it (a distribution always is)
    _scopes_differ = (
        len({c.get("pruning.scope") or "layerwise" for c in configs.values()} - {"uniform", "er", "erk"}) > 1
    )
    from lottery.config import REPLICATE_KEYS

    rows = []
    for d in runs:
        cfg = configs.get(d, {})
        overrides = _overrides(d, warn)
        summary = d / "summary.json"
        records, why = read_summary(summary, warn)
        if records is None:
            rows.append(
                {
                    "run_dir": str(d),
                    "overrides": overrides,
                    "error": f"unreadable summary.json: {why}",
                    "_unreadable": True,
                }
            )
            continue
        err = d / "error.txt"
        # a run that failed after its last finished unit: its summary is partial, say so
        try:
            error = _error(err) if err.exists() and err.stat().st_mtime >= summary.stat().st_mtime else None
        except OSError:
            error = None
        dense_only = _dense_only(cfg, records, error is not None)
        layer_names = list(
            dict.fromkeys(n for r in records if isinstance(r.get("layer_density"), dict) for n in r["layer_density"])
        )
        kinds_cache: list = []

        def kinds(raw_cfg=raw.get(d) or {}, layers=layer_names, cache=kinds_cache):  # noqa: B008 - this run's, now
            if not cache:
                cache.append(pruned_kinds(raw_cfg, layers))
            return cache[0]

        method = (
            (
                DENSE_LABEL
                if dense_only
                else method_label(cfg, criterion_settings, "pruning.scope" in method_keys and _scopes_differ)
            )
            if method_keys
            else None
        )
        for rec in records:
            row: dict[str, Any] = {"run_dir": str(d), "overrides": overrides}
            row.update({k: v for k, v in rec.items() if k not in ("layer_density", "instability_by_step")})
            by_step = rec.get("instability_by_step")
            for k, by_split in by_step.items() if isinstance(by_step, dict) else ():
                if isinstance(by_split, dict):
                    row.update({f"instability_{split}_k{k}": v for split, v in by_split.items()})
            row["percent_remaining"] = 100 * float(rec["weights_remaining"])
            row.setdefault("model", cfg.get("model.name") or "unknown model")
            row.setdefault("dataset", cfg.get("dataset.name") or "unknown dataset")
            row["model"], row["dataset"] = str(row["model"]), str(row["dataset"])
            row["rewind"] = cfg.get("pruning.rewind")
            density = rec.get("layer_density")
            row.update({f"density.{name}": v for name, v in (density.items() if isinstance(density, dict) else ())})
            row.update({f"cfg.{k}": cfg.get(k) for k in swept})
            row["_settings"] = [
                (k, cfg.get(k)) for k in swept if _matters(k, cfg, rec["branch"], dense_only, kinds, layer_names)
            ]
            row["_dense_only"] = dense_only
            row["_criterion"] = cfg.get("pruning.criterion.name")
            row["_imports"] = cfg.get("imports")
            if method is not None:
                row["method"] = method
            row["condition"] = condition(row)
            row["_replicate"] = repr([cfg.get(k) for k in REPLICATE_KEYS] if cfg else [str(d)])  # not written
            if error:
                row["error"] = error
            rows.append(row)
    for d in failed:
        error = (
            _error(d / "error.txt")
            if (d / "error.txt").exists()
            else "no finished unit: still running, or stopped before its first level ended"
        )
        rows.append({"run_dir": str(d), "overrides": _overrides(d, warn), "error": error})
    return rows


def condition(row: dict) -> str:
    """The branch and the settings that differ between runs and matter for this record: 'ticket, init=xavier_normal'."""
    return ", ".join([row["branch"]] + [f"{k.removesuffix('.name')}={v}" for k, v in row.get("_settings", ())])


def write_table(rows: list[dict], path_csv) -> Path:
    """All rows as CSV; columns are the union over rows (known ones first), dict and list values as JSON."""
    import csv

    path = Path(path_csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    seen = dict.fromkeys(c for c in FIRST_COLUMNS if any(c in r for r in rows))
    for r in rows:
        seen.update(dict.fromkeys(k for k in r if not k.startswith("_")))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(seen), restval="")
        w.writeheader()
        for r in rows:
            w.writerow(
                {
                    k: json.dumps(v) if isinstance(v, (dict, list)) else ("" if v is None else v)
                    for k, v in r.items()
                    if not k.startswith("_")
                }
            )
    return path


def method_rank(method: str) -> tuple:
    """IMP (the ceiling) first, then one-shot after training, random at init (the floor), the other methods, and the
    dense network last."""
    kind = (
        0
        if method.startswith("IMP")
        else 1
        if method.startswith("one-shot")
        else 2
        if method.startswith("random")
        else 4
        if method == DENSE_LABEL
        else 3
    )
    return kind, method


def panel_of(row: dict) -> tuple[str, str]:
    return row["model"], row["dataset"]


def shown_keys(rows: list[dict]) -> dict:
    """{(model, dataset): settings worth naming there}: those with two or more values among the records of that panel
    where they matter (a panel's title already names its model and dataset; a setting of another model's layers or of
    a branch drawn elsewhere says nothing)."""
    values: dict = {}
    for r in rows:
        for k, v in r.get("_settings", ()):
            values.setdefault(panel_of(r), {}).setdefault(k, set()).add(repr(v))
    return {p: {k for k, vs in by_key.items() if len(vs) > 1} for p, by_key in values.items()}


def settings_text(row: dict, shown: dict, methods: bool) -> str:
    """The settings of a row that its panel shows: 'init=kaiming_normal, pruning.rates.conv=0.3' (method keys left
    out where the method names them)."""
    keys = shown.get(panel_of(row), set())
    return ", ".join(
        f"{k.removesuffix('.name')}={v}"
        for k, v in row.get("_settings", ())
        if k in keys and not (methods and is_method_key(k))
    )
