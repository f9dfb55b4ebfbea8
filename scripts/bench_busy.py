"""Speed next to other work: a LeNet-300-100 run of `lottery-train` alone, next to a competing CPU-bound process, and
two runs started together, under PyTorch's threading default (what `threads: null` gave before), lottery's default
and `threads=1`.

    python scripts/bench.py --busy --data-root ../shared/data [--busy-steps 1000] [--repeats 3]

Every measurement is a fresh `lottery-train` process (the command a researcher types: `pruning=none`, N steps of
LeNet-300-100 on MNIST, batch 60, Adam, an evaluation of 15,000 examples at the start and at the end), with none of
OMP_WAIT_POLICY, GOMP_SPINCOUNT, KMP_BLOCKTIME, OMP_NUM_THREADS, MKL_NUM_THREADS or SLURM_CPUS_PER_TASK in its
environment. Variants:

  pytorch   what `threads: null` meant before: every core, OpenMP's own wait policy (libgomp: threads spin about
            300,000 times, some milliseconds, before they sleep). The process imports torch before lottery.cli, so
            lottery's default (applied only before torch is loaded) stays off, and gets threads=<every core>.
  passive   every core with lottery's wait policy (OMP_WAIT_POLICY=PASSIVE, set by lottery.cli): the wait policy
            alone, without the thread count lottery picks for small models
  default   `lottery-train` as it is, nothing set: lottery's default (lottery.core.threads: the wait policy, and one
            thread for a model as small as LeNet-300-100)
  threads1  `threads=1`.

Scenarios:

  quiet       the run alone (on this shared machine: whatever else runs; the load average is recorded)
  competitor  next to one CPU-bound process (a single-threaded numpy matmul loop, started a second before the run and
              stopped after it): a laptop with other work open, a shared node
  pair        two identical runs started together, each in its own folder (their mean): two runs side by side

Measured per run: the unit's time (from the run's first log line, once set-up is done, to its result line in
train.log: the model, both evaluations and the N steps) and the process's wall time. Rounds rotate the order of the
variants; the table has medians and the ratios <variant>/default of the unit times (above 1: the default is
faster; medians through torch.utils.benchmark's Measurement).

Each measurement is a whole process, which no benchmark library times by itself (torch.utils.benchmark and
pytest-benchmark repeat a statement in one process; the wait policy is read once, when a process loads torch): the
unit's seconds come from the run's own log and go into a Measurement (scripts/bench_measure.py).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from bench_measure import loadavg as _loadavg, measurement

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("pytorch", "passive", "default", "threads1")
SCENARIOS = ("quiet", "competitor", "pair")
# what a researcher's shell has: none of these (SLURM's count would replace "every core")
CLEARED = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
           "SLURM_CPUS_PER_TASK")
COMPETITOR = ("import numpy as np\n"
              "a = np.random.default_rng(0).random((200, 200))\n"
              "while True:\n"
              "    a = a @ a\n"
              "    a /= a.max()\n")
_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    return {**env, **extra}


def run_command(variant: str, run_dir: Path, steps: int, data_root: str | None) -> list[str]:
    code = ("import sys\n" + ("import torch\n" if variant == "pytorch" else "") +
            "sys.argv[0] = 'lottery-train'\nfrom lottery.cli import train\ntrain()\n")
    data = ([f"dataset.root={data_root}", "dataset.download=false"] if data_root else
            ["dataset=synthetic", "dataset.synthetic_train=3000", "dataset.synthetic_test=1000",
             "dataset.val_size=500"])
    threads = {"pytorch": [f"threads={os.cpu_count()}"], "passive": [f"threads={os.cpu_count()}"], "default": [],
               "threads1": ["threads=1"]}[variant]
    return [sys.executable, "-c", code, *data, "pruning=none", f"train.duration={steps}it",
            f"train.eval_every={steps}it", f"checkpoint.every={steps}it", "train.progress=false", "device=cpu",
            f"hydra.run.dir={run_dir}", *threads]


def _stamp(line: str) -> float | None:
    m = _STAMP.match(line)
    if not m:
        return None
    return datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def unit_seconds(log_file: Path) -> float:
    """From the run's first log line (set-up done) to the line with the unit's result."""
    lines = log_file.read_text().splitlines()
    first = next(_stamp(x) for x in lines if _stamp(x) is not None)
    done = next(_stamp(x) for x in lines if "test acc" in x and _stamp(x) is not None)
    return done - first


def start(variant, run_dir, steps, data_root):
    return subprocess.Popen(run_command(variant, run_dir, steps, data_root), cwd=REPO, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), time.perf_counter()


def finish(proc, t0, run_dir: Path, timeout: float) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"lottery-train failed (exit {proc.returncode}):\n{out[-3000:]}")
    return {"unit_s": unit_seconds(run_dir / "train.log"), "wall_s": wall}


@contextlib.contextmanager
def competing(on: bool = True, settle_s: float = 0.0) -> Iterator[None]:
    """With `on`, a one-thread CPU-bound process (COMPETITOR) runs beside the block, started `settle_s` before it."""
    if not on:
        yield
        return
    env = clean_env(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    comp = subprocess.Popen([sys.executable, "-c", COMPETITOR], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        time.sleep(settle_s)
        yield
    finally:
        comp.kill()
        comp.wait()


def measure(scenario: str, variant: str, tmp: Path, steps: int, data_root, timeout: float, tag: str) -> dict:
    # the competitor runs at full speed before the run starts
    with competing(scenario == "competitor", settle_s=1.0):
        n = 2 if scenario == "pair" else 1
        dirs = [tmp / f"{tag}_{i}" for i in range(n)]
        procs = [start(variant, d, steps, data_root) for d in dirs]
        runs = [finish(p, t0, d, timeout) for (p, t0), d in zip(procs, dirs)]
    # a pair's two runs are one round: their mean
    return {"unit_s": sum(r["unit_s"] for r in runs) / n, "wall_s": sum(r["wall_s"] for r in runs) / n, "runs": runs}


def run_busy(args, log) -> dict:
    steps = args.busy_steps or (5 if args.quick else 1000)
    data_root = os.path.abspath(args.data_root) if args.data_root else None
    scenarios = [s.strip() for s in args.busy_scenarios.split(",") if s.strip()]
    timeout = 60 if args.quick else 3600
    results = {s: {v: [] for v in VARIANTS} for s in scenarios}
    loads = [_loadavg()]
    with tempfile.TemporaryDirectory(prefix="bench_busy_") as tmp:
        tmp = Path(tmp)
        for r in range(args.repeats):
            for s in scenarios:
                order = list(VARIANTS)[r % len(VARIANTS):] + list(VARIANTS)[:r % len(VARIANTS)]
                for v in order:
                    before = _loadavg()
                    res = measure(s, v, tmp, steps, data_root, timeout, f"{s}_{v}_{r}")
                    res["loadavg"] = [before, _loadavg()]
                    results[s][v].append(res)
                    per_run = ", ".join(f"{x['unit_s']:.2f}" for x in res["runs"])
                    log(f"  busy {s:<10} {v:<8} round {r + 1}/{args.repeats}: unit {res['unit_s']:.2f} s, process "
                        f"{res['wall_s']:.2f} s (per run: {per_run}; load {before} -> {res['loadavg'][1]})")
            loads.append(_loadavg())
    out = {"steps": steps, "cores": os.cpu_count(), "repeats": args.repeats, "loadavg": loads, "scenarios": {}}
    for s in scenarios:
        # medians through torch.utils.benchmark's Measurement (one run of the unit per round)
        med = {v: measurement([x["unit_s"] for x in results[s][v]], f"busy {s}", v, "unit").median for v in VARIANTS}
        wall = {v: measurement([x["wall_s"] for x in results[s][v]], f"busy {s}", v, "process").median
                for v in VARIANTS}
        out["scenarios"][s] = {
            "unit_s": med, "wall_s": wall,
            "rounds": {v: [x["unit_s"] for x in results[s][v]] for v in VARIANTS},
            "loadavg": {v: [x["loadavg"] for x in results[s][v]] for v in VARIANTS},
            **{f"{v}/default": med[v] / med["default"] for v in VARIANTS if v != "default"},
            **{f"wall {v}/default": wall[v] / wall["default"] for v in VARIANTS if v != "default"}}
    out["table"] = format_busy(out)
    return out


def format_busy(out: dict) -> str:
    others = [v for v in VARIANTS if v != "default"]
    names = {"pytorch": "pytorch (before)", "passive": "passive, all cores", "default": "default",
             "threads1": "threads=1"}
    lines = [f"lottery-train, LeNet-300-100, {out['steps']} steps + 2 evaluations, {out['cores']} cores; unit seconds "
             f"(medians of {out['repeats']}; process wall in brackets); ratios above 1: the default is faster; load "
             f"averages {out['loadavg']}", "",
             f"{'scenario':<11}" + "".join(f" {names[v]:>19}" for v in VARIANTS)
             + "".join(f" {v + '/default':>17}" for v in others) + "   rounds (" + " | ".join(VARIANTS) + ")"]
    for s, r in out["scenarios"].items():
        u, w = r["unit_s"], r["wall_s"]
        cells = [f"{u[v]:.2f} ({w[v]:.1f})" for v in VARIANTS]
        rounds = " | ".join(", ".join(f"{x:.2f}" for x in r["rounds"][v]) for v in VARIANTS)
        lines.append(f"{s:<11}" + "".join(f" {c:>19}" for c in cells)
                     + "".join(f" {r[v + '/default']:>16.2f}x" for v in others) + f"   {rounds}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit("run through scripts/bench.py --busy")
