"""Tiny units: a run of many short units (16 levels x 3 units x 60 steps of LeNet-300-100 on MNIST), timed per unit
and split by where the time goes; optionally against another commit, side by side.

    python scripts/bench.py --units --data-root ../shared/data                     # this checkout
    python scripts/bench.py --units --units-base 4461865 --data-root ../shared/data  # against a commit, alternating
    python scripts/bench.py --units --units-threads default,1 ...                  # also with threads=1
    python scripts/bench.py --units --units-busy ...        # each run next to a competing CPU-bound process

Each run is `lottery-train` in a fresh process of the checkout under test (its package first on PYTHONPATH), nothing
of it replaced; its times come from its train.log: start-up is process start to the run's first log line (set-up
done: interpreter, imports, config checks, data, the folder's set-up files), a unit's time is from there to the last
unit's result line divided by the units, tear-down is the rest of the process. Versions and thread settings
alternate, `--repeats` rounds; medians through torch.utils.benchmark's Measurement.

The split of a unit comes from one more run of this checkout per thread setting under torch.profiler: lottery's spans
(lottery.core.spans: lottery.step with its lottery.data and lottery.mask, lottery.eval) and PyTorch's optimizer span
(Optimizer.step#...), as shares of that run's units, applied to the unprofiled seconds per unit (the profiler adds
time to every operator, so its absolute times are not the run's):

  steps: data, forward and backward, optimizer step, masking    the training steps
  evaluation                                                     start and end of each unit (validation + test)
  everything else                                                records, writes, fsync, pruning, models, summary

W&B is off (logger=none, the default). A base commit is timed per unit (its log lines are the same); it has no split
where it has no spans.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# 16 levels x (ticket + 2 controls) x 60 steps: 46 units (level 0 has only its ticket)
LEVELS, STEPS, BRANCHES = 16, 60, "[reinit,random_prune]"
QUICK_LEVELS, QUICK_STEPS = 3, 5


def command_args(data_root: str | None, run_dir: Path, threads: str, levels: int, steps: int) -> list[str]:
    data = ([f"dataset.root={data_root}", "dataset.download=false"] if data_root else
            ["dataset=synthetic", "dataset.synthetic_train=2000", "dataset.synthetic_test=500", "dataset.val_size=500"])
    return [*data, f"train.duration={steps}it", f"pruning.levels={levels}", f"pruning.branches={BRANCHES}",
            "train.progress=false", "device=cpu", f"hydra.run.dir={run_dir}",
            *([] if threads == "default" else [f"threads={threads}"])]


# --- the child: lottery-train under torch.profiler -------------------------------------------------------------------
# The split comes from lottery's own spans (lottery.core.spans) and PyTorch's optimizer span, read with torch.profiler:
# nothing of the run is replaced. The profiler adds a little time to every operator, so the split is taken from a
# profiled run of its own and given as each part's share of a unit; the times per unit come from unprofiled runs.

SPANS = {"steps: data": "lottery.data", "steps: masking": "lottery.mask", "evaluation": "lottery.eval"}


def child(argv: list[str]) -> None:
    """`python bench_units.py child OUT.json [lottery-train arguments]`: the CLI under torch.profiler; writes the
    span totals (seconds, whole run)."""
    out_path, args = argv[0], argv[1:]
    import lottery.cli as cli
    sys.argv = ["lottery-train", *args]
    import torch  # after lottery.cli: its entry point sets the wait policy before torch loads, as the console script

    code = 0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        try:
            cli.train()
        except SystemExit as e:
            code = e.code or 0
    totals: dict[str, float] = {}
    for e in prof.key_averages():
        if e.key.startswith("lottery.") or e.key.startswith("Optimizer.step#"):
            key = "optimizer step" if e.key.startswith("Optimizer.step#") else e.key
            totals[key] = totals.get(key, 0.0) + e.cpu_time_total / 1e6
    Path(out_path).write_text(json.dumps({"exit": code, "spans_s": totals}, indent=1))


def split_per_unit(spans_s: dict, units: int, profiled_s: float, unit_s: float) -> dict[str, float]:
    """Per unit, seconds by where they go: each span's share of the profiled run's units (`profiled_s` seconds for
    `units` units), times `unit_s` (an unprofiled run's seconds per unit). Forward and backward are the steps less
    their data, masking and optimizer spans; the rest of a unit is everything else."""
    if not spans_s or not units:
        return {}  # a version without spans: the unit's time only
    parts = {k: spans_s.get(name, 0.0) for k, name in SPANS.items()}
    parts["steps: optimizer step"] = spans_s.get("optimizer step", 0.0)
    step = spans_s.get("lottery.step", 0.0)
    parts["steps: forward and backward"] = max(step - parts["steps: data"] - parts["steps: optimizer step"]
                                               - parts["steps: masking"], 0.0)
    scale = unit_s * units / profiled_s if profiled_s else 0.0
    out = {k: v / units * scale for k, v in parts.items()}
    out["everything else (records, writes, pruning)"] = max(unit_s - sum(out.values()), 0.0)
    return out


def _stamp(line: str):
    from bench_busy import _stamp as stamp  # scripts/ is on the path: bench.py runs this
    return stamp(line)


_RESULT = re.compile(r"level \d+ \S+ +weights remaining +[\d.]+%  (test acc|DIVERGED)")  # a unit's result line


def unit_times(log_file: Path) -> tuple[int, float]:
    """(units, seconds from the end of set-up to the last unit's result) from a run's train.log: the first line is
    written once set-up is done, each unit's result is a line with its test accuracy (or DIVERGED)."""
    lines = [(t, x) for x in log_file.read_text().splitlines() if (t := _stamp(x)) is not None]
    results = [t for t, x in lines if _RESULT.search(x)]
    return len(results), results[-1] - lines[0][0]


# --- the driver -----------------------------------------------------------------------------------------------------

LOTTERY_TRAIN = "import sys\nsys.argv[0] = 'lottery-train'\nfrom lottery.cli import train\ntrain()\n"


def _run(tree: Path, args: list[str], run_dir: Path, timeout: float, profiled_out: Path | None = None) -> dict:
    """One `lottery-train` process of `tree` (its package first on PYTHONPATH); with `profiled_out`, under
    torch.profiler (`child`). Its units and seconds from its train.log."""
    from bench_busy import clean_env
    env = clean_env(PYTHONPATH=str(tree))  # what a researcher's shell has: no thread or wait-policy variable
    cmd = ([sys.executable, str(Path(__file__).resolve()), "child", str(profiled_out), *args] if profiled_out else
           [sys.executable, "-c", LOTTERY_TRAIN, *args])
    began = time.time()
    r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    ended = time.time()
    if r.returncode != 0:
        raise RuntimeError(f"tiny-units run failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    text = (run_dir / "train.log").read_text().splitlines()
    lines = [t for x in text if (t := _stamp(x)) is not None]
    units, levels_s = unit_times(run_dir / "train.log")
    res = {"units": units, "levels_s": levels_s, "process_wall_s": ended - began, "startup_s": lines[0] - began,
           "teardown_s": ended - lines[0] - levels_s,
           "threads": text[0].rsplit("; ", 1)[-1]}  # the first line ends with lottery.core.threads.describe()
    if profiled_out:
        res["spans_s"] = json.loads(profiled_out.read_text())["spans_s"]
    return res


def run_units(args, log) -> dict:
    """Alternating rounds of (version x threads setting), each an unprofiled `lottery-train`: seconds per unit. Then
    one profiled run per setting of this checkout: the split of a unit (lottery's spans)."""
    from bench_busy import competing  # scripts/ is on the path: bench.py runs this
    from bench_measure import loadavg as _loadavg, measurement  # torch: not in the child, before lottery.cli
    quick = args.quick
    levels, steps = (QUICK_LEVELS, QUICK_STEPS) if quick else (LEVELS, STEPS)
    threads = [t.strip() for t in args.units_threads.split(",") if t.strip()]
    repeats = args.repeats
    trees = {"head": REPO}
    tmp = Path(tempfile.mkdtemp(prefix="bench_units_"))
    data_root = os.path.abspath(args.data_root) if args.data_root else None
    runs: dict[str, list[dict]] = {}
    profiled: dict[str, dict] = {}
    loads = [_loadavg()]
    try:
        if args.units_base:
            base = tmp / "base"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), args.units_base],
                           check=True, capture_output=True)
            trees = {"base": base, "head": REPO}
        for r in range(repeats):
            order = [(v, t) for t in threads for v in trees]
            order = order[r % len(order):] + order[:r % len(order)]
            for version, th in order:
                key = f"{version} threads={th}"
                run_dir = tmp / f"run_{version}_{th}_{r}"
                with competing(args.units_busy):  # the busy mode's competing process beside the run
                    res = _run(trees[version], command_args(data_root, run_dir, th, levels, steps), run_dir, 3600)
                shutil.rmtree(run_dir, ignore_errors=True)
                res["loadavg"] = _loadavg()
                runs.setdefault(key, []).append(res)
                log(f"  units {key} round {r + 1}/{repeats}: {res['units']} units, "
                    f"{res['levels_s'] / max(res['units'], 1):.3f} s/unit, process {res['process_wall_s']:.1f} s "
                    f"(load {res['loadavg']})")
            loads.append(_loadavg())
        for th in threads:  # the split: this checkout under torch.profiler
            run_dir = tmp / f"profiled_{th}"
            with competing(args.units_busy):
                profiled[th] = _run(REPO, command_args(data_root, run_dir, th, levels, steps), run_dir, 3600,
                                    profiled_out=tmp / f"profiled_{th}.json")
            log(f"  units head threads={th} profiled: {profiled[th]['units']} units, "
                f"{profiled[th]['levels_s'] / max(profiled[th]['units'], 1):.3f} s/unit")
    finally:
        if args.units_base:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tmp / "base")],
                           capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"levels": levels, "steps": steps, "branches": BRANCHES, "base": args.units_base, "threads": threads,
           "busy": bool(args.units_busy), "loadavg": loads, "variants": {}}
    for key, rs in runs.items():
        version, th = key.split(" threads=")
        unit = measurement([x["levels_s"] / max(x["units"], 1) for x in rs], "tiny units", key, "per unit")
        med = {k: measurement([x[k] for x in rs], "tiny units", key, k).median
               for k in ("process_wall_s", "startup_s", "teardown_s")}
        prof = profiled.get(th) if version == "head" else None
        split = (split_per_unit(prof["spans_s"], prof["units"], prof["levels_s"], unit.median) if prof else {})
        out["variants"][key] = {"units": rs[0]["units"], "rounds": len(rs), "per_unit_s": unit.median,
                                "per_unit_rounds": [x["levels_s"] / max(x["units"], 1) for x in rs], **med,
                                "split_per_unit_s": split, "threads_used": rs[0]["threads"]}
    out["table"] = format_units(out)
    return out


def format_units(out: dict) -> str:
    v = out["variants"]
    keys = list(v)
    lines = [f"tiny units: {out['levels']} levels x (ticket + {out['branches']}) x {out['steps']} steps, "
             f"{v[keys[0]]['units']} units{', each run next to a CPU-bound process' if out.get('busy') else ''}; "
             f"medians of {v[keys[0]]['rounds']} alternating rounds; load {out['loadavg']}", "",
             f"{'':46s}" + "".join(f"{k:>22s}" for k in keys)]

    def row(label, values, fmt="{:>22.1f}"):
        lines.append(f"{label:46s}" + "".join(fmt.format(x) for x in values))
    row("process wall (s)", [v[k]["process_wall_s"] for k in keys])
    row("per unit (ms)", [1000 * v[k]["per_unit_s"] for k in keys])
    row("  per-round (ms)", [", ".join(f"{1000 * x:.0f}" for x in v[k]["per_unit_rounds"]) for k in keys],
        "{:>22s}")
    row("start-up to the first unit, once (s)", [v[k]["startup_s"] for k in keys], "{:>22.2f}")
    row("tear-down, once (s)", [v[k]["teardown_s"] for k in keys], "{:>22.2f}")
    lines.append("per unit, by where the time goes (ms; shares from a profiled run of this checkout, lottery's spans):")
    cats = sorted({c for k in keys for c in v[k]["split_per_unit_s"]},
                  key=lambda c: -max(v[k]["split_per_unit_s"].get(c, 0.0) for k in keys))
    for c in cats:  # "-": a version without spans (a base commit)
        row(f"  {c}"[:46], [f"{1000 * v[k]['split_per_unit_s'][c]:.2f}" if c in v[k]["split_per_unit_s"] else "-"
                            for k in keys], "{:>22s}")
    row("threads, wait policy (the log's first line)",
        [v[k]["threads_used"].replace("OMP_WAIT_POLICY=", "")[:21] for k in keys], "{:>22s}")
    if len(keys) > 1 and out["base"]:
        for th in out["threads"]:
            b, h = v.get(f"base threads={th}"), v.get(f"head threads={th}")
            if b and h:
                lines.append(f"threads={th}: per unit head/base {h['per_unit_s'] / b['per_unit_s']:.3f} "
                             f"(base {1000 * b['per_unit_s']:.0f} ms, head {1000 * h['per_unit_s']:.0f} ms)")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        child(sys.argv[2:])
    else:
        raise SystemExit("run through scripts/bench.py --units")
