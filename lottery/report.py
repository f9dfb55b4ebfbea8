"""`lottery-report RUN_OR_SWEEP_DIR... [--out DIR]`: one table and the lottery-ticket figures from finished runs.

Every folder holding `summary.json` below the given paths is a run (a single `lottery-train` run or one job of a Hydra
multirun); a job folder with `error.txt` and no summary becomes one row with its error, so failed sweep jobs are seen.
Conditions are the branch (ticket and its controls) plus every config value that differs between the collected runs
other than the seed, so an initializer sweep gets one line per initializer without being told which key was swept.

A unit whose training diverged (`diverged: true` in its record, see lottery/divergence.py) has no accuracy: the
figures mark it with a red x at the bottom of the panel, at its sparsity, instead of a point on a curve.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works on clusters and in tests without a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

TICKET_LABEL = "winning ticket (IMP mask, {rewind})"
LMC = "lmc"  # lottery.branches.lmc's branch: figures of its own (error along the path, instability)
# Keys that only say how far pruning goes: they place a run's points along the x axis (weights remaining) and never
# split a line, so one-shot runs at several pruning.target values draw one line.
X_KEYS = ("pruning.target", "pruning.levels")
# Keys that make up a pruning method (criterion, when it scores, schedule, rewind point): when they differ between
# runs, each ticket line is labelled by its method (SNIP at init, IMP (magnitude), ...) instead of listing the keys.
METHOD_KEYS = ("pruning.criterion", "pruning.when", "pruning.one_shot", "pruning.from_dense", "pruning.rounds",
               "pruning.train_dense", "pruning.rewind")

FIRST_COLUMNS = ["run_dir", "overrides", "experiment", "model", "dataset", "init", "replicate", "level", "branch",
                 "condition", "diverged", "diverged_step", "percent_remaining", "weights_remaining", "params_remaining",
                 "weights_remaining_count", "weights_total", "test_accuracy", "early_stop_test_accuracy",
                 "early_stop_step", "test_loss", "val_loss", "val_accuracy", "early_stop_val_loss", "start_step",
                 "steps", "rewind"]


# --- collecting ----------------------------------------------------------------------------------------------------

def _flatten(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return out


def _ignored(key: str) -> bool:
    """Config keys that never define a condition: those that define no experiment, the replicate's seeds, and the
    keys that only say how far along the x axis a run goes."""
    from lottery.config import REPLICATE_KEYS, non_experiment
    return non_experiment(key, (*REPLICATE_KEYS, *X_KEYS))


def _is_method_key(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in METHOD_KEYS)


def method_label(cfg: dict, settings: list[str] = ()) -> str:
    """A run's pruning method in words, from its flattened config: 'SynFlow at init (100 rounds)', 'IMP (magnitude),
    rewound to 500it', 'one-shot magnitude after training'. `settings`: criterion keys to show (those that differ)."""
    from lottery.pruning import CRITERIA
    name = cfg.get("pruning.criterion.name") or "magnitude"
    crit = CRITERIA.get(name)
    text = crit.label if crit is not None else name
    shown = [f"{k.rsplit('.', 1)[1]}={cfg.get(k)}" for k in settings if k in cfg and k != "pruning.criterion.name"]
    if shown:
        text += f" ({', '.join(shown)})"
    when = (crit.when if crit is not None and crit.when else None) or cfg.get("pruning.when") or "after_training"
    rounds = int(cfg.get("pruning.rounds") or 1)
    rewind = str(cfg.get("pruning.rewind") or "0")
    if when == "at_init":
        text = f"{text} at init" + (f" ({rounds} rounds)" if rounds > 1 else "")
        return text if rewind in ("0", "0it", "0ep") else f"{text} (scored at {rewind})"
    if cfg.get("pruning.one_shot") or cfg.get("pruning.from_dense"):
        text = f"one-shot {text} after training"
    else:
        text = f"IMP ({text})"
    return text + (", original init" if rewind in ("0", "0it", "0ep") else f", rewound to {rewind}")


def _branch_order() -> list[str]:
    from lottery.branches import BRANCHES
    return ["ticket", "retrain", *[b for b in BRANCHES if b != "retrain"]]


def _load_config(run_dir: Path) -> dict:
    from omegaconf import OmegaConf
    path = run_dir / "config.yaml"
    return _flatten(OmegaConf.to_container(OmegaConf.load(path), resolve=False)) if path.exists() else {}


def _overrides(run_dir: Path) -> str:
    """The command-line overrides of a Hydra job (what distinguishes sweep jobs to a reader)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return ""
    from omegaconf import OmegaConf
    return " ".join(str(o) for o in OmegaConf.load(path))


def _error(path: Path) -> str:
    return path.read_text(errors="replace").strip().splitlines()[0] if path.stat().st_size else "error"


def _find(paths) -> tuple[list[Path], list[Path]]:
    """Run folders (summary.json) and job folders without a finished unit (error.txt, or config.yaml alone)."""
    runs, other, seen = [], [], set()
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"no such folder: {root}")
        markers = [*root.rglob("summary.json"), *root.rglob("error.txt"), *root.rglob("config.yaml")]
        for marker in sorted(markers):
            d = marker.parent
            inner = d.parts[len(root.parts):]
            # .hydra/ and .submitit/ hold launcher copies; wandb/ and levels/ belong to the run above them
            if d.resolve() in seen or any(p.startswith(".") or p in ("wandb", "levels") for p in inner):
                continue
            seen.add(d.resolve())
            (runs if (d / "summary.json").exists() else other).append(d)
    return sorted(runs), sorted(other)


def collect_runs(paths) -> list[dict]:
    """One row per summary record of every run folder below `paths`, plus one `error` row per failed job folder."""
    runs, failed = _find(paths)
    runs_set = set(runs)
    # a config.yaml in a folder below a run is not a job of its own (retrain folders might sit there)
    failed = [d for d in failed if not any(p in runs_set for p in d.parents)]
    configs = {d: _load_config(d) for d in runs}
    keys = set().union(*configs.values()) if configs else set()
    # a key missing from some configs (an added option) differs too: None vs a value
    swept = sorted(k for k in keys if not _ignored(k) and len({repr(c.get(k)) for c in configs.values()}) > 1)
    swept = [k for k in swept if not _follows_group(k, swept, configs.values())]
    method_keys = [k for k in swept if _is_method_key(k)]
    settings = [k for k in method_keys if k.startswith("pruning.criterion.")]
    from lottery.config import REPLICATE_KEYS
    rows = []
    for d in runs:
        cfg = configs[d]
        err = d / "error.txt"
        # a run that failed after its last finished unit: its summary is partial, say so
        error = _error(err) if err.exists() and err.stat().st_mtime >= (d / "summary.json").stat().st_mtime else None
        for rec in json.loads((d / "summary.json").read_text()):
            row = {"run_dir": str(d), "overrides": _overrides(d)}
            row.update({k: v for k, v in rec.items() if k not in ("layer_density", "instability_by_step")})
            for k, by_split in (rec.get("instability_by_step") or {}).items():
                row.update({f"instability_{split}_k{k}": v for split, v in by_split.items()})
            row["percent_remaining"] = 100 * rec["weights_remaining"]
            row["rewind"] = cfg.get("pruning.rewind")
            row.update({f"density.{name}": v for name, v in (rec.get("layer_density") or {}).items()})
            row.update({f"cfg.{k}": cfg.get(k) for k in swept})
            row["condition"] = _condition(row, swept)
            row["_replicate"] = repr([cfg.get(k) for k in REPLICATE_KEYS])  # not written: identifies the replicate
            if method_keys:
                row["method"] = method_label(cfg, settings)
            if error:
                row["error"] = error
            rows.append(row)
    for d in failed:
        error = _error(d / "error.txt") if (d / "error.txt").exists() else \
            "no finished unit: still running, or stopped before its first level ended"
        rows.append({"run_dir": str(d), "overrides": _overrides(d), "error": error})
    return rows


def _follows_group(key: str, swept: list[str], configs) -> bool:
    """True for an option that only differs because its group was switched (init.gain with init=xavier_normal)."""
    parts = key.split(".")
    names = [".".join(parts[:i]) + ".name" for i in range(len(parts) - 1, 0, -1)]  # innermost group first
    name = next((n for n in names if n in swept), None)
    if name is None or key == name:
        return False
    seen = {}
    return all(seen.setdefault(repr(c.get(name)), repr(c.get(key))) == repr(c.get(key)) for c in configs)


def _condition(row: dict, swept: list[str]) -> str:
    parts = [row["branch"]] + [f"{k.removesuffix('.name')}={row[f'cfg.{k}']}" for k in swept
                               if row[f"cfg.{k}"] is not None]  # init.variance of a kaiming run says nothing
    return ", ".join(parts)


def write_table(rows: list[dict], path_csv) -> Path:
    """All rows as CSV; columns are the union over rows (known ones first), dict and list values as JSON."""
    path = Path(path_csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    seen = dict.fromkeys(c for c in FIRST_COLUMNS if any(c in r for r in rows))
    for r in rows:
        seen.update(dict.fromkeys(k for k in r if not k.startswith("_")))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(seen), restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else ("" if v is None else v)
                        for k, v in r.items() if not k.startswith("_")})
    return path


# --- figures -------------------------------------------------------------------------------------------------------

def _label(row: dict) -> str:
    branch = row["branch"]
    rewind = str(row.get("rewind") or "0")
    from lottery.branches import label
    if "method" in row:  # methods differ: the method names the line, its keys are left out of the brackets
        extra = [p for p in row["condition"].split(", ")[1:] if not _is_method_key(p.split("=", 1)[0])]
        text = row["method"] if branch == "ticket" else f"{label(branch)}: {row['method']}"
        return text + (f" [{', '.join(extra)}]" if extra else "")
    text = TICKET_LABEL.format(rewind="original init" if rewind in ("0", "0it", "0ep") else f"rewound to {rewind}") \
        if branch == "ticket" else label(branch)
    extra = row["condition"].split(", ", 1)[1:]
    return text + (f" [{extra[0]}]" if extra else "")



def _curves(rows: list[dict], y_key: str) -> dict:
    """{(model, dataset): {condition: (label, xs, mean, lo, hi, n)}} with x in percent of weights remaining."""
    points = defaultdict(lambda: defaultdict(list))
    labels, seen = {}, set()
    for r in rows:
        if r.get(y_key) is None or r.get("level") is None or r.get("diverged"):
            continue
        key = ((r["model"], r["dataset"]), r["condition"])
        # points of a line are its densities (one-shot runs at several targets share a level number), and a density
        # reached by two runs of one replicate (IMP stopped at two targets) is one measurement, counted once
        x = round(r["percent_remaining"], 9)
        if (key, x, r.get("_replicate"), r.get("unit")) in seen:
            continue
        seen.add((key, x, r.get("_replicate"), r.get("unit")))
        points[key][-x].append((r["percent_remaining"], r[y_key]))
        labels[key] = _label(r)
    out = defaultdict(dict)
    for (panel, cond), by_level in points.items():
        levels = sorted(by_level)
        xs = [sum(p[0] for p in by_level[lv]) / len(by_level[lv]) for lv in levels]
        ys = [[p[1] for p in by_level[lv]] for lv in levels]
        out[panel][cond] = (labels[(panel, cond)], xs, [sum(v) / len(v) for v in ys], [min(v) for v in ys],
                            [max(v) for v in ys], max(len(v) for v in ys))
    return out


def _order(cond: str):
    branch, order = cond.split(", ")[0], _branch_order()
    return (order.index(branch) if branch in order else len(order), cond)


def _colors(conditions) -> dict:
    cmap = plt.get_cmap("tab10")
    return {c: cmap(i % 10) for i, c in enumerate(sorted(set(conditions), key=_order))}


def _percent_axis(ax, xs) -> None:
    """Log x axis, reversed (dense on the left), labelled at the measured sparsities: 100, 51.2, 21.1, ..."""
    ax.set_xscale("log")
    ticks = sorted(set(round(x, 6) for x in xs), reverse=True)
    if ticks:
        step = max(1, math.ceil(len(ticks) / 9))
        ticks = ticks[::step]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{t:.3g}" for t in ticks])
        lo, hi = min(xs), max(xs)
        ax.set_xlim(hi * 1.15, lo / 1.15)  # reversed: pruning proceeds to the right
    ax.set_xlabel("Weights remaining (%, log scale)")
    ax.grid(True, which="major", alpha=0.3)


def _draw(ax, curves: dict, colors: dict, scale: float = 1.0) -> None:
    for cond in sorted(curves, key=_order):
        label, xs, mean, lo, hi, n = curves[cond]
        c = colors[cond]
        style = "-" if cond.startswith("ticket") else "--"
        ax.plot(xs, [scale * v for v in mean], style, color=c, marker="o", markersize=3.5, label=f"{label} (n={n})")
        if n > 1:
            ax.fill_between(xs, [scale * v for v in lo], [scale * v for v in hi], color=c, alpha=0.18, linewidth=0)


def _minor_label(lowest: float):
    """Minor log ticks: all labelled when the axis spans little more than a decade, else only 2x and 5x ones."""
    def fmt(v, _):
        mantissa = round(v / 10 ** math.floor(math.log10(v)))
        return f"{v:.2g}" if 100 / max(lowest, 1e-9) < 30 or mantissa in (2, 5) else ""
    return fmt


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.svg"]
    with plt.rc_context({"svg.fonttype": "none"}):  # SVG text stays text: searchable, editable, smaller
        for p in paths:
            fig.savefig(p, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def _legend_below(fig, axes) -> None:
    handles = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=1, fontsize=8, frameon=False)


def _finish_with_legend(fig, axes, title: str, bottom: float, out_dir: Path, stem: str) -> list[Path]:
    """Title, layout above the legend's room (`_with_legend`), the legend below the plots, saved and closed."""
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    _legend_below(fig, axes)
    return _save(fig, out_dir, stem)


def _with_legend(height: float, entries: int) -> tuple[float, float]:
    """(figure height, bottom of the plot area) leaving room below the plots for a one-column legend of `entries`."""
    legend = 0.3 + 0.17 * entries  # inches: font size 8, one line per entry
    return height + legend, legend / (height + legend)


def _band_note(n_max: int) -> str:
    return "line: mean over the n seeds, shaded band: min to max" if n_max > 1 else "one seed per condition"


DIVERGED_LABEL = "diverged (no accuracy; at its sparsity)"


def _diverged(rows: list[dict]) -> dict:
    """{(model, dataset): [percent remaining of each diverged unit]}."""
    out = defaultdict(list)
    for r in rows:
        if r.get("diverged") and r.get("level") is not None:
            out[(r["model"], r["dataset"])].append(r["percent_remaining"])
    return out


def _mark_diverged(ax, xs: list[float]) -> None:
    """Red x's at the bottom of the panel (y in axes coordinates, so they never move the accuracy scale)."""
    if xs:
        ax.plot(xs, [0.04] * len(xs), "x", color="red", markersize=7, mew=2, clip_on=False, label=DIVERGED_LABEL,
                transform=blended_transform_factory(ax.transData, ax.transAxes))


# --- linear mode connectivity (lottery.branches.lmc) -------------------------------------------------------------------------

def _spread(values_by_key: dict) -> dict:
    """{key: [values over replicates]} -> {key: (mean, min, max, n)}, None values left out."""
    out = {}
    for key, vs in values_by_key.items():
        vs = [v for v in vs if v is not None]
        if vs:
            out[key] = (sum(vs) / len(vs), min(vs), max(vs), len(vs))
    return out


def _line(ax, xs, stats, color, label, style="-"):
    mean, lo, hi = ([s[i] for s in stats] for i in range(3))
    n = max(s[3] for s in stats)
    ax.plot(xs, mean, style, color=color, marker="o", markersize=3, label=f"{label} (n={n})")
    if n > 1:
        ax.fill_between(xs, lo, hi, color=color, alpha=0.18, linewidth=0)


def _lmc_groups(rows: list[dict]) -> dict:
    """{(model, dataset, extra condition): [lmc rows]}."""
    groups = defaultdict(list)
    for r in rows:
        if r["branch"] == LMC and r.get("lmc_steps"):
            extra = r["condition"].split(", ", 1)[1] if ", " in r["condition"] else ""
            groups[(r["model"], r["dataset"], extra)].append(r)
    return dict(sorted(groups.items()))


def _steps_of(r: dict) -> list[int]:
    steps = r["lmc_steps"]
    return json.loads(steps) if isinstance(steps, str) else list(steps)


def _title(group) -> str:
    return f"{group[0]} on {group[1]}" + (f" [{group[2]}]" if group[2] else "")


def make_lmc_figures(rows: list[dict], out_dir) -> list[Path]:
    """`lmc_path`: error along the straight line between the two copies, one line per level and step k;
    `instability`: error barrier against the step k (one line per level) and against weights remaining (one line per
    k). Mean over replicates, min-max band."""
    groups = _lmc_groups(rows)
    if not groups:
        return []
    out_dir = Path(out_dir)
    written = []
    cmap = plt.get_cmap("viridis")

    # 1. error along the path, test and train
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 4.3 * len(groups)), squeeze=False)
    for i, (group, rs) in enumerate(groups.items()):
        curves = defaultdict(lambda: defaultdict(list))  # (level, k) -> split -> [curve per replicate]
        alphas, percent = {}, defaultdict(list)
        for r in rs:
            path = Path(r["run_dir"]) / "levels" / f"level_{r['level']}" / LMC / "result.json"
            if not path.exists():
                continue
            for k, c in json.loads(path.read_text()).get("curves", {}).items():
                key = (r["level"], int(k))
                alphas[key] = c["alpha"]
                percent[key].append(r["percent_remaining"])
                for split in ("test", "train"):
                    curves[key][split].append(c[f"{split}_error"])
        keys = sorted(curves, key=lambda key: (-sum(percent[key]) / len(percent[key]), key[1]))
        for j, key in enumerate(keys):
            color = cmap(0.85 * j / max(1, len(keys) - 1))
            label = f"{sum(percent[key]) / len(percent[key]):.3g}% weights, k={key[1]}"
            for ax, split in zip(axes[i], ("test", "train")):
                by_point = _spread(dict(enumerate(zip(*curves[key][split]))))
                xs = [alphas[key][p] for p in sorted(by_point)]
                _line(ax, xs, [by_point[p] for p in sorted(by_point)], color, label)
        for ax, split in zip(axes[i], ("test", "train")):
            ax.set_xlabel("interpolation: 0 = copy a, 1 = copy b")
            ax.set_ylabel(f"{split} error (%)")
            ax.set_title(f"{_title(group)}: {split} error on the line between the copies", fontsize=9.5)
            ax.grid(True, alpha=0.3)
        axes[i][0].legend(fontsize=7)
    fig.suptitle("Linear mode connectivity: two copies trained from step k on different data orders "
                 "(line: mean over seeds, band: min to max)", fontsize=10.5)
    fig.tight_layout()
    written += _save(fig, out_dir, "lmc_path")

    # 2. instability against k (a line per level) and against weights remaining (a line per k)
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 4.3 * len(groups)), squeeze=False)
    for i, (group, rs) in enumerate(groups.items()):
        values = defaultdict(list)  # (split, level, k) -> values over replicates
        percent = defaultdict(list)
        for r in rs:
            percent[r["level"]].append(r["percent_remaining"])
            for k in _steps_of(r):
                for split in ("test", "train"):
                    values[(split, r["level"], k)].append(r.get(f"instability_{split}_k{k}"))
        stats = _spread(values)
        levels = sorted(percent)
        ks = sorted({k for _, _, k in stats})
        pct = {lv: sum(percent[lv]) / len(percent[lv]) for lv in levels}
        ax = axes[i][0]
        for j, lv in enumerate(levels):
            color = cmap(0.85 * j / max(1, len(levels) - 1))
            for split, style in (("test", "-"), ("train", "--")):
                pts = [k for k in ks if (split, lv, k) in stats]
                if pts:
                    _line(ax, pts, [stats[(split, lv, k)] for k in pts], color,
                          f"{pct[lv]:.3g}% weights, {split}", style)
        positive = [k for k in ks if k > 0]
        ax.set_xscale("symlog", linthresh=min(positive) if positive else 1)
        ax.xaxis.set_major_locator(FixedLocator(ks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("rewind step k the copies start from")
        ax.set_title(f"{_title(group)}: instability vs k", fontsize=9.5)
        ax = axes[i][1]
        for j, k in enumerate(ks):
            color = plt.get_cmap("plasma")(0.85 * j / max(1, len(ks) - 1))
            for split, style in (("test", "-"), ("train", "--")):
                pts = [lv for lv in levels if (split, lv, k) in stats]
                if pts:
                    _line(ax, [pct[lv] for lv in pts], [stats[(split, lv, k)] for lv in pts], color,
                          f"k={k}, {split}", style)
        _percent_axis(ax, list(pct.values()))
        ax.set_title(f"{_title(group)}: instability vs weights remaining", fontsize=9.5)
        for ax in axes[i]:
            ax.set_ylabel("error barrier (percentage points)")
            ax.axhline(0, color="k", linewidth=0.6)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("Instability: max error on the path minus the mean error of its ends "
                 "(solid: test, dashed: train; mean over seeds, band: min to max)", fontsize=10.5)
    fig.tight_layout()
    written += _save(fig, out_dir, "instability")
    return written


def make_figures(rows: list[dict], out_dir) -> list[Path]:
    """The lottery-ticket figure, early-stop iteration and per-layer density, each as PNG and SVG."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in rows if r.get("level") is not None]  # a run that failed later still has its finished levels
    if not rows:
        return []
    written = make_lmc_figures(rows, out_dir)
    # the lmc branch has its own figures; its record's accuracy is one of its copies', not a condition of its own
    rows = [r for r in rows if r["branch"] != LMC]
    if not rows:
        return written
    final, early = _curves(rows, "test_accuracy"), _curves(rows, "early_stop_test_accuracy")
    steps = _curves(rows, "early_stop_step")
    has_early = any(early.values())  # none without a validation split (dataset.val_size=0)
    diverged = _diverged(rows)
    panels = sorted(set(final) | set(diverged))
    colors = _colors(c for p in final.values() for c in p)
    n_max = max((c[5] for p in final.values() for c in p.values()), default=1)

    # 1. accuracy vs sparsity: at the end of training and at the early-stop iteration
    height, bottom = _with_legend(4.3 * len(panels), len(colors))
    fig, axes = plt.subplots(len(panels), 1 + has_early, figsize=(6 + 6 * has_early, height), squeeze=False,
                             sharey="row")
    for i, panel in enumerate(panels):
        for ax, curves, what in ((axes[i][0], final.get(panel, {}), "at the end of training"),
                                 (axes[i][-1], early.get(panel, {}), "at early stop (min. validation loss)"))[
                                     :1 + has_early]:
            _draw(ax, curves, colors, scale=100)
            _mark_diverged(ax, diverged.get(panel, []))
            _percent_axis(ax, [x for c in curves.values() for x in c[1]] + diverged.get(panel, []))
            ax.set_title(f"{panel[0]} on {panel[1]}: test accuracy {what}", fontsize=9.5)
        axes[i][0].set_ylabel("Test accuracy (%)")
    written += _finish_with_legend(fig, axes.flat,
                                   f"Lottery tickets vs controls across IMP levels ({_band_note(n_max)})", bottom,
                                   out_dir, "lottery_ticket")

    # 2. early-stop iteration vs sparsity (runs without a validation split have none)
    if has_early:
        height, bottom = _with_legend(4.3 * len(panels), len(colors))
        fig, axes = plt.subplots(len(panels), 1, figsize=(7.5, height), squeeze=False)
        for i, panel in enumerate(panels):
            ax = axes[i][0]
            curves = steps.get(panel, {})
            _draw(ax, curves, colors)
            _mark_diverged(ax, diverged.get(panel, []))
            _percent_axis(ax, [x for c in curves.values() for x in c[1]] + diverged.get(panel, []))
            ax.set_ylabel("Early-stop iteration\n(min validation loss)")
            ax.set_title(f"{panel[0]} on {panel[1]}: when training stops improving", fontsize=10)
        written += _finish_with_legend(fig, axes.flat,
                                       f"Early-stop iteration across IMP levels ({_band_note(n_max)})", bottom,
                                       out_dir, "early_stop")

    # 3. per-layer density of the ticket masks across levels (one panel per method when methods differ: each chooses
    # its own layer densities; their points are their densities, as one-shot runs all sit at level 1)
    groups = [(panel, m) for panel in panels
              for m in sorted({r.get("method") for r in rows if (r["model"], r["dataset"]) == panel},
                              key=lambda m: _method_rank(m or ""))]
    ncols = min(4, len(groups))
    fig, axes = plt.subplots(math.ceil(len(groups) / ncols), ncols, figsize=(7 * ncols, 4.5 * math.ceil(
        len(groups) / ncols)), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax, (panel, method) in zip(axes.flat, groups):
        tickets = [r for r in rows if (r["model"], r["dataset"]) == panel and r["branch"] == "ticket"
                   and r.get("method") == method]
        layers = list(dict.fromkeys(k for r in tickets for k in r if k.startswith("density.")))
        by_level = defaultdict(list)
        for r in tickets:
            by_level[r["level"] if method is None else -round(r["weights_remaining"], 9)].append(r)
        keys = sorted(by_level)
        xs = keys if method is None else list(range(len(keys)))
        cmap = plt.get_cmap("viridis")
        for j, layer in enumerate(layers):
            ys = [100 * sum(r.get(layer, math.nan) for r in by_level[k]) / len(by_level[k]) for k in keys]
            ax.plot(xs, ys, marker="o", markersize=3.5, color=cmap(j / max(1, len(layers) - 1)),
                    label=layer.removeprefix("density."))
        overall = [100 * sum(r["weights_remaining"] for r in by_level[k]) / len(by_level[k]) for k in keys]
        ax.plot(xs, overall, "k--", linewidth=1, label="all prunable weights")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label(min(min(overall), *[min(l.get_ydata()) for l in ax.lines]))))
        ax.set_xticks(xs)
        if method is None:
            ax.set_xticklabels([f"{lv}\n{o:.3g}%" for lv, o in zip(keys, overall)], fontsize=7)
            ax.set_xlabel("IMP level (and overall weights remaining)")
        else:
            ax.set_xticklabels([f"{o:.3g}%" for o in overall], fontsize=7)
            ax.set_xlabel("Overall weights remaining")
        ax.set_ylabel("Weights remaining in the layer (%, log scale)")
        ax.set_title(f"{panel[0]} on {panel[1]}: per-layer density of the "
                     + ("ticket mask" if method is None else f"mask\n{method}"), fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(layers) > 8 else 1)
    fig.tight_layout()
    written += _save(fig, out_dir, "layer_density")
    return written + _method_figures(rows, out_dir, n_max)


def _method_rank(method: str) -> tuple:
    """IMP (the ceiling) first, then one-shot after training, random at init (the floor), the other methods."""
    kind = 0 if method.startswith("IMP") else 1 if method.startswith("one-shot") else \
        2 if method.startswith("random") else 3
    return kind, method


def _method_figures(rows: list[dict], out_dir: Path, n_max: int) -> list[Path]:
    """When runs differ in their pruning method: `methods` (test accuracy of every method's tickets against weights
    remaining, one line per method, the dense network dotted) and `ablations` (one panel per method: its tickets
    beside each branch run on them: layer_shuffle, reinit, invert, ...)."""
    rows = [r for r in rows if "method" in r]
    if len({r["method"] for r in rows}) < 2:
        return []
    from lottery.branches import label as branch_label
    panels = sorted({(r["model"], r["dataset"]) for r in rows})
    methods = sorted({r["method"] for r in rows}, key=_method_rank)
    cmap = plt.get_cmap("tab10")
    colors = {m: cmap(i % 10) for i, m in enumerate(methods)}

    def dense(ax, panel):
        # one dense network per replicate: the level 0 of every run of that seed is the same training
        accs = list({r["_replicate"]: r["test_accuracy"] for r in rows if (r["model"], r["dataset"]) == panel
                     and r["branch"] == "ticket" and r["level"] == 0 and r.get("test_accuracy") is not None}.values())
        if accs:
            ax.axhline(100 * sum(accs) / len(accs), color="k", linestyle=":", linewidth=1,
                       label=f"dense network (n={len(accs)})")

    written = []
    height, bottom = _with_legend(4.5, len(methods) + 1)
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), height), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        pruned = [r for r in rows if (r["model"], r["dataset"]) == panel and r["branch"] == "ticket" and r["level"]]
        curves = _curves(pruned, "test_accuracy").get(panel, {})
        by_method = {}
        for cond, curve in curves.items():
            by_method.setdefault(next(r["method"] for r in pruned if r["condition"] == cond), []).append(curve)
        for m in methods:
            for lab, xs, mean, lo, hi, n in by_method.get(m, []):
                role = " (ceiling)" if m.startswith("IMP") else " (floor)" if m.startswith("random") else ""
                style = "-" if m.startswith(("IMP", "one-shot")) else ":" if m.startswith("random") else "--"
                ax.plot(xs, [100 * v for v in mean], style, color=colors[m], marker="o", markersize=3.5,
                        linewidth=2 if m.startswith("IMP") else 1.5, label=f"{lab}{role} (n={n})")
                if n > 1:
                    ax.fill_between(xs, [100 * v for v in lo], [100 * v for v in hi], color=colors[m], alpha=0.15,
                                    linewidth=0)
        dense(ax, panel)
        _percent_axis(ax, [x for c in curves.values() for x in c[1]])
        ax.set_ylabel("Test accuracy (%)")
        ax.set_title(f"{panel[0]} on {panel[1]}: pruning methods, test accuracy at the end of training", fontsize=10)
    written += _finish_with_legend(fig, axes.flat, f"Pruning at initialization vs IMP ({_band_note(n_max)})", bottom,
                                   out_dir, "methods")

    with_branches = [m for m in methods if any(r["method"] == m and r["branch"] != "ticket" for r in rows)]
    if not with_branches:
        return written
    branches = [b for b in _branch_order() if any(r["branch"] == b for r in rows)]
    bcolors = {b: cmap(i % 10) for i, b in enumerate(branches)}
    ncols = min(4, len(with_branches))
    nrows = math.ceil(len(with_branches) / ncols) * len(panels)
    height, bottom = _with_legend(3.8 * nrows, len(branches) + 1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, height), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for p_i, panel in enumerate(panels):
        for i, m in enumerate(with_branches):
            ax = axes[p_i * math.ceil(len(with_branches) / ncols) + i // ncols][i % ncols]
            ax.set_visible(True)
            mine = [r for r in rows if (r["model"], r["dataset"]) == panel and r["method"] == m and r["level"]]
            curves = _curves(mine, "test_accuracy").get(panel, {})
            for cond, (lab, xs, mean, lo, hi, n) in sorted(curves.items(), key=lambda kv: _order(kv[0])):
                b = cond.split(", ")[0]
                name = "ticket (the method's mask)" if b == "ticket" else branch_label(b)
                ax.plot(xs, [100 * v for v in mean], "-" if b == "ticket" else "--", color=bcolors[b], marker="o",
                        markersize=3, label=name)
                if n > 1:
                    ax.fill_between(xs, [100 * v for v in lo], [100 * v for v in hi], color=bcolors[b], alpha=0.15,
                                    linewidth=0)
            dense(ax, panel)
            _percent_axis(ax, [x for c in curves.values() for x in c[1]])
            ax.set_title(f"{m}\n{panel[0]} on {panel[1]}", fontsize=8.5)
            ax.set_ylabel("Test accuracy (%)")
    written += _finish_with_legend(fig, [a for a in axes.flat if a.get_visible()],
                                   f"Ablations of each method's masks ({_band_note(n_max)})", bottom, out_dir,
                                   "ablations")
    return written


# --- command line --------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="lottery-report",
        description="Collect every run below the given folders (single runs and Hydra multiruns) into runs.csv and "
                    "draw the lottery-ticket figures (PNG and SVG).")
    parser.add_argument("paths", nargs="+", help="run folders, sweep folders, or any folder above them")
    parser.add_argument("--out", help="output folder (default: <path>/report for one path, ./report otherwise)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else (Path(args.paths[0]) / "report" if len(args.paths) == 1 else Path("report"))
    try:
        rows = collect_runs(args.paths)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: no run folders (holding summary.json) below {' '.join(args.paths)}", file=sys.stderr)
        return 2
    written = [write_table(rows, out / "runs.csv"), *make_figures(rows, out)]
    n_runs = len({r["run_dir"] for r in rows if "level" in r})
    n_failed = sum(1 for r in rows if "level" not in r)
    n_diverged = sum(1 for r in rows if r.get("diverged"))
    print(f"{n_runs} runs" + (f", {n_failed} failed jobs (see the error column)" if n_failed else "")
          + (f", {n_diverged} diverged units (see the diverged column; red x in the figures)" if n_diverged else "")
          + ": wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
