"""Side-by-side speed of this checkout against another commit: `scripts/bench.py` of each, alternating, same arguments.

    python scripts/bench_compare.py --base f96cb35 --rounds 3 -- --data-root ../shared/data --no-startup
    python scripts/bench_compare.py --base f96cb35 --rounds 3 -- --replicas 8 --data-root ../shared/data

The base commit is checked out into a temporary git worktree and each version runs its own bench.py (so each uses its
own API) in a fresh process with its own package first on PYTHONPATH. Rounds alternate which version goes first, so
a machine that gets busier or quieter during the comparison affects both alike. Reported: per metric, each round's
value for both versions, the medians, and head / base (above 1: this checkout is faster).

Kept as a small driver of bench.py, because no benchmark library does this here: torch.utils.benchmark and
pytest-benchmark time code of one checkout in one process (pytest-benchmark's --benchmark-compare compares saved runs,
not two checkouts side by side in alternating rounds), and asv, which compares commits, builds an environment per
commit and installs the project's dependencies (torch) into each, which an offline machine cannot do. The numbers it
compares are each bench.py's, measured by torch.utils.benchmark.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def metrics(result: dict) -> dict[str, float]:
    """The numbers a comparison is about, from one bench.json."""
    out = {}
    for wl, r in (result.get("workloads") or {}).items():
        for what in ("train", "eval"):
            rates = {variant: v["samples_per_s"] for variant, v in (r.get(what) or {}).items()}
            for variant, rate in rates.items():
                out[f"{wl} {what} {variant} samples/s"] = rate
            for other in ("plain", "floor"):
                if "project" in rates and rates.get(other):
                    out[f"{wl} {what} project/{other}"] = rates["project"] / rates[other]
    for wl, rep in (result.get("replicas") or {}).items():
        for n, r in (rep.get("by_replicas") or {}).items():
            for key in ("single", "batched"):
                if isinstance(r.get(key), dict) and "samples_per_s" in r[key]:
                    out[f"{wl} R={n} {key} samples/s"] = r[key]["samples_per_s"]
            if "ratio" in r:
                out[f"{wl} R={n} batched/single"] = r["ratio"]
    return out


def run(tree: Path, args: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(tree / "scripts" / "bench.py"), *args, "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the commit to compare with (any git revision)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--out", default="bench_compare.json", help="JSON with every round's numbers")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for scripts/bench.py (after --)")
    args = p.parse_args(argv)
    bench_args = [a for a in args.bench_args if a != "--"]
    rounds: dict[str, list[dict]] = {"base": [], "head": []}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), args.base], check=True,
                       capture_output=True)
        try:
            for i in range(args.rounds):
                order = [("base", base), ("head", REPO)] if i % 2 == 0 else [("head", REPO), ("base", base)]
                for name, tree in order:
                    print(f"round {i + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                    rounds[name].append(run(tree, bench_args, Path(tmp) / f"{name}_{i}.json"))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], capture_output=True)
    values = {name: [metrics(r) for r in rs] for name, rs in rounds.items()}
    keys = [k for k in values["head"][0] if k in values["base"][0]]
    table = {}
    print(f"\nhead = {subprocess.run(['git', '-C', str(REPO), 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()}"
          f" (+ uncommitted changes, if any), base = {args.base}; bench.py {' '.join(bench_args)}; "
          f"{args.rounds} alternating rounds, load average at the end {os.getloadavg()[0]:.2f}")
    print(f"{'metric':52s} {'base (median)':>14s} {'head (median)':>14s} {'head/base':>9s}   rounds (base | head)")
    for k in keys:
        b = [v[k] for v in values["base"]]
        h = [v[k] for v in values["head"]]
        mb, mh = statistics.median(b), statistics.median(h)
        table[k] = {"base": b, "head": h, "base_median": mb, "head_median": mh, "head_over_base": mh / mb if mb else None}
        fmt = (lambda x: f"{x:,.0f}") if mb > 100 else (lambda x: f"{x:.3f}")
        print(f"{k:52s} {fmt(mb):>14s} {fmt(mh):>14s} {mh / mb if mb else float('nan'):9.3f}   "
              f"{', '.join(map(fmt, b))} | {', '.join(map(fmt, h))}")
    Path(args.out).write_text(json.dumps({"base": args.base, "bench_args": bench_args, "rounds": args.rounds,
                                          "metrics": table}, indent=1))
    return table


if __name__ == "__main__":
    main()
