"""Figures of the linear-mode-connectivity branch (lottery.branches.lmc): `lmc_path`, the error along the straight
line between the two copies, one line per level and step k; `instability`, the error barrier against the step k (one
line per level) and against weights remaining (one line per k). Mean over replicates, min-max band. Test is drawn
solid and train dashed, and the legends show it: a section of colours (levels or k) and one of line styles (splits).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, NullLocator

from lottery.report.collect import LMC, Warn, number, read_json, warn_stderr
from lottery.report.style import NEUTRAL, n_text, percent_axis, save, section_legend

if TYPE_CHECKING:
    from matplotlib.typing import LineStyleType

SPLITS: tuple[tuple[str, LineStyleType], ...] = (("test", "-"), ("train", (0, (5, 2))))


def _spread(values_by_key: dict) -> dict:
    """{key: [values over replicates]} -> {key: (mean, min, max, n)}, missing values left out."""
    out = {}
    for key, vs in values_by_key.items():
        vs = [v for v in map(number, vs) if v is not None]
        if vs:
            out[key] = (sum(vs) / len(vs), min(vs), max(vs), len(vs))
    return out


def _line(ax, xs, stats, color, style="-"):
    mean, lo, hi = ([s[i] for s in stats] for i in range(3))
    n = max(s[3] for s in stats)
    ax.plot(xs, mean, color=color, linestyle=style, marker="o", markersize=3)
    if n > 1:
        ax.fill_between(xs, lo, hi, color=color, alpha=0.18, linewidth=0)
    return n


def _lmc_groups(rows: list[dict]) -> dict:
    """{(model, dataset, extra condition): [lmc rows]}."""
    groups = defaultdict(list)
    for r in rows:
        if r.get("branch") == LMC and r.get("lmc_steps"):
            extra = r["condition"].split(", ", 1)[1] if ", " in r["condition"] else ""
            groups[(r["model"], r["dataset"], extra)].append(r)
    return dict(sorted(groups.items()))


def _steps_of(r: dict) -> list[int]:
    steps = r["lmc_steps"]
    steps = json.loads(steps) if isinstance(steps, str) else list(steps)
    return [int(k) for k in steps]


def _title(group) -> str:
    return f"{group[0]} on {group[1]}" + (f" [{group[2]}]" if group[2] else "")


def _legend(ax, colours: list[tuple], title: str, splits: bool = True) -> None:
    """Beside the axes: the colours (label, colour, n) under `title`, then the splits' line styles."""
    sections = [(title, [(Line2D([], [], color=c, linewidth=2.5), f"{lab} ({n_text(ns)})") for lab, c, ns in colours])]
    if splits:
        sections.append(
            (
                "split (line style)",
                [(Line2D([], [], color=NEUTRAL, linestyle=style, linewidth=1.5), split) for split, style in SPLITS],
            )
        )
    section_legend(ax, sections, anchor=(1.02, 1.0), fontsize=7)


def make_lmc_figures(rows: list[dict], out_dir, warn: Warn | None = None) -> list[Path]:
    """`lmc_path` and `instability` for the runs with the lmc branch (nothing without)."""
    warn = warn or warn_stderr
    groups = _lmc_groups(rows)
    if not groups:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    cmap = plt.get_cmap("viridis")

    # 1. error along the path, test and train
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 4.3 * len(groups)), squeeze=False)
    for i, (group, rs) in enumerate(groups.items()):
        # (level, k) -> split -> [curve per replicate]
        curves: defaultdict[tuple, defaultdict[str, list]] = defaultdict(lambda: defaultdict(list))
        alphas, percent = {}, defaultdict(list)
        for r in rs:
            path = Path(r["run_dir"]) / "levels" / f"level_{r['level']}" / LMC / "result.json"
            if not path.exists():
                continue
            result = read_json(path, warn, "its curves are left out of lmc_path")
            by_k = result.get("curves") if isinstance(result, dict) else None
            if not isinstance(by_k, dict):
                continue
            for k, c in by_k.items():
                try:
                    key = (r["level"], int(k))
                    series = {split: list(c[f"{split}_error"]) for split, _ in SPLITS}
                    alpha = list(c["alpha"])
                except (KeyError, TypeError, ValueError) as e:
                    warn(f"{path}: curve k={k} unreadable ({type(e).__name__}: {e}); left out of lmc_path")
                    continue
                alphas[key] = alpha
                percent[key].append(r["percent_remaining"])
                for split, values in series.items():
                    curves[key][split].append(values)
        keys = sorted(curves, key=lambda key: (-sum(percent[key]) / len(percent[key]), key[1]))
        colours = []
        for j, key in enumerate(keys):
            color = cmap(0.85 * j / max(1, len(keys) - 1))
            ns = []
            for ax, (split, _) in zip(axes[i], SPLITS):
                by_point = _spread(dict(enumerate(zip(*curves[key][split]))))
                points = [p for p in sorted(by_point) if p < len(alphas[key])]
                if points:
                    ns.append(_line(ax, [alphas[key][p] for p in points], [by_point[p] for p in points], color))
            colours.append((f"{sum(percent[key]) / len(percent[key]):.3g}% weights, k={key[1]}", color, ns or [0]))
        for ax, (split, _) in zip(axes[i], SPLITS):
            ax.set_xlabel("interpolation: 0 = copy a, 1 = copy b")
            ax.set_ylabel(f"{split} error (%)")
            ax.set_title(f"{_title(group)}: {split} error on the line between the copies", fontsize=9.5)
            ax.grid(True, alpha=0.3)
        _legend(axes[i][1], colours, "weights remaining, step k", splits=False)
    fig.suptitle(
        "Linear mode connectivity: two copies trained from step k on different data orders "
        "(line: mean over seeds, band: min to max)",
        fontsize=10.5,
    )
    fig.tight_layout()
    written += save(fig, out_dir, "lmc_path")

    # 2. instability against k (a line per level) and against weights remaining (a line per k)
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, 4.3 * len(groups)), squeeze=False)
    for i, (group, rs) in enumerate(groups.items()):
        by_key: defaultdict[tuple, list] = defaultdict(list)  # (split, level, k) -> values over replicates
        percent = defaultdict(list)
        for r in rs:
            percent[r["level"]].append(r["percent_remaining"])
            for k in _steps_of(r):
                for split, _ in SPLITS:
                    by_key[(split, r["level"], k)].append(r.get(f"instability_{split}_k{k}"))
        stats = _spread(by_key)
        levels = sorted(percent)
        ks = sorted({k for _, _, k in stats})
        pct = {lv: sum(percent[lv]) / len(percent[lv]) for lv in levels}
        ax = axes[i][0]
        colours = []
        for j, lv in enumerate(levels):
            color = cmap(0.85 * j / max(1, len(levels) - 1))
            ns = []
            for split, style in SPLITS:
                pts = [k for k in ks if (split, lv, k) in stats]
                if pts:
                    ns.append(_line(ax, pts, [stats[(split, lv, k)] for k in pts], color, style))
            if ns:
                colours.append((f"{pct[lv]:.3g}% weights", color, ns))
        _legend(ax, colours, "weights remaining (colour)")
        positive = [k for k in ks if k > 0]
        ax.set_xscale("symlog", linthresh=min(positive) if positive else 1)
        ax.xaxis.set_major_locator(FixedLocator(ks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("rewind step k the copies start from")
        ax.set_title(f"{_title(group)}: instability vs k", fontsize=9.5)
        ax = axes[i][1]
        colours = []
        for j, k in enumerate(ks):
            color = plt.get_cmap("plasma")(0.85 * j / max(1, len(ks) - 1))
            ns = []
            for split, style in SPLITS:
                pts = [lv for lv in levels if (split, lv, k) in stats]
                if pts:
                    ns.append(_line(ax, [pct[lv] for lv in pts], [stats[(split, lv, k)] for lv in pts], color, style))
            if ns:
                colours.append((f"k={k}", color, ns))
        _legend(ax, colours, "step k (colour)")
        percent_axis(ax, list(pct.values()))
        ax.set_title(f"{_title(group)}: instability vs weights remaining", fontsize=9.5)
        for ax in axes[i]:
            ax.set_ylabel("error barrier (percentage points)")
            ax.axhline(0, color="k", linewidth=0.6)
            ax.grid(True, alpha=0.3)
    fig.suptitle(
        "Instability: max error on the path minus the mean error of its ends "
        "(solid: test, dashed: train; mean over seeds, band: min to max)",
        fontsize=10.5,
    )
    fig.tight_layout()
    written += save(fig, out_dir, "instability")
    return written
