#!/usr/bin/env python3
"""The GPU check of batched replicas, as one script:

    python scripts/gpu_replicas.py --data-root ../shared/data                # on a machine with a CUDA GPU
    python scripts/gpu_replicas.py --dry                                     # a few steps on the CPU: does it run?

1. `scripts/bench.py --replicas 1,8,32,128` for LeNet-300-100 / MNIST and Conv-2 / CIFAR-10: aggregate training
   samples/s of R batched networks against the project's single-run loop run R times (interleaved, medians);
2. the wall time of the full `lth_lenet_mnist` experiment with 5 replicates and the reinit control in one process
   (`lottery-train experiment=lth_lenet_mnist replicas=5 pruning.branches=[reinit]`), and, with --separate, of one
   replicate run alone (the five separate jobs take about five times that on one GPU).

Writes `gpu_replicas.json` (and prints a table to paste into docs/benchmarks.md). --dry uses synthetic data,
R = 1, 2 and a two-level experiment of 20 steps per level, on the CPU; its figures mean nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_bench(args, out: Path) -> dict:
    cmd = [sys.executable, str(REPO / "scripts" / "bench.py"), "--replicas", "1,2" if args.dry else args.replicas,
           "--device", "cpu" if args.dry else args.device, "--out", str(out), "--workloads", args.workloads]
    if args.dry:
        cmd += ["--quick", "--threads", "1"]
    else:
        cmd += ["--repeats", str(args.repeats)]
        if args.data_root:
            cmd += ["--data-root", args.data_root]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def run_experiment(args, run_dir: Path, replicas: bool) -> dict:
    overrides = ["experiment=lth_lenet_mnist", "pruning.branches=[reinit]", f"hydra.run.dir={run_dir}",
                 "train.progress=false"]
    overrides += ["replicas=5"] if replicas else ["seed=0"]
    if args.dry:
        overrides += ["dataset=synthetic", "dataset.val_size=64", "train.duration=20it", "train.eval_every=10it",
                      "pruning.levels=2",
                      "device=cpu", "threads=1"]
    else:
        overrides += [f"device={args.device}"] + ([f"dataset.root={args.data_root}"] if args.data_root else [])
    code = "import sys; sys.argv[0] = 'lottery-train'; from lottery.cli import train; train()"
    print("$ lottery-train", " ".join(overrides), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *overrides], check=True)
    wall = time.perf_counter() - t0
    folders = sorted(run_dir.glob("replicate_*")) if replicas else [run_dir]
    summaries = [json.loads((f / "summary.json").read_text()) for f in folders]
    last = max(r["level"] for r in summaries[0])
    final = {b: [next(r["test_accuracy"] for r in s if r["level"] == last and r["branch"] == b) for s in summaries]
             for b in ("ticket", "reinit")}
    return {"wall_s": wall, "replicates": len(folders), "levels": last + 1, "final_level_test_accuracy": final,
            "run_dir": str(run_dir)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=None, help="folder with MNIST/raw and cifar-10-batches-py")
    p.add_argument("--device", default="cuda", help="cuda | cuda:N (default cuda)")
    p.add_argument("--replicas", default="1,8,32,128", help="R values for the benchmark (default 1,8,32,128)")
    p.add_argument("--workloads", default="lenet_mnist,conv2_cifar10")
    p.add_argument("--repeats", type=int, default=3, help="benchmark repeats (default 3)")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--skip-experiment", action="store_true")
    p.add_argument("--separate", action="store_true", help="also time one replicate of the experiment alone")
    p.add_argument("--dry", action="store_true", help="a few steps on the CPU with synthetic data")
    p.add_argument("--out", default="gpu_replicas.json")
    p.add_argument("--work-dir", default=None, help="where the experiment's run folders go (default: a temp dir)")
    args = p.parse_args(argv)
    if not args.dry:
        import torch
        if not torch.cuda.is_available():
            p.error("no CUDA device here; use --dry to check the script on a CPU")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_replicas_"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"date": datetime.date.today().isoformat(), "dry": args.dry, "device": "cpu" if args.dry else args.device,
               "command": " ".join([os.path.basename(sys.executable), *sys.argv])}
    if not args.dry:
        import torch
        results["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    if not args.skip_bench:
        results["bench"] = run_bench(args, work / "bench.json")
    if not args.skip_experiment:
        results["experiment_replicas"] = run_experiment(args, work / "lth_replicas", replicas=True)
        if args.separate:
            results["experiment_one_replicate"] = run_experiment(args, work / "lth_one", replicas=False)
    lines = [f"# {results['date']} {results.get('gpu', 'CPU (dry run)')}"]
    if "bench" in results:
        lines.append(results["bench"]["table"])
    for key in ("experiment_replicas", "experiment_one_replicate"):
        if key in results:
            e = results[key]
            lines.append(f"{key}: {e['replicates']} replicate(s), {e['levels']} levels, wall {e['wall_s']:.0f} s, "
                         f"final-level test accuracy {e['final_level_test_accuracy']}")
    print("\n".join(lines))
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
