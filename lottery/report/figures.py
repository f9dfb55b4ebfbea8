"""The lottery-ticket figures: accuracy and early-stop step against weights remaining, per-layer density, and, when
runs differ in their pruning method, every method against IMP and each method's ablations.

A unit whose training diverged (`diverged: true` in its record, see lottery/core/divergence.py) has no accuracy: the
figures mark it with a red x at the bottom of the panel, at its sparsity, instead of a point on a curve.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: works on clusters and in tests without a display
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter
from matplotlib.transforms import blended_transform_factory

from lottery.report.collect import LMC, Warn, branch_order, label, method_rank, number, panel_of, warn_stderr
from lottery.report.style import LINESTYLES, MARKERS, PALETTE, Style, percent_axis, save, section_legend

DIVERGED_LABEL = "diverged (no accuracy; at its sparsity)"
AT_CHANCE_LABEL = "at chance: learned nothing (finite losses)"
DENSE_LINE = {"color": "k", "linestyle": (0, (1, 1)), "linewidth": 1.2}


# --- lines ---------------------------------------------------------------------------------------------------------


def _curves(rows: list[dict], y_key: str) -> dict:
    """{(model, dataset): {condition: (label, xs, mean, lo, hi, n)}} with x in percent of weights remaining."""
    points: defaultdict[Any, defaultdict[Any, list]] = defaultdict(lambda: defaultdict(list))
    labels: dict = {}
    seen: set = set()
    for r in rows:
        y = number(r.get(y_key))
        if y is None or r.get("level") is None or r.get("diverged"):
            continue
        key = (panel_of(r), r["condition"])
        # points of a line are its densities (one-shot runs at several targets share a level number), and a density
        # reached by two runs of one replicate (IMP stopped at two targets) is one measurement, counted once
        x = round(r["percent_remaining"], 9)
        if (key, x, r.get("_replicate"), r.get("unit")) in seen:
            continue
        seen.add((key, x, r.get("_replicate"), r.get("unit")))
        points[key][-x].append((r["percent_remaining"], y))
        if key not in labels or (labels[key][1] and not r.get("_dense_only")):  # a pruned run names a mixed line
            labels[key] = (label(r), bool(r.get("_dense_only")))
    out: defaultdict[Any, dict] = defaultdict(dict)
    for (panel, cond), by_level in points.items():
        levels = sorted(by_level)
        xs = [sum(p[0] for p in by_level[lv]) / len(by_level[lv]) for lv in levels]
        ys = [[p[1] for p in by_level[lv]] for lv in levels]
        out[panel][cond] = (
            labels[(panel, cond)][0],
            xs,
            [sum(v) / len(v) for v in ys],
            [min(v) for v in ys],
            [max(v) for v in ys],
            max(len(v) for v in ys),
        )
    return out


def _order(cond: str):
    branch, order = cond.split(", ")[0], branch_order()
    return (order.index(branch) if branch in order else len(order), cond)


def _draw(ax, panel, curves: dict, style: Style, legend, scale: float = 1.0, **plot_kw) -> None:
    """Each condition's mean line in its style, with a min-max band over replicates."""
    for cond in sorted(curves, key=_order):
        text, xs, mean, lo, hi, n = curves[cond]
        group, branch = style.of(panel, cond)
        kw = {**style.line(group, branch), **plot_kw}
        ax.plot(xs, [scale * v for v in mean], markersize=4, linewidth=1.5, label=f"_{text} (n={n})", **kw)
        legend.add(group, branch, n)
        if n > 1:
            ax.fill_between(
                xs, [scale * v for v in lo], [scale * v for v in hi], color=kw["color"], alpha=0.15, linewidth=0
            )


def _minor_label(lowest: float):
    """Minor log ticks: all labelled when the axis spans little more than a decade, else only 2x and 5x ones."""

    def fmt(v, _):
        if v <= 0:
            return ""
        mantissa = round(v / 10 ** math.floor(math.log10(v)))
        return f"{v:.2g}" if 100 / max(lowest, 1e-9) < 30 or mantissa in (2, 5) else ""

    return fmt


def _finish(fig, legend, title: str, out_dir: Path, stem: str) -> list[Path]:
    """Title, layout, the figure's legend to the right of the panels, saved and closed."""
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    section_legend(fig, legend.sections(), anchor=(1.0, 0.96))
    return save(fig, out_dir, stem)


def _band_note(n_max: int) -> str:
    return "line: mean over the n seeds, shaded band: min to max" if n_max > 1 else "one seed per condition"


def _diverged(rows: list[dict]) -> dict:
    """{(model, dataset): [percent remaining of each diverged unit]}."""
    out = defaultdict(list)
    for r in rows:
        if r.get("diverged") and r.get("level") is not None:
            out[panel_of(r)].append(r["percent_remaining"])
    return out


def _mark_diverged(ax, xs: list[float]) -> None:
    """Red x's at the bottom of the panel (y in axes coordinates, so they never move the accuracy scale)."""
    if xs:
        ax.plot(
            xs,
            [0.04] * len(xs),
            "x",
            color="red",
            markersize=7,
            mew=2,
            clip_on=False,
            label=DIVERGED_LABEL,
            transform=blended_transform_factory(ax.transData, ax.transAxes),
        )


def _at_chance(rows: list[dict], y_key: str) -> dict:
    """{(model, dataset): [(percent remaining, 100 * y) of each unit that ended at chance]}."""
    out = defaultdict(list)
    for r in rows:
        if r.get("at_chance") and r.get("level") is not None and r.get(y_key) is not None:
            out[panel_of(r)].append((r["percent_remaining"], 100 * r[y_key]))
    return out


def _mark_at_chance(ax, points: list) -> None:
    """Black rings around the points of units that learned nothing: measured, but not a result to compare."""
    if points:
        ax.plot(
            [x for x, _ in points],
            [y for _, y in points],
            "o",
            mfc="none",
            mec="black",
            markersize=10,
            mew=1.2,
            label=AT_CHANCE_LABEL,
            zorder=5,
        )


def _attempt(what: str, warn: Warn, fn, *args) -> list[Path]:
    """A figure that cannot be drawn (values no run of this framework writes) is a warning, not the end."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - see the docstring: a warning, not the end
        plt.close("all")
        warn(f"{what} not drawn: {type(e).__name__}: {e}")
        return []


# --- figures -------------------------------------------------------------------------------------------------------


def make_figures(rows: list[dict], out_dir, warn: Warn | None = None) -> list[Path]:
    """The lottery-ticket figure, early-stop iteration and per-layer density, each as PNG and SVG; with the lmc
    branch its figures; when methods differ the methods and ablations figures."""
    warn = warn or warn_stderr
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in rows if r.get("level") is not None]  # a run that failed later still has its finished levels
    if not rows:
        return []
    from lottery.report.lmc import make_lmc_figures

    written = _attempt("lmc_path / instability", warn, make_lmc_figures, rows, out_dir, warn)
    # the lmc branch has its own figures; its record's accuracy is one of its copies', not a condition of its own
    rows = [r for r in rows if r["branch"] != LMC]
    if not rows:
        return written
    style = Style(rows)
    final = _curves(rows, "test_accuracy")
    n_max = max((c[5] for p in final.values() for c in p.values()), default=1)
    written += _attempt("lottery_ticket / early_stop", warn, _accuracy_figures, rows, out_dir, style, final, n_max)
    written += _attempt("layer_density", warn, _layer_density, rows, out_dir, style)
    written += _attempt("methods / ablations", warn, _method_figures, rows, out_dir, n_max, style)
    return written


def _accuracy_figures(rows, out_dir: Path, style: Style, final: dict, n_max: int) -> list[Path]:
    early, steps = _curves(rows, "early_stop_test_accuracy"), _curves(rows, "early_stop_step")
    has_early = any(early.values())  # none without a validation split (dataset.val_size=0)
    diverged = _diverged(rows)
    panels = sorted(set(final) | set(diverged))
    written = []

    # 1. accuracy vs sparsity: at the end of training and at the early-stop iteration
    legend = style.legend()
    fig, axes = plt.subplots(
        len(panels), 1 + has_early, figsize=(6 + 6 * has_early, 4.3 * len(panels)), squeeze=False, sharey="row"
    )
    chance = {
        "test_accuracy": _at_chance(rows, "test_accuracy"),
        "early_stop_test_accuracy": _at_chance(rows, "early_stop_test_accuracy"),
    }
    for i, panel in enumerate(panels):
        for ax, curves, what, key in (
            (axes[i][0], final.get(panel, {}), "at the end of training", "test_accuracy"),
            (axes[i][-1], early.get(panel, {}), "at early stop (min. validation loss)", "early_stop_test_accuracy"),
        )[: 1 + has_early]:
            _draw(ax, panel, curves, style, legend, scale=100)
            _mark_diverged(ax, diverged.get(panel, []))
            _mark_at_chance(ax, chance[key].get(panel, []))
            legend.add_extra(ax)
            percent_axis(ax, [x for c in curves.values() for x in c[1]] + diverged.get(panel, []))
            ax.set_title(f"{panel[0]} on {panel[1]}: test accuracy {what}", fontsize=9.5)
        axes[i][0].set_ylabel("Test accuracy (%)")
    written += _finish(
        fig, legend, f"Lottery tickets vs controls across IMP levels ({_band_note(n_max)})", out_dir, "lottery_ticket"
    )

    # 2. early-stop iteration vs sparsity (runs without a validation split have none)
    if has_early:
        legend = style.legend()
        fig, axes = plt.subplots(len(panels), 1, figsize=(7.5, 4.3 * len(panels)), squeeze=False)
        for i, panel in enumerate(panels):
            ax = axes[i][0]
            curves = steps.get(panel, {})
            _draw(ax, panel, curves, style, legend)
            _mark_diverged(ax, diverged.get(panel, []))
            legend.add_extra(ax)
            percent_axis(ax, [x for c in curves.values() for x in c[1]] + diverged.get(panel, []))
            ax.set_ylabel("Early-stop iteration\n(min validation loss)")
            ax.set_title(f"{panel[0]} on {panel[1]}: when training stops improving", fontsize=10)
        written += _finish(
            fig, legend, f"Early-stop iteration across IMP levels ({_band_note(n_max)})", out_dir, "early_stop"
        )
    return written


def _mean_percent(values) -> float:
    vs = [v for v in map(number, values) if v is not None]
    return 100 * sum(vs) / len(vs) if vs else math.nan


def _densities(tickets: list[dict], by_density: bool) -> tuple[list, dict, list]:
    """(x keys, {layer: mean density (%) per key}, overall density (%) per key) of one panel's ticket rows; keys are
    levels, or densities (one-shot runs all sit at level 1)."""
    by_key = defaultdict(list)
    for r in tickets:
        by_key[-round(r["weights_remaining"], 9) if by_density else r["level"]].append(r)
    keys = sorted(by_key)
    layers = list(dict.fromkeys(k for r in tickets for k in r if k.startswith("density.")))
    curves = {layer: [_mean_percent(r.get(layer) for r in by_key[k]) for k in keys] for layer in layers}
    return keys, curves, [_mean_percent(r["weights_remaining"] for r in by_key[k]) for k in keys]


def _layer_density(rows, out_dir: Path, style: Style) -> list[Path]:
    """Per-layer density of the ticket masks across levels, one panel per network and colour group (method or
    condition: each chooses its own layer densities; with methods, points are their densities, as one-shot runs all
    sit at level 1); groups whose densities are all equal (an initializer sweep under layerwise rates) share a panel.
    Layers whose densities are equal at every point share one line (the legend names them all); the others differ in
    colour, marker and line style and sit slightly apart sideways, so lines that nearly coincide stay visible."""
    tickets_of = defaultdict(list)
    for r in rows:
        if r["branch"] == "ticket":
            tickets_of[(panel_of(r), style.group(r))].append(r)
    panels: dict[tuple, list] = {}  # (network, what it draws) -> [groups]
    data = {}
    for panel, group in sorted(tickets_of, key=lambda pg: (pg[0], method_rank(pg[1]), pg[1])):
        by_density = tickets_of[(panel, group)][0].get("method") is not None
        keys, curves, overall = _densities(tickets_of[(panel, group)], by_density)
        signature = (
            panel,
            by_density,
            tuple(keys),
            tuple(overall),
            tuple((k, tuple(round(v, 9) if not math.isnan(v) else None for v in vs)) for k, vs in curves.items()),
        )
        panels.setdefault(signature, []).append(group)
        data[signature] = (keys, curves, overall, by_density)
    if not panels:
        return []
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(9.5 * ncols, 4.6 * nrows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (signature, groups) in zip(axes.flat, panels.items()):
        panel = signature[0]
        keys, curves, overall, by_density = data[signature]
        xs = list(range(len(keys))) if by_density else keys
        series: dict[tuple, list] = {}  # rounded curve -> layers that have it
        for layer, ys in curves.items():
            series.setdefault(tuple(round(y, 9) if not math.isnan(y) else None for y in ys), []).append(layer)
        lines = list(series.values())
        for j, names in enumerate(lines):
            # sideways offsets within +-0.12 of a level: nearly equal lines stay apart, points stay at their level
            offset = 0.24 * (j / (len(lines) - 1) - 0.5) if len(lines) > 1 else 0.0
            short = [n.removeprefix("density.") for n in names]
            text = (
                short[0]
                if len(short) == 1
                else " = ".join(short)
                if len(short) <= 3
                else f"{short[0]} = ... = {short[-1]} ({len(short)} layers)"
            )
            ax.plot(
                [x + offset for x in xs],
                curves[names[0]],
                color=PALETTE[j % len(PALETTE)],
                marker=MARKERS[j % len(MARKERS)],
                linestyle=LINESTYLES[(j // len(PALETTE)) % len(LINESTYLES)],
                markersize=4,
                linewidth=1.3,
                label=text,
            )
        ax.plot(xs, overall, color="k", linestyle=(0, (4, 2)), linewidth=1.2, label="all prunable weights")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        finite = [y for line in ax.lines for y in line.get_ydata() if not math.isnan(y) and y > 0]
        ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label(min(finite, default=1.0))))
        ax.set_xticks(xs)
        if by_density:
            ax.set_xticklabels([f"{o:.3g}%" for o in overall], fontsize=7)
            ax.set_xlabel("Overall weights remaining")
        else:
            ax.set_xticklabels([f"{lv}\n{o:.3g}%" for lv, o in zip(keys, overall)], fontsize=7)
            ax.set_xlabel("IMP level (and overall weights remaining)")
        ax.set_ylabel("Weights remaining in the layer (%, log scale)")
        names = [style.group_text.get(g) or g for g in groups if g]
        which = (
            ""
            if not names
            else f"\n{names[0]}"
            if len(names) == 1
            else f"\n{', '.join(names)} (the same densities)"
            if len(names) <= 3
            else f"\n{len(names)} conditions with the same densities: {names[0]}, ..., {names[-1]}"
        )
        ax.set_title(
            f"{panel[0]} on {panel[1]}: per-layer density of the " + ("mask" if by_density else "ticket mask") + which,
            fontsize=10,
        )
        ax.grid(True, alpha=0.3)
        note = "layer (equal densities share a line;\nothers slightly apart sideways)"
        ax.legend(
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize=7,
            frameon=False,
            title=note,
            title_fontsize=7,
            handlelength=3,
            ncol=2 if len(lines) > 14 else 1,
        )
    fig.tight_layout()
    return save(fig, out_dir, "layer_density")


def _cost_figure(rows: list[dict], panels: list, out_dir: Path, n_max: int, style: Style) -> list[Path]:
    """`cost`: test accuracy against the training FLOPs a ticket cost (`cost_flops`: its own training at its masks
    plus the earlier levels its masks needed, IMP's every one), one line per method through its densities, mean over
    seeds and min-max band; the dense network as a point."""
    legend = style.legend()
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 4.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        tickets = [
            r
            for r in rows
            if panel_of(r) == panel
            and r["branch"] == "ticket"
            and not r.get("diverged")
            and number(r.get("cost_flops"))
            and number(r.get("test_accuracy")) is not None
        ]
        by_line: defaultdict[Any, defaultdict[Any, list]] = defaultdict(lambda: defaultdict(list))
        for r in tickets:
            if r["level"]:
                by_line[r["condition"]][round(r["percent_remaining"], 9)].append(r)
        for cond in sorted(by_line, key=lambda c: (method_rank(style.rep[(panel, c)].get("method", "")), c)):
            points = [by_line[cond][x] for x in sorted(by_line[cond], reverse=True)]
            xs = [sum(r["cost_flops"] for r in p) / len(p) for p in points]
            accs = [[100 * r["test_accuracy"] for r in p] for p in points]
            n = max(len(a) for a in accs)
            group, branch = style.of(panel, cond)
            kw = style.line(group, branch)
            ax.plot(xs, [sum(a) / len(a) for a in accs], markersize=4, linewidth=1.6, label=f"_{cond}", **kw)
            legend.add(group, branch, n, group_label=style.group_text.get(group) or group)
            if n > 1:
                ax.fill_between(
                    xs, [min(a) for a in accs], [max(a) for a in accs], color=kw["color"], alpha=0.15, linewidth=0
                )
        dense = {r["_replicate"]: r for r in tickets if r["level"] == 0}.values()
        if dense:
            ax.plot(
                [sum(r["cost_flops"] for r in dense) / len(dense)],
                [100 * sum(r["test_accuracy"] for r in dense) / len(dense)],
                "k*",
                markersize=11,
                label=f"dense network (n={len(dense)})",
            )
        legend.add_extra(ax)
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs of the ticket, with the levels its masks needed (log scale)")
        ax.set_ylabel("Test accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"{panel[0]} on {panel[1]}: accuracy against training cost (points: densities)", fontsize=10)
    return _finish(fig, legend, f"What each method's tickets cost to train ({_band_note(n_max)})", out_dir, "cost")


def _method_figures(rows: list[dict], out_dir: Path, n_max: int, style: Style) -> list[Path]:
    """When runs differ in their pruning method: `methods` (test accuracy of every method's tickets against weights
    remaining, one line per method, the dense network dotted) and `ablations` (one panel per method: its tickets
    beside each branch run on them: layer_shuffle, reinit, invert, ...)."""
    rows = [r for r in rows if "method" in r]
    pruned_methods = {r["method"] for r in rows if r["level"]}
    if len({r["method"] for r in rows}) < 2 or not pruned_methods:
        return []
    panels = sorted({panel_of(r) for r in rows})
    methods = sorted(pruned_methods, key=method_rank)

    def dense(ax, panel):
        # one dense network per replicate: the level 0 of every run of that seed is the same training
        accs = [
            a
            for a in {
                r["_replicate"]: number(r.get("test_accuracy"))
                for r in rows
                if panel_of(r) == panel
                and r["branch"] == "ticket"
                and r["level"] == 0
                and number(r.get("test_accuracy")) is not None
            }.values()
            if a is not None
        ]
        if accs:
            ax.axhline(100 * sum(accs) / len(accs), label=f"dense network (n={len(accs)})", **DENSE_LINE)

    written = []
    legend = style.legend()
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 4.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        pruned = [r for r in rows if panel_of(r) == panel and r["branch"] == "ticket" and r["level"]]
        curves = _curves(pruned, "test_accuracy").get(panel, {})
        for cond in sorted(curves, key=lambda c: (method_rank(style.rep[(panel, c)]["method"]), c)):
            text, xs, mean, lo, hi, n = curves[cond]
            group, branch = style.of(panel, cond)
            m = style.rep[(panel, cond)]["method"]
            role = " (ceiling)" if m.startswith("IMP") else " (floor)" if m.startswith("random") else ""
            kw = style.line(group, branch)
            ax.plot(
                xs,
                [100 * v for v in mean],
                markersize=4,
                linewidth=2.2 if m.startswith("IMP") else 1.5,
                label=f"_{text}{role} (n={n})",
                **kw,
            )
            legend.add(group, branch, n, group_label=f"{style.group_text.get(group) or group}{role}")
            if n > 1:
                ax.fill_between(
                    xs, [100 * v for v in lo], [100 * v for v in hi], color=kw["color"], alpha=0.15, linewidth=0
                )
        dense(ax, panel)
        legend.add_extra(ax)
        percent_axis(ax, [x for c in curves.values() for x in c[1]])
        ax.set_ylabel("Test accuracy (%)")
        ax.set_title(f"{panel[0]} on {panel[1]}: pruning methods, test accuracy at the end of training", fontsize=10)
    written += _finish(fig, legend, f"Pruning methods at the same densities ({_band_note(n_max)})", out_dir, "methods")
    if any(number(r.get("cost_flops")) for r in rows):
        written += _cost_figure(rows, panels, out_dir, n_max, style)

    with_branches = [m for m in methods if any(r["method"] == m and r["branch"] != "ticket" for r in rows)]
    if not with_branches:
        return written
    ncols = min(4, len(with_branches))
    per_panel = math.ceil(len(with_branches) / ncols)
    nrows = per_panel * len(panels)
    legend = style.legend()
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for p_i, panel in enumerate(panels):
        for i, m in enumerate(with_branches):
            ax = axes[p_i * per_panel + i // ncols][i % ncols]
            ax.set_visible(True)
            mine = [r for r in rows if panel_of(r) == panel and r["method"] == m and r["level"]]
            curves = _curves(mine, "test_accuracy").get(panel, {})
            _draw(ax, panel, curves, style, legend, scale=100)
            dense(ax, panel)
            legend.add_extra(ax)
            percent_axis(ax, [x for c in curves.values() for x in c[1]])
            ax.set_title(f"{m}\n{panel[0]} on {panel[1]}", fontsize=8.5)
            ax.set_ylabel("Test accuracy (%)")
    written += _finish(fig, legend, f"Ablations of each method's masks ({_band_note(n_max)})", out_dir, "ablations")
    return written
