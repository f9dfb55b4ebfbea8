"""One look per line for the whole report, and legends that stay readable at any number of lines.

A line's colour belongs to its group: the pruning method where methods differ, else the settings that make its
condition (initializer, rate, ...). Its line style belongs to its branch: the ticket solid, each control its own dashes.
So a method keeps one colour in every figure, and its controls are its colour, dashed. Colours come from a
16-colour qualitative palette without red (the diverged x) and grey (the line-style keys); past 16 groups each
group also gets a marker, so two groups never look alike. With a single group (nothing differs but the branch) the
branches get the colours too, as in the lottery-ticket papers' figures.

Legends sit outside the axes, in sections: the groups (colour), then the branches (line style), then the dense line
and the diverged marker.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: works on clusters and in tests without a display
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, NullLocator

from lottery.report.collect import (
    DENSE_LABEL,
    branch_label,
    branch_order,
    method_rank,
    panel_of,
    settings_text,
    shown_keys,
    ticket_label,
)

# tab10 without its red and grey, then tab20b's darkest and lightest shades that differ from those
PALETTE = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#bcbd22",
    "#17becf",
    "#393b79",
    "#e7ba52",
    "#637939",
    "#7b4173",
    "#6b6ecf",
    "#843c39",
    "#b5cf6b",
    "#8c6d31",
]
# The methods of lottery-train's method= (conf/method/) by the start of their label, and their palette index
METHOD_COLOURS = [
    ("IMP", 0),
    ("one-shot", 1),
    ("random", 2),
    ("GraSP", 3),
    ("SNIP", 4),
    ("SynFlow", 5),
    ("magnitude at init", 6),
    ("SET", 7),
    ("RigL", 8),
]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]
LINESTYLES = [
    "-",
    (0, (5, 2)),
    (0, (1, 1.3)),
    (0, (7, 2, 1.5, 2)),
    (0, (3, 1.5, 1, 1.5, 1, 1.5)),
    (0, (11, 3)),
    (0, (2, 3.5)),
    (0, (8, 2, 2, 2, 2, 2)),
]
NEUTRAL = "0.3"  # the line-style keys of the legend
NO_SETTING = "(none of the differing settings applies)"  # a group of runs none of whose differing settings matter
HANDLE_LENGTH = 4.0  # legend lines long enough to show two periods of every dash pattern


def n_text(ns) -> str:
    ns = sorted(set(ns))
    return f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}–{ns[-1]}"


class Style:
    """Colours, markers and line styles of every line of one report, built once from all its (non-lmc) rows."""

    def __init__(self, rows: list[dict]):
        self.shown = shown_keys(rows)
        self.methods = any("method" in r for r in rows)
        # (panel, condition) -> a row of that line (a pruned run's rather than a dense-only run's)
        self.rep: dict[tuple, dict] = {}
        for r in rows:
            key = (panel_of(r), r["condition"])
            if key not in self.rep or (self.rep[key].get("_dense_only") and not r.get("_dense_only")):
                self.rep[key] = r
        groups: dict = {}
        for r in rows:
            groups.setdefault(self.group(r), []).append(r)
        self.groups = sorted(groups, key=lambda g: (method_rank(g), g))
        # a group of dense-only runs beside pruned ones says so
        self.group_text = {
            g: g
            + (
                f" ({DENSE_LABEL})"
                if g
                and g != DENSE_LABEL
                and all(r.get("_dense_only") for r in rs)
                and not all(r.get("_dense_only") for r in rows)
                else ""
            )
            for g, rs in groups.items()
        }
        order = branch_order()
        self.branches = sorted(
            {r["branch"] for r in rows}, key=lambda b: (order.index(b) if b in order else len(order), b)
        )
        self.by_branch = len(self.groups) <= 1
        self.group_markers = len(self.groups) > len(PALETTE)
        self.colour_of = self._colours()
        tickets = [r for r in rows if r["branch"] == "ticket"]
        pruned = [r for r in tickets if not r.get("_dense_only")]
        self.ticket_text = (
            DENSE_LABEL
            if tickets and not pruned
            else "ticket (each method's mask)"
            if self.methods
            else ticket_label(pruned[0])
            if pruned
            else "ticket"
        )

    def _colours(self) -> dict:
        """{group: palette index}: the built-in methods keep their own colour in every report (SNIP is the same
        brown beside IMP alone as in the full comparison); the other groups take the free colours in order. Past the
        palette, colour and marker follow the group's position."""
        if self.group_markers:
            return {g: i for i, g in enumerate(self.groups)}
        out, taken = {}, set()
        for prefix, index in METHOD_COLOURS if self.methods else ():
            g = next((g for g in self.groups if g.startswith(prefix) and g not in out), None)
            if g is not None:
                out[g] = index
                taken.add(index)
        free = (i for i in range(len(PALETTE)) if i not in taken)
        for g in self.groups:
            if g not in out:
                out[g] = next(free)
        return out

    def group(self, row: dict) -> str:
        """The method and the other settings that differ in the row's panel: what its colour stands for."""
        parts = [row["method"]] if "method" in row else []
        settings = settings_text(row, self.shown, "method" in row)
        if settings:
            parts.append(f"[{settings}]" if parts else settings)
        return " ".join(parts)

    def of(self, panel, cond: str) -> tuple[str, str]:
        """(group, branch) of a line."""
        r = self.rep[(panel, cond)]
        return self.group(r), r["branch"]

    def line(self, group: str, branch: str) -> dict:
        """Keyword arguments of `ax.plot` for a line of `group` and `branch`."""
        g = self.colour_of.get(group, len(self.groups))
        b = self.branches.index(branch) if branch in self.branches else len(self.branches)
        if self.by_branch:
            color, marker = PALETTE[b % len(PALETTE)], MARKERS[b % len(MARKERS)]
        else:
            color = PALETTE[g % len(PALETTE)]
            marker = MARKERS[(g // len(PALETTE)) % len(MARKERS)] if self.group_markers else MARKERS[b % len(MARKERS)]
        return {"color": color, "marker": marker, "linestyle": LINESTYLES[b % len(LINESTYLES)]}

    def branch_text(self, branch: str) -> str:
        return self.ticket_text if branch == "ticket" else branch_label(branch)

    def legend(self) -> Legend:
        return Legend(self)


class Legend:
    """The entries one figure used, as sections of a legend outside the axes."""

    def __init__(self, style: Style):
        self.style = style
        self.groups: dict[str, list] = {}
        self.branches: dict[str, list] = {}
        self.lines: dict[tuple, list] = {}
        self.group_labels: dict[str, str] = {}
        self.extra: dict[str, Any] = {}  # label -> its artist

    def add(self, group: str, branch: str, n: int, group_label: str | None = None) -> None:
        self.groups.setdefault(group, []).append(n)
        self.branches.setdefault(branch, []).append(n)
        self.lines.setdefault((group, branch), []).append(n)
        if group_label is not None:
            self.group_labels[group] = group_label

    def add_extra(self, ax) -> None:
        """The axes' own labelled artists that are no line of a condition (dense network, diverged)."""
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if not lab.startswith("_"):
                self.extra.setdefault(lab, h)

    def sections(self) -> list[tuple[str | None, list]]:
        s = self.style
        groups = [g for g in s.groups if g in self.groups]
        branches = [b for b in s.branches if b in self.branches]
        out: list[tuple[str | None, list]] = []
        if s.by_branch:
            entries = [
                (
                    Line2D([], [], **s.line(groups[0] if groups else "", b), linewidth=1.5, markersize=4),
                    f"{s.branch_text(b)} ({n_text(self.branches[b])})",
                )
                for b in branches
            ]
            out.append((None, entries))
        else:
            entries = []
            for g in groups:
                kw = s.line(g, "ticket")
                handle = Line2D(
                    [],
                    [],
                    color=kw["color"],
                    linewidth=2.5,
                    marker=kw["marker"] if s.group_markers else None,
                    markersize=5,
                )
                text = self.group_labels.get(g) or s.group_text.get(g) or g or NO_SETTING
                entries.append((handle, f"{text} ({n_text(self.groups[g])})"))
            out.append(("Pruning method (colour)" if s.methods else "Condition (colour)", entries))
            if branches != ["ticket"]:
                style_entries = []
                for b in branches:
                    kw = s.line(groups[0] if groups else "", b)
                    style_entries.append(
                        (
                            Line2D(
                                [],
                                [],
                                color=NEUTRAL,
                                linestyle=kw["linestyle"],
                                linewidth=1.5,
                                marker=None if s.group_markers else kw["marker"],
                                markersize=4,
                            ),
                            s.branch_text(b),
                        )
                    )
                out.append(("Branch (line style)", style_entries))
        if self.extra:
            out.append((None, list(zip(self.extra.values(), self.extra))))
        return out


def section_legend(where, sections, *, loc="upper left", anchor=(1.0, 1.0), fontsize=8, ncol=None, **kw):
    """One legend (on a figure or an axes) of titled sections, titles in bold; placed outside the axes by default."""
    handles: list = []
    labels: list[str] = []
    titles: list = []
    for title, entries in sections:
        if not entries:
            continue
        if title:
            titles.append(len(labels))
            handles.append(Line2D([], [], linestyle="none", marker=None))
            labels.append(title)
        for h, lab in entries:
            handles.append(h)
            labels.append(lab)
    if not handles:
        return None
    ncol = ncol or (1 if len(handles) <= 32 else 2)
    leg = where.legend(
        handles,
        labels,
        loc=loc,
        bbox_to_anchor=anchor,
        fontsize=fontsize,
        frameon=False,
        ncol=ncol,
        handlelength=HANDLE_LENGTH,
        borderaxespad=0.3,
        **kw,
    )
    for i in titles:
        leg.get_texts()[i].set_fontweight("bold")
    return leg


def percent_axis(ax, xs) -> None:
    """Log x axis, reversed (dense on the left), labelled at the measured sparsities: 100, 51.2, 21.1, ..."""
    ax.set_xscale("log")
    xs = [x for x in xs if x is not None and x > 0]
    ticks: list[float] = []
    for t in sorted({round(x, 6) for x in xs}, reverse=True):
        if not ticks or math.log10(ticks[-1] / t) >= 0.02:  # labels of nearly equal densities would overprint
            ticks.append(t)
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


def save(fig, out_dir: Path, stem: str) -> list[Path]:
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.svg"]
    try:
        with plt.rc_context({"svg.fonttype": "none"}):  # SVG text stays text: searchable, editable, smaller
            for p in paths:
                fig.savefig(p, dpi=150, bbox_inches="tight")
    finally:
        plt.close(fig)
    return paths
