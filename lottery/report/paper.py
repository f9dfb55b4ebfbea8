"""`lottery-report RUN_OR_SWEEP --paper`: our runs beside the numbers their preset's `paper:` block publishes.

For each published number (lottery.core.papers) and each condition of the collected runs that carries the block:
our mean ± sample std over replicates (and n) at the published density, and one verdict:

- agrees: the published interval and ours overlap. The published interval is the value with its spread as printed
  (min/max bars, ± of a std or of an unstated kind, a figure's reading precision) or, where the paper gives none, the
  tolerance the block states; a bound ("more than 0.3 points") is the half-line it claims. Ours is our min-max over
  replicates where the paper's bars are min/max (like with like), else mean ± std. Overlapping intervals are those
  whose centres differ by at most the sum of their half-widths: the published spread combined with ours.
- does not agree: they do not overlap;
- cannot be compared at this scale: the run trained fewer iterations per level than the number's (ours is still
  shown beside it, marked as not compared), reached no level at the number's density, or lacks the branch (or the
  lmc step) the number is about.

A relative number (difference, ratio, speedup against the dense network) is computed per replicate against that
replicate's own dense level, then averaged. Writes paper.md, paper.csv and paper.png/.svg (the paper's points with
their bars, ours with ours, on the same axes).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from lottery.core.papers import METRICS, check_block, published_interval
from lottery.report.collect import Warn, _read_config, number, warn_stderr

AGREES, DISAGREES, NOT_COMPARABLE = "agrees", "does not agree", "cannot be compared at this scale"
NO_NUMBERS = "no published numbers for this experiment"
DENSITY_TOLERANCE = 0.05  # relative: the paper prints densities to 3 digits (21.1%); ours at level 7 is 21.07%


# --- one number against one condition's records --------------------------------------------------------------------


def _at_density(records: list[dict], branch: str, density: float) -> dict | None:
    """The record of `branch` nearest to `density` (percent remaining), if one is within DENSITY_TOLERANCE."""
    near = [r for r in records if r.get("branch") == branch and number(r.get("percent_remaining")) is not None]
    if not near:
        return None
    best = min(near, key=lambda r: abs(math.log(r["percent_remaining"] / density)))
    return best if abs(best["percent_remaining"] - density) <= DENSITY_TOLERANCE * density else None


def _metric(rec: dict, n: dict) -> float | None:
    metric = n["metric"]
    if metric.startswith("instability") and n.get("lmc_step") is not None:
        split = metric.split("_", 1)[1]
        value = rec.get(f"instability_{split}_k{n['lmc_step']}")
        if value is None and rec.get("lmc_step") == n["lmc_step"]:
            value = rec.get(metric)
    else:
        value = rec.get(metric)
    value = number(value)
    return None if value is None else value * METRICS[metric][1]


def _relative(ours: float, dense: float, how: str) -> float | None:
    if how == "difference":
        return ours - dense
    if how == "ratio":
        return ours / dense if dense else None
    return dense / ours if ours else None  # speedup


def _stats(values: list[float]) -> dict:
    n = len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n, "min": min(values), "max": max(values)}


def compare(n: dict, records: list[dict]) -> dict:
    """The verdict on published number `n` for one condition's records (every replicate, level and branch), with our
    statistics and the reason where it cannot be compared."""
    branch = n.get("branch", "ticket")
    relative = n.get("relative", "none")
    out: dict[str, Any] = {"verdict": NOT_COMPARABLE, "reason": "", "ours": None, "our_density": None}
    by_rep = defaultdict(list)
    for r in records:
        by_rep[r.get("_replicate", r.get("run_dir"))].append(r)
    need = n.get("iterations")
    trained = [t for t in (number(r.get("steps")) for r in records if r.get("branch") == branch) if t is not None]
    if not trained:
        out["reason"] = f"this run has no {branch} records (add {branch} to pruning.branches)"
        return out
    values, densities, missing = [], [], []
    for rep in by_rep.values():
        rec = _at_density(rep, branch, float(n["density"]))
        if rec is None:
            continue
        value = _metric(rec, n)
        if value is None:
            missing.append(rec)
            continue
        if relative != "none":
            dense = _at_density(rep, "ticket", 100.0)
            base = _metric(dense, n) if dense is not None else None
            value = None if base is None else _relative(value, base, relative)
            if value is None:
                continue
        values.append(value)
        densities.append(rec["percent_remaining"])
    if not values:
        reached = [
            r["percent_remaining"]
            for r in records
            if r.get("branch") == branch and number(r.get("percent_remaining")) is not None
        ]
        if missing:
            what = f"step k={n['lmc_step']}" if n.get("lmc_step") is not None else n["metric"]
            out["reason"] = f"this run's {branch} records at {n['density']}% have no {what}"
        elif relative != "none" and _at_density(records, "ticket", 100.0) is None:
            out["reason"] = "this run has no dense level (level 0) to compare against"
        else:
            out["reason"] = (
                f"this run reached no level at {n['density']}% of the weights (its {branch} records go "
                f"down to {min(reached):.3g}%)"
            )
        return out
    ours = _stats(values)
    out["ours"], out["our_density"] = ours, statistics.fmean(densities)
    lo, hi = published_interval(n)
    if n["spread"]["kind"] == "min_max":
        olo, ohi = ours["min"], ours["max"]
    else:
        olo, ohi = ours["mean"] - ours["std"], ours["mean"] + ours["std"]
    out["our_interval"] = (olo, ohi)
    if need is not None and max(trained) < need:  # ours is shown, but a shorter training is no comparison
        out["reason"] = f"this run trained {int(max(trained))} iterations per level, the paper {need}"
        return out
    out["verdict"] = AGREES if olo <= hi and ohi >= lo else DISAGREES
    return out


# --- text ----------------------------------------------------------------------------------------------------------


def _fmt(v: float, like: float | None = None) -> str:
    """`v` to the decimals its scale (or that of `like`, the value its spread belongs to) calls for: 98.31, 0.623."""
    scale = abs(v if like is None else like)
    return f"{v:.0f}" if scale >= 100 else f"{v:.2f}" if scale >= 1 else f"{v:.3f}"


def published_text(n: dict) -> str:
    s, v = n["spread"], float(n["value"])
    bound = {"above": "more than ", "below": "less than "}.get(n.get("bound") or "", "")
    kind = s["kind"]
    if kind == "min_max":
        spread = (
            f" (min–max {_fmt(s['low'], v)}–{_fmt(s['high'], v)})"
            if "low" in s
            else f" ± {_fmt(s['plus_minus'], v)} (min/max)"
        )
    elif kind == "std":
        spread = f" ± {_fmt(s['plus_minus'], v)} (std)"
    elif kind == "unstated":
        spread = f" ± {_fmt(s['plus_minus'], v)} (kind not stated)"
    elif kind == "read_off":
        spread = f" (read off a figure, ± {_fmt(s['precision'], v)})"
    else:
        spread = "" if n.get("bound") else f" (no spread published; tolerance ± {_fmt(s['tolerance'], v)})"
    runs = n.get("runs")
    return f"{bound}{_fmt(v)}{spread}, runs: {runs}"


def ours_text(result: dict, n: dict) -> str:
    o = result.get("ours")
    if not o:
        return "—"
    m = o["mean"]
    extra = (
        f", min–max {_fmt(o['min'], m)}–{_fmt(o['max'], m)}" if n["spread"]["kind"] == "min_max" and o["n"] > 1 else ""
    )
    return f"{_fmt(m)} ± {_fmt(o['std'], m)} (n={o['n']}{extra})"


def what(n: dict) -> str:
    rel = {"none": "", "difference": " minus dense", "ratio": " / dense", "speedup": ": dense / ours"}[
        n.get("relative", "none")
    ]
    step = f" (k={n['lmc_step']})" if n.get("lmc_step") is not None else ""
    return f"{n['metric']}{step}{rel}, {n.get('branch', 'ticket')}"


def place_text(n: dict, block: dict) -> str:
    page = n["page"]
    page = f"p. {page}" if isinstance(page, int) else "page not verified"
    return f"{n.get('source') or block['source']}, {n['place']}, {page}"


# --- the report ----------------------------------------------------------------------------------------------------


def groups(rows: list[dict], warn: Warn) -> list[dict]:
    """The collected runs as conditions: runs with the same paper block, experiment name and swept settings (every
    replicate of a condition together), each with its block (or None) and records."""
    blocks: dict = {}
    out: dict = {}
    swept = sorted({k for r in rows for k in r if k.startswith("cfg.")})
    for r in rows:
        if r.get("level") is None:
            continue
        d = r["run_dir"]
        if d not in blocks:
            raw = _read_config(Path(d), warn) or {}
            blocks[d] = raw.get("paper") or None
        block = blocks[d]
        settings = tuple((k[4:], r.get(k)) for k in swept if r.get(k) is not None)
        key = (json.dumps(block, sort_keys=True), str(r.get("experiment")), settings)
        g = out.setdefault(
            key,
            {
                "block": block,
                "experiment": str(r.get("experiment")),
                "settings": settings,
                "records": [],
                "run_dirs": set(),
            },
        )
        g["records"].append(r)
        g["run_dirs"].add(d)
    return list(out.values())


def label(g: dict) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in g["settings"])
    return g["experiment"] + (f" ({settings})" if settings else "")


def paper_report(rows: list[dict], out_dir, warn: Warn | None = None) -> tuple[list[Path], list[str]]:
    """paper.md, paper.csv and the figure for every condition with a paper block; returns the files written and
    one line per condition (its verdict counts, or that it has no published numbers)."""
    warn = warn or warn_stderr
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines, table, sections = [], [], []
    for g in sorted(groups(rows, warn), key=label):
        block = g["block"]
        if not block or not block.get("numbers"):
            reason = (block or {}).get("none_published")
            lines.append(f"{label(g)}: {NO_NUMBERS}" + (f" ({reason})" if reason else ""))
            continue
        try:
            check_block(block)
        except ValueError as e:
            warn(f"{label(g)}: paper block not compared: {e}")
            lines.append(f"{label(g)}: paper block malformed ({e})")
            continue
        results = [(n, compare(n, g["records"])) for n in block["numbers"]]
        for n, res in results:
            table.append(
                {
                    "condition": label(g),
                    "claim": n["claim"],
                    "place": place_text(n, block),
                    "metric": what(n),
                    "density": n["density"],
                    "our_density": None if res["our_density"] is None else round(res["our_density"], 3),
                    "published": published_text(n),
                    "published_value": n["value"],
                    "published_low": published_interval(n)[0],
                    "published_high": published_interval(n)[1],
                    "ours": ours_text(res, n),
                    "our_mean": (res["ours"] or {}).get("mean"),
                    "our_std": (res["ours"] or {}).get("std"),
                    "our_n": (res["ours"] or {}).get("n", 0),
                    "verdict": res["verdict"],
                    "reason": res["reason"],
                    "_n": n,
                    "_res": res,
                    "_group": label(g),
                }
            )
        counts = {v: sum(1 for _, r in results if r["verdict"] == v) for v in (AGREES, DISAGREES, NOT_COMPARABLE)}
        lines.append(f"{label(g)}: " + ", ".join(f"{c} {v}" for v, c in counts.items() if c))
        sections.append((g, block, results))
    if not table:
        return [], lines
    written = [_write_csv(table, out_dir / "paper.csv"), _write_md(sections, out_dir / "paper.md")]
    written += _figure(table, out_dir)
    return written, lines


def _write_csv(table: list[dict], path: Path) -> Path:
    cols = [k for k in table[0] if not k.startswith("_")]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(table)
    return path


def _md(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def sentence(n: dict, res: dict) -> str:
    head = {AGREES: "Agrees", DISAGREES: "Does not agree", NOT_COMPARABLE: "Cannot be compared at this scale"}[
        res["verdict"]
    ]
    if res["verdict"] == NOT_COMPARABLE:
        shown = (
            f"; ours (not compared) {ours_text(res, n)} at {res['our_density']:.3g}% of the weights"
            if res.get("ours")
            else ""
        )
        return f"{head}: {n['claim']} ({res['reason']}{shown})."
    return (
        f"{head}: {n['claim']}: the paper {published_text(n)}; ours {ours_text(res, n)} at "
        f"{res['our_density']:.3g}% of the weights."
    )


def _write_md(sections, path: Path) -> Path:
    out = [
        "# Published numbers beside this run",
        "",
        (
            "Verdicts: *agrees* when the published interval (the spread as printed, or the stated tolerance where the "
            "paper gives none) and ours (min–max where the paper's bars are min/max, else mean ± std over replicates) "
            "overlap; *cannot be compared at this scale* when the run trained fewer iterations, reached no level at "
            "the number's density, or lacks the branch."
        ),
        "",
    ]
    for g, block, results in sections:
        out += [
            f"## {label(g)}",
            "",
            f"Paper: {block['source']}",
            "",
            f"What the preset changes: {' '.join(str(block['changes']).split())}",
            "",
            f"Runs: {', '.join(sorted(g['run_dirs']))}",
            "",
            "| claim | where | metric | density (%) | published | ours | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for n, res in results:
            dens = f"{n['density']}" + (f" (ours {res['our_density']:.3g})" if res["our_density"] else "")
            verdict = res["verdict"] + (f": {res['reason']}" if res["reason"] else "")
            out.append(
                f"| {_md(n['claim'])} | {_md(place_text(n, block))} | {_md(what(n))} | {dens} | "
                f"{_md(published_text(n))} | {_md(ours_text(res, n))} | {_md(verdict)} |"
            )
        out += [""] + [f"- {sentence(n, res)}" for n, res in results] + [""]
    path.write_text("\n".join(out))
    return path


def _figure(table: list[dict], out_dir: Path) -> list[Path]:
    """One panel per metric (and relative form): the paper's points with their bars (black; a bound as an arrow),
    ours with ours (a colour per condition), at the densities they stand at."""
    import matplotlib.pyplot as plt

    from lottery.report.style import NEUTRAL, PALETTE, percent_axis, save

    panels = list(dict.fromkeys(row["metric"] for row in table))
    conds = list(dict.fromkeys(row["_group"] for row in table))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        xs = []
        for row in (r for r in table if r["metric"] == panel):
            n, res = row["_n"], row["_res"]
            x = float(n["density"])
            lo, hi = published_interval(n)
            v = float(n["value"])
            if n.get("bound"):
                ax.plot([x], [v], marker="^" if n["bound"] == "above" else "v", color="black", linestyle="none")
            else:
                ax.errorbar(
                    [x], [v], yerr=[[v - lo], [hi - v]], fmt="s", color="black", capsize=4, markerfacecolor="white"
                )
            xs.append(x)
            o = res.get("ours")
            if o:
                olo, ohi = res["our_interval"]
                colour = PALETTE[conds.index(row["_group"]) % len(PALETTE)]
                hollow = res["verdict"] == NOT_COMPARABLE  # a shorter run's number: shown, not compared
                ax.errorbar(
                    [res["our_density"]],
                    [o["mean"]],
                    yerr=[[o["mean"] - olo], [ohi - o["mean"]]],
                    fmt="o",
                    color=colour,
                    capsize=4,
                    markerfacecolor="white" if hollow else colour,
                )
                xs.append(res["our_density"])
        percent_axis(ax, xs)
        ax.set_title(panel, fontsize=9)
    from matplotlib.lines import Line2D

    handles = [
        Line2D(
            [],
            [],
            marker="s",
            color="black",
            markerfacecolor="white",
            linestyle="none",
            label="published (bars as printed)",
        )
    ]
    handles += [
        Line2D([], [], marker="o", color=PALETTE[i % len(PALETTE)], linestyle="none", label=f"ours: {c}")
        for i, c in enumerate(conds)
    ]
    if any(row["_n"].get("bound") for row in table):
        handles.append(
            Line2D(
                [], [], marker="^", color="black", linestyle="none", label="published bound (▲ more than, ▼ less than)"
            )
        )
    if any(row["_res"]["verdict"] == NOT_COMPARABLE and row["_res"].get("ours") for row in table):
        handles.append(
            Line2D(
                [],
                [],
                marker="o",
                color=NEUTRAL,
                markerfacecolor="white",
                linestyle="none",
                label="ours, not compared (a shorter run)",
            )
        )
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=1, fontsize=8)
    fig.suptitle("Published numbers and this run", fontsize=10)
    fig.tight_layout()
    return save(fig, out_dir, "paper")
