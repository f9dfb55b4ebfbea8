"""The aggregated table: one row per condition, level and weights remaining, with the mean, sample standard deviation
(ddof=1; empty for one replicate) and count over replicates of every listed metric a run has.

Written as `aggregate.csv` (full precision, one mean/std/n column triple per metric), `aggregate.md` (Markdown, mean ±
std) and `aggregate.tex` (a booktabs tabular for a paper: `\\input{aggregate.tex}` inside a table environment).
Accuracies are shown in percent; instabilities are already in percentage points.
"""

from __future__ import annotations

import csv
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from lottery.report.collect import DENSE_LABEL, branch_order, method_rank, number, panel_of, settings_text, shown_keys

# Metrics averaged over replicates, in this order, where any run has them (training cost: steps and FLOPs a unit took)
AGGREGATED = (
    "test_accuracy",
    "early_stop_test_accuracy",
    "early_stop_step",
    "instability_test",
    "instability_train",
    "cost_steps",
    "cost_flops",
)
# ... and every instability at the steps k of branch.lmc.steps (instability_test_k500, ...)
PER_STEP = re.compile(r"instability_(test|train)_k(\d+)$")
PERCENT = ("test_accuracy", "early_stop_test_accuracy")  # fractions, shown as percent
HEADERS = {
    "test_accuracy": "Test acc. (%)",
    "early_stop_test_accuracy": "Early-stop acc. (%)",
    "early_stop_step": "Early-stop step",
    "instability_test": "Instability, test (pp)",
    "instability_train": "Instability, train (pp)",
    "cost_steps": "Training steps",
    "cost_flops": "Training FLOPs",
}
SAME_DENSITY = 0.005  # replicates at one level whose weights remaining differ by less than this (relative) are one row


def _per_step_order(key: str) -> tuple[int, bool]:
    """A per-step metric's place: by step, test before the others."""
    m = PER_STEP.match(key)
    assert m is not None  # called on per-step keys only
    return int(m.group(2)), m.group(1) != "test"


def metrics_of(rows: list[dict]) -> list[str]:
    """The aggregated metrics some row has a number for, in table order."""
    have = {k for r in rows for k, v in r.items() if number(v) is not None}
    per_step = sorted((k for k in have if PER_STEP.match(k)), key=_per_step_order)
    return [m for m in AGGREGATED if m in have] + per_step


def _clusters(rows: list[dict]) -> list[list[dict]]:
    """Rows of one condition and level split where their weights remaining differ (one-shot runs at several
    targets all sit at level 1)."""
    out: list[list[dict]] = []
    for r in sorted(rows, key=lambda r: -r["weights_remaining"]):
        last = out[-1][-1]["weights_remaining"] if out else None
        if last is not None and abs(last - r["weights_remaining"]) <= SAME_DENSITY * max(abs(last), 1e-12):
            out[-1].append(r)
        else:
            out.append([r])
    return out


def _stats(values: list) -> tuple:
    vs = [v for v in map(number, values) if v is not None]
    mean = sum(vs) / len(vs) if vs else None
    std = statistics.stdev(vs) if len(vs) > 1 else None
    return mean, std, len(vs)


def aggregate(rows: list[dict]) -> list[dict]:
    """One dict per (panel, condition, level, weights remaining): model, dataset, method (where methods differ),
    branch, condition, cfg.<setting> (the settings that differ and matter), level, weights_remaining (mean),
    percent_remaining, n (replicates), diverged (how many of them diverged), and <metric>_mean, <metric>_std,
    <metric>_n for every metric of `metrics_of`. Rows of one replicate that measure the same thing twice (a density
    reached by two runs of one seed) count once."""
    rows = [
        r
        for r in rows
        if r.get("level") is not None and r.get("branch") is not None and number(r.get("weights_remaining")) is not None
    ]
    metrics = metrics_of(rows)
    shown = shown_keys(rows)
    order = branch_order()
    by_condition = defaultdict(list)
    for r in rows:
        by_condition[(panel_of(r), r["condition"])].append(r)
    out = []
    for (panel, cond), rs in by_condition.items():
        by_level = defaultdict(list)
        for r in rs:
            by_level[r["level"]].append(r)
        for level, level_rows in by_level.items():
            for cluster in _clusters(level_rows):
                seen, unique = set(), []
                for r in cluster:
                    key = (r.get("_replicate"), r.get("unit"))
                    if key not in seen:
                        seen.add(key)
                        unique.append(r)
                first = unique[0]
                wr = sum(r["weights_remaining"] for r in unique) / len(unique)
                row: dict[str, Any] = {"model": panel[0], "dataset": panel[1]}
                if "method" in first:
                    row["method"] = first["method"]
                row["branch"] = first["branch"]
                row["condition"] = cond
                row["settings"] = settings_text(first, shown, "method" in first)
                row.update({f"cfg.{k}": v for k, v in first.get("_settings", ())})
                row.update(
                    level=level,
                    weights_remaining=wr,
                    percent_remaining=100 * wr,
                    n=len(unique),
                    diverged=sum(1 for r in unique if r.get("diverged")),
                )
                for m in metrics:
                    row[f"{m}_mean"], row[f"{m}_std"], row[f"{m}_n"] = _stats([r.get(m) for r in unique])
                row["_dense_only"] = all(r.get("_dense_only") for r in unique)
                row["_sort"] = (
                    panel,
                    method_rank(first.get("method") or ""),
                    row["settings"],
                    order.index(first["branch"]) if first["branch"] in order else len(order),
                    first["branch"],
                    level,
                    -wr,
                )
                out.append(row)
    return sorted(out, key=lambda r: r["_sort"])


# --- writing -------------------------------------------------------------------------------------------------------


def _write_csv(table: list[dict], path: Path) -> Path:
    first = ["model", "dataset", "method", "branch", "condition", "settings"]
    settings = sorted({k for r in table for k in r if k.startswith("cfg.")})
    middle = ["level", "weights_remaining", "percent_remaining", "n", "diverged"]
    columns = (
        [c for c in first if any(c in r for r in table)]
        + settings
        + middle
        + [f"{m}_{s}" for m in metrics_of_table(table) for s in ("mean", "std", "n")]
    )
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, restval="", extrasaction="ignore")
        w.writeheader()
        for r in table:
            w.writerow({k: "" if v is None else v for k, v in r.items() if not k.startswith("_")})
    return path


def _decimals(stds: list, default: int, lo: int = 0, hi: int = 3) -> int:
    """Decimals for a column: two significant digits of its typical standard deviation, within [lo, hi]."""
    stds = sorted(s for s in stds if s is not None and s > 0)
    if not stds:
        return default
    typical = stds[len(stds) // 2]
    return max(lo, min(hi, 1 - math.floor(math.log10(typical))))


class _Column:
    """How one metric is shown: scale (100 for percent, 10^-k for FLOPs), decimals, header."""

    def __init__(self, metric: str, table: list[dict]):
        self.metric = metric
        means = [abs(r[f"{metric}_mean"]) for r in table if r.get(f"{metric}_mean") is not None]
        self.scale, self.exponent = 1.0, 0
        if metric in PERCENT:
            self.scale = 100.0
        elif metric == "cost_flops" and means and max(means) >= 1e4:
            self.exponent = 3 * math.floor(math.log10(max(means)) / 3)
            self.scale = 10.0**-self.exponent
        stds = [self.scale * r[f"{metric}_std"] for r in table if r.get(f"{metric}_std") is not None]
        integer = metric in ("early_stop_step", "cost_steps")
        self.decimals = 0 if integer else _decimals(stds, 2)
        match = PER_STEP.match(metric)
        self.header = HEADERS.get(metric) or (
            f"Instability, {match.group(1)}, k={match.group(2)} (pp)" if match else metric
        )

    def header_for(self, fmt: str) -> str:
        if not self.exponent:
            return self.header if fmt == "md" else tex_escape(self.header)
        return (
            f"{self.header} (x10^{self.exponent})"
            if fmt == "md"
            else f"{tex_escape(self.header)} ($\\times 10^{{{self.exponent}}}$)"
        )

    def cell(self, row: dict, fmt: str) -> str:
        mean, std, n = (row.get(f"{self.metric}_{s}") for s in ("mean", "std", "n"))
        if mean is None:
            return "" if fmt == "md" else "--"
        text = f"{self.scale * mean:.{self.decimals}f}"
        if std is not None:
            text += (" ± " if fmt == "md" else " \\pm ") + f"{self.scale * std:.{self.decimals}f}"
        if fmt == "tex":
            text = f"${text}$"
        if n < row["n"]:  # some replicates have no value (diverged)
            text += f" (n={n})" if fmt == "md" else f" ($n={n}$)"
        return text


_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(c, c) for c in str(text))


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def _display(table: list[dict]) -> tuple[list[str], list[tuple[str, str]]]:
    """(the text columns, the panels) of the Markdown and LaTeX tables: a network column only when there are several
    panels, a method column where methods differ, a settings column where settings differ."""
    panels = list(dict.fromkeys((r["model"], r["dataset"]) for r in table))
    text_cols = (
        (["Network"] if len(panels) > 1 else [])
        + (["Method"] if any("method" in r for r in table) else [])
        + ["Branch"]
        + (["Settings"] if any(r["settings"] for r in table) else [])
        + ["Level", "Weights (%)"]
    )
    return text_cols, panels


def _text_cells(row: dict, text_cols: list[str]) -> list[str]:
    values = {
        "Network": f"{row['model']} on {row['dataset']}",
        "Method": row.get("method", ""),
        "Branch": DENSE_LABEL if row["_dense_only"] else row["branch"],
        "Settings": row["settings"],
        "Level": str(row["level"]),
        "Weights (%)": f"{row['percent_remaining']:.3g}",
    }
    return [values[c] for c in text_cols]


def write_markdown(table: list[dict], path: Path) -> Path:
    text_cols, panels = _display(table)
    columns = [_Column(m, table) for m in metrics_of_table(table)]
    header = text_cols + [c.header_for("md") for c in columns] + ["n"]
    align = [":--" if c in ("Network", "Method", "Branch", "Settings") else "--:" for c in text_cols] + ["--:"] * (
        len(columns) + 1
    )
    title = "Aggregated results: mean ± sample standard deviation over replicates (n)"
    if len(panels) == 1:
        title += f"; {panels[0][0]} on {panels[0][1]}"
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for r in table:
        cells = _text_cells(r, text_cols) + [c.cell(r, "md") for c in columns] + [str(r["n"])]
        lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_latex(table: list[dict], path: Path) -> Path:
    text_cols, panels = _display(table)
    columns = [_Column(m, table) for m in metrics_of_table(table)]
    spec = "".join("l" if c in ("Network", "Method", "Branch", "Settings") else "r" for c in text_cols) + "r" * (
        len(columns) + 1
    )
    header = [tex_escape(c) for c in text_cols] + [c.header_for("tex") for c in columns] + ["$n$"]
    lines = [
        "% lottery-report: mean $\\pm$ sample standard deviation over replicates (n)",
        "% needs \\usepackage{booktabs}",
        *([f"% {tex_escape(panels[0][0])} on {tex_escape(panels[0][1])}"] if len(panels) == 1 else []),
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(header) + " \\\\",
        "\\midrule",
    ]
    previous = None
    for r in table:
        key = (r["model"], r["dataset"]), r["condition"]
        if previous is not None and key != previous:
            lines.append("\\midrule" if key[0] != previous[0] else "\\addlinespace")
        previous = key
        cells = [tex_escape(c) for c in _text_cells(r, text_cols)] + [c.cell(r, "tex") for c in columns] + [str(r["n"])]
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def metrics_of_table(table: list[dict]) -> list[str]:
    have = {k[: -len("_mean")] for r in table for k, v in r.items() if k.endswith("_mean") and v is not None}
    order = list(dict.fromkeys(k[: -len("_mean")] for r in table for k in r if k.endswith("_mean")))
    return [m for m in order if m in have]


def write_aggregate(rows: list[dict], out_dir) -> list[Path]:
    """aggregate.csv, aggregate.md and aggregate.tex in `out_dir` (nothing when no run has a result)."""
    table = aggregate(rows)
    if not table:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        _write_csv(table, out_dir / "aggregate.csv"),
        write_markdown(table, out_dir / "aggregate.md"),
        write_latex(table, out_dir / "aggregate.tex"),
    ]
