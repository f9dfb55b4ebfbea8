"""Mask similarity: do seeds find the same ticket, and does one method keep the weights another keeps?

Per layer, the overlap of kept weights between two tickets' masks (lottery.masks.overlap: |A and B| / ((|A| + |B|)
/ 2); 1 for the same weights, the density d for two independent random masks in expectation, drawn as the chance
line), from the tickets' `ticket.pt` files:
- `replicates`: every pair of replicates (seeds) of one condition at one level;
- `methods`: every pair of conditions (methods) at one level and seed whose masks keep the same number of weights.
IMP's consecutive levels are nested, so their overlap would say nothing and is not computed. Written as
mask_similarity.csv (one row per pair and layer, `all` for every layer together) and mask_similarity.png/.svg (the
replicates' mean overlap of all weights against weights remaining, one line per condition).
"""

from __future__ import annotations

import csv
import itertools
from collections import defaultdict
from pathlib import Path
from typing import Any

from lottery import masks as M
from lottery.report.collect import Warn, label

COLUMNS = ["kind", "level", "weights_remaining", "a", "b", "replicate_a", "replicate_b", "layer", "overlap", "chance"]


def _tickets(rows: list[dict], warn: Warn) -> list[tuple[dict, dict]]:
    """(row, masks) of every ticket unit (levels >= 1, not diverged) whose ticket.pt can be read."""
    from lottery.experiment.ticket import load_ticket

    out = []
    for r in rows:
        if r.get("branch") != "ticket" or not r.get("level") or r.get("diverged"):
            continue
        path = Path(r["run_dir"]) / "levels" / f"level_{r['level']}" / "ticket.pt"
        if not path.exists():
            continue
        try:
            out.append((r, load_ticket(path).masks))
        except Exception as e:  # noqa: BLE001 - one damaged file is a warning, not the end of the report
            warn(f"{path}: left out of the mask similarity ({type(e).__name__}: {e})")
    return out


def similarity_rows(rows: list[dict], warn: Warn) -> list[dict]:
    tickets = _tickets(rows, warn)
    out = []

    def add(kind, level, remaining, a, b, ra, rb, ma, mb):
        dens = M.density(ma)
        kept, total = M.count(ma)
        for layer, value in M.overlap(ma, mb).items():
            out.append(
                {
                    "kind": kind,
                    "level": level,
                    "weights_remaining": remaining,
                    "a": a,
                    "b": b,
                    "replicate_a": ra,
                    "replicate_b": rb,
                    "layer": layer,
                    "overlap": value,
                    "chance": kept / total if layer == "all" else dens[layer],
                }
            )

    by_condition = defaultdict(list)
    for r, m in tickets:
        by_condition[(label(r), r["level"])].append((r, m))
    for (cond, level), group in sorted(by_condition.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        for (ra, ma), (rb, mb) in itertools.combinations(sorted(group, key=lambda t: t[0]["replicate"]), 2):
            if ra["replicate"] != rb["replicate"]:
                add("replicates", level, ra["weights_remaining"], cond, cond, ra["replicate"], rb["replicate"], ma, mb)
    by_seed = defaultdict(list)
    for r, m in tickets:
        by_seed[(r["level"], r["replicate"], r["weights_remaining_count"])].append((r, m))
    for (level, seed, _), group in sorted(by_seed.items()):
        for (ra, ma), (rb, mb) in itertools.combinations(sorted(group, key=lambda t: label(t[0])), 2):
            if label(ra) != label(rb) and set(ma) == set(mb):
                add("methods", level, ra["weights_remaining"], label(ra), label(rb), seed, seed, ma, mb)
    return out


def write_similarity(rows: list[dict], out_dir: Path, warn: Warn) -> list[Path]:
    """mask_similarity.csv and, with replicates to compare, its figure; nothing without two tickets to compare."""
    sim = similarity_rows(rows, warn)
    if not sim:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "mask_similarity.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(sim)
    written = [path]
    pairs = [s for s in sim if s["kind"] == "replicates" and s["layer"] == "all"]
    if pairs:
        written += _figure(pairs, out_dir)
    return written


def _figure(pairs: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lottery.report.style import percent_axis, save

    lines: defaultdict[Any, defaultdict[Any, list]] = defaultdict(lambda: defaultdict(list))
    chance = {}
    for s in pairs:
        x = 100 * s["weights_remaining"]
        lines[s["a"]][x].append(s["overlap"])
        chance[x] = s["chance"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for cond, points in sorted(lines.items()):
        xs = sorted(points, reverse=True)
        ax.plot(xs, [sum(points[x]) / len(points[x]) for x in xs], marker="o", label=cond)
    xs = sorted(chance, reverse=True)
    ax.plot(xs, [chance[x] for x in xs], color="k", linestyle=":", label="chance (independent random masks)")
    percent_axis(ax, xs)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("overlap of kept weights between seeds")
    ax.set_title("Do seeds find the same ticket? (mean over replicate pairs, all layers)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save(fig, out_dir, "mask_similarity")
