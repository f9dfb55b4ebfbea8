"""Tiny units: a run of many short units (16 levels x 3 units x 60 steps of LeNet-300-100 on MNIST), timed per unit
and split by where the time goes; optionally against another commit, side by side.

    python scripts/bench.py --units --data-root ../shared/data                     # this checkout
    python scripts/bench.py --units --units-base 4461865 --data-root ../shared/data  # against a commit, alternating
    python scripts/bench.py --units --units-threads default,1 ...                  # also with threads=1
    python scripts/bench.py --units --units-busy ...        # each run next to a competing CPU-bound process

Each run is `lottery-train` in a fresh process (`child` below: the CLI itself, run from the checkout under test with
its package first on PYTHONPATH), with timers wrapped around the functions a unit passes through. Time is counted
exclusively: a write inside a unit's record-keeping counts as the write, its fsync as fsync, an evaluation inside the
training loop as evaluation. The split:

  start-up        process start to the first unit: interpreter, imports (Hydra, torch, lottery), config checks,
                  data (`load_pool`, reading MNIST from disk), the folder's set-up files, and the first optimizer
                  (torch.optim imports torch._dynamo on its first use: over a second, once per process)
  per unit        training steps, evaluation (start and end of each unit: 5,000 validation + 10,000 test examples),
                  optimizer set-up, pruning, branch planning (controls' masks and weights), models built, records,
                  ticket made, writes by file (result.json, ticket.pt, final.pt, summary.json, metrics.jsonl, ...),
                  fsync, summary (reading the records and serializing), checkpoint clean-up, and the rest
  tear-down       after the last unit to the end of the process

W&B is off (logger=none, the default). Functions a version does not have are simply not timed (their time falls into
the caller's category), so the same timers run against an older commit.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# 16 levels x (ticket + 2 controls) x 60 steps: 46 units (level 0 has only its ticket)
LEVELS, STEPS, BRANCHES = 16, 60, "[reinit,random_prune]"
QUICK_LEVELS, QUICK_STEPS = 3, 5
ONCE = "once: first optimizer"


def command_args(data_root: str | None, run_dir: Path, threads: str, levels: int, steps: int) -> list[str]:
    data = ([f"dataset.root={data_root}", "dataset.download=false"] if data_root else
            ["dataset=synthetic", "dataset.synthetic_train=2000", "dataset.synthetic_test=500", "dataset.val_size=500"])
    return [*data, f"train.duration={steps}it", f"pruning.levels={levels}", f"pruning.branches={BRANCHES}",
            "train.progress=false", "device=cpu", f"hydra.run.dir={run_dir}",
            *([] if threads == "default" else [f"threads={threads}"])]


# --- the child: lottery-train with timers ---------------------------------------------------------------------------

class Timers:
    """Exclusive wall time per category: the innermost timed call gets the time."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.stack: list[list] = []  # [category, start, time of nested calls]

    def enter(self, category: str) -> None:
        self.stack.append([category, time.perf_counter(), 0.0])

    def leave(self) -> None:
        category, start, nested = self.stack.pop()
        spent = time.perf_counter() - start
        self.totals[category] = self.totals.get(category, 0.0) + spent - nested
        self.counts[category] = self.counts.get(category, 0) + 1
        if self.stack:
            self.stack[-1][2] += spent

    def wrap(self, owner, name: str, category):
        """Replace owner.name by a timed version; `category` is a name or a function of the call's arguments."""
        fn = getattr(owner, name, None)
        if fn is None:
            return False
        timers = self

        def timed(*args, **kwargs):
            timers.enter(category(*args, **kwargs) if callable(category) else category)
            try:
                return fn(*args, **kwargs)
            finally:
                timers.leave()
        timed.__wrapped__ = fn
        setattr(owner, name, timed)
        return True


def _file_kind(path) -> str:
    name = Path(path).name
    if name.startswith("checkpoint"):
        return "write checkpoint"
    return f"write {name}" if name in ("result.json", "summary.json", "ticket.pt", "final.pt", "init.pt", "rewind.pt",
                                       "config.yaml", "device.json") else "write other"


def child(argv: list[str]) -> None:
    """`python bench_units.py child OUT.json [lottery-train arguments]`: the CLI with timers; writes the split."""
    t0 = time.perf_counter()
    out_path, args = argv[0], argv[1:]
    timers = Timers()
    marks = {"start": t0}
    import lottery.cli as cli  # noqa: F401 - first, as the console script does (it applies the threading default)
    marks["cli_imported"] = time.perf_counter()
    import lottery.core.files as files
    import lottery.experiment as experiment
    import lottery.experiment.levels as levels
    import lottery.experiment.session as session
    import lottery.experiment.units as units
    import lottery.training.layouts as layouts
    import lottery.training.loop as loop
    from lottery.experiment import folder as folder_mod
    from lottery.experiment import plan, replicate, tracking
    from lottery.core.files import Checkpoints
    marks["lottery_imported"] = time.perf_counter()

    units_done = []
    timers.wrap(session, "load_pool", "start-up: data")
    timers.wrap(units, "train", "train: steps")
    optimizers = []

    def optimizer_category(*a, **k):  # the first one imports torch._dynamo (torch.optim does): once per process
        optimizers.append(1)
        return ONCE if len(optimizers) == 1 else "train: optimizer set-up"
    timers.wrap(loop, "make_optimizer", optimizer_category)
    for cls in [c for c in vars(layouts).values() if isinstance(c, type) and "evaluate" in vars(c)]:
        timers.wrap(cls, "evaluate", "train: evaluation")
    timers.wrap(files, "atomic_write_bytes", lambda path, *a, **k: _file_kind(path))
    timers.wrap(files.os, "fsync", "fsync")
    timers.wrap(files, "fsync_file", "fsync")
    timers.wrap(folder_mod.RunFolder, "write_summary", "summary: read records, serialize")
    timers.wrap(folder_mod.RunFolder, "results", "summary: read records, serialize")
    timers.wrap(folder_mod.RunFolder, "load_result", "read results")
    timers.wrap(units, "unit_record", "unit record")
    timers.wrap(plan, "prune_level", "pruning")
    timers.wrap(units, "plan_branch", "branch planning (controls' masks, weights)")
    timers.wrap(replicate.Replicate, "new_model", "models built and initialized")
    timers.wrap(levels, "make_ticket", "ticket made")
    timers.wrap(Checkpoints, "clear", "checkpoint clean-up")
    for name in ("eval", "train", "level", "artifact"):
        timers.wrap(tracking.Tracker, name, "metrics.jsonl (W&B off)")
    finish = getattr(units, "finish_unit", None)
    if finish is not None:
        def counted(*a, **k):
            units_done.append(1)
            return finish(*a, **k)
        units.finish_unit = counted
    run_levels = levels.run_levels

    def timed_levels(*a, **k):
        marks["levels_start"] = time.perf_counter()
        marks["threads"] = _threads()  # what the run trains with (a run gives the caller's count back when it ends)
        marks["setup_totals"] = dict(timers.totals)
        timers.enter("the rest (level loop, masks, states, logging)")
        try:
            return run_levels(*a, **k)
        finally:
            timers.leave()
            marks["levels_end"] = time.perf_counter()
            marks["levels_totals"] = dict(timers.totals)
    levels.run_levels = timed_levels
    run_experiment = experiment.run_experiment

    def timed_experiment(*a, **k):
        marks["experiment_start"] = time.perf_counter()
        try:
            return run_experiment(*a, **k)
        finally:
            marks["experiment_end"] = time.perf_counter()
    experiment.run_experiment = timed_experiment

    sys.argv = ["lottery-train", *args]
    code = 0
    try:
        cli.train()
    except SystemExit as e:
        code = e.code or 0
    marks["end"] = time.perf_counter()
    setup = marks["setup_totals"]
    in_levels = {k: v - setup.get(k, 0.0) for k, v in marks["levels_totals"].items()}
    in_levels = {k: v for k, v in in_levels.items() if v > 0}
    n = len(units_done)
    data = setup.get("start-up: data", 0.0)
    writes = sum(v for k, v in setup.items() if k.startswith("write") or k == "fsync")
    startup = {"imports: lottery.cli (Hydra, OmegaConf)": marks["cli_imported"] - marks["start"],
               "imports: torch, lottery": marks["lottery_imported"] - marks["cli_imported"],
               "Hydra: config composed": marks["experiment_start"] - marks["lottery_imported"],
               "data: MNIST from disk to tensors": data,
               "set-up writes (config, device, .hydra) + fsync": writes,
               "checks, model, folder, rest of set-up":
                   marks["levels_start"] - marks["experiment_start"] - data - writes}
    once = in_levels.pop(ONCE, 0.0)
    startup["first optimizer: imports torch._dynamo (torch.optim does)"] = once
    Path(out_path).write_text(json.dumps({
        "exit": code, "units": n, "in_process_s": marks["end"] - marks["start"],
        "levels_s": marks["levels_end"] - marks["levels_start"] - once, "once_s": once,
        "startup_s": marks["levels_start"] - marks["start"] + once, "teardown_s": marks["end"] - marks["levels_end"],
        "startup": startup, "per_unit_s": {k: v / max(n, 1) for k, v in in_levels.items()},
        "counts": timers.counts, "threads": marks.get("threads", _threads()), "wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }, indent=1))


def _threads() -> int:
    import torch
    return torch.get_num_threads()


# --- the driver -----------------------------------------------------------------------------------------------------

def _run(tree: Path, args: list[str], out: Path, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS"):
        env.pop(var, None)  # what a researcher's shell has: none of them
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "child", str(out), *args], cwd=tree, env=env,
                       capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if r.returncode != 0 or not out.exists():
        raise RuntimeError(f"tiny-units run failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    res = json.loads(out.read_text())
    if res["exit"] != 0:
        raise RuntimeError(f"lottery-train exited with {res['exit']}:\n{r.stderr[-3000:]}")
    res["process_wall_s"] = wall
    res["interpreter_s"] = wall - res["in_process_s"]
    return res


def run_units(args, log) -> dict:
    """Alternating rounds of (version x threads setting); per unit wall time and its split."""
    from bench_busy import competing  # scripts/ is on the path: bench.py runs this
    quick = args.quick
    levels, steps = (QUICK_LEVELS, QUICK_STEPS) if quick else (LEVELS, STEPS)
    threads = [t.strip() for t in args.units_threads.split(",") if t.strip()]
    repeats = args.repeats
    trees = {"head": REPO}
    tmp = Path(tempfile.mkdtemp(prefix="bench_units_"))
    try:
        if args.units_base:
            base = tmp / "base"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), args.units_base],
                           check=True, capture_output=True)
            trees = {"base": base, "head": REPO}
        data_root = os.path.abspath(args.data_root) if args.data_root else None
        runs: dict[str, list[dict]] = {}
        loads = [_loadavg()]
        for r in range(repeats):
            order = [(v, t) for t in threads for v in trees]
            order = order[r % len(order):] + order[:r % len(order)]
            for version, th in order:
                key = f"{version} threads={th}"
                run_dir = tmp / f"run_{version}_{th}_{r}"
                with competing(args.units_busy):  # the busy mode's competing process beside the run
                    res = _run(trees[version], command_args(data_root, run_dir, th, levels, steps),
                               tmp / f"{version}_{th}_{r}.json", timeout=3600)
                shutil.rmtree(run_dir, ignore_errors=True)
                res["loadavg"] = _loadavg()
                runs.setdefault(key, []).append(res)
                log(f"  units {key} round {r + 1}/{repeats}: {res['units']} units, "
                    f"{res['levels_s'] / max(res['units'], 1):.3f} s/unit, process {res['process_wall_s']:.1f} s "
                    f"(load {res['loadavg']})")
            loads.append(_loadavg())
    finally:
        if args.units_base:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tmp / "base")],
                           capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"levels": levels, "steps": steps, "branches": BRANCHES, "base": args.units_base, "threads": threads,
           "busy": bool(args.units_busy), "loadavg": loads, "variants": {}}
    for key, rs in runs.items():
        med = statistics.median
        cats = sorted({c for x in rs for c in x["per_unit_s"]})
        out["variants"][key] = {
            "units": rs[0]["units"], "rounds": len(rs),
            "per_unit_s": med([x["levels_s"] / max(x["units"], 1) for x in rs]),
            "per_unit_rounds": [x["levels_s"] / max(x["units"], 1) for x in rs],
            "process_wall_s": med([x["process_wall_s"] for x in rs]),
            "startup_s": med([x["startup_s"] + x["interpreter_s"] for x in rs]),
            "teardown_s": med([x["teardown_s"] for x in rs]),
            "startup": {k: med([x["startup"][k] for x in rs]) for k in rs[0]["startup"]}
            | {"interpreter start and exit": med([x["interpreter_s"] for x in rs])},
            "split_per_unit_s": {c: med([x["per_unit_s"].get(c, 0.0) for x in rs]) for c in cats},
            "thread_count": rs[0]["threads"], "wait_policy": rs[0]["wait_policy"],
        }
    out["table"] = format_units(out)
    return out


def format_units(out: dict) -> str:
    v = out["variants"]
    keys = list(v)
    lines = [f"tiny units: {out['levels']} levels x (ticket + {out['branches']}) x {out['steps']} steps, "
             f"{v[keys[0]]['units']} units{', each run next to a CPU-bound process' if out.get('busy') else ''}; "
             f"medians of {v[keys[0]]['rounds']} alternating rounds; load "
             f"{out['loadavg']}", "",
             f"{'':46s}" + "".join(f"{k:>22s}" for k in keys)]

    def row(label, values, fmt="{:>22.1f}"):
        lines.append(f"{label:46s}" + "".join(fmt.format(x) for x in values))
    row("process wall (s)", [v[k]["process_wall_s"] for k in keys])
    row("per unit (ms)", [1000 * v[k]["per_unit_s"] for k in keys])
    row("  per-round (ms)", [", ".join(f"{1000 * x:.0f}" for x in v[k]["per_unit_rounds"]) for k in keys],
        "{:>22s}")
    row("start-up, once (s)", [v[k]["startup_s"] for k in keys], "{:>22.2f}")
    for c in v[keys[0]]["startup"]:
        row(f"  {c}", [v[k]["startup"].get(c, 0.0) for k in keys], "{:>22.2f}")
    row("tear-down, once (s)", [v[k]["teardown_s"] for k in keys], "{:>22.2f}")
    lines.append("per unit, by where the time goes (ms):")
    cats = sorted({c for k in keys for c in v[k]["split_per_unit_s"]},
                  key=lambda c: -max(v[k]["split_per_unit_s"].get(c, 0.0) for k in keys))
    for c in cats:
        row(f"  {c}"[:46], [1000 * v[k]["split_per_unit_s"].get(c, 0.0) for k in keys], "{:>22.2f}")
    row("threads, OMP_WAIT_POLICY", [f"{v[k]['thread_count']}, {v[k]['wait_policy']}" for k in keys], "{:>22s}")
    if len(keys) > 1 and out["base"]:
        for th in out["threads"]:
            b, h = v.get(f"base threads={th}"), v.get(f"head threads={th}")
            if b and h:
                lines.append(f"threads={th}: per unit head/base {h['per_unit_s'] / b['per_unit_s']:.3f} "
                             f"(base {1000 * b['per_unit_s']:.0f} ms, head {1000 * h['per_unit_s']:.0f} ms)")
    return "\n".join(lines)


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2:])
    else:
        raise SystemExit("run through scripts/bench.py --units")
