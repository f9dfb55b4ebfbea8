"""What the run folder's checksums cost: `save_torch` of a model's state with and without the SHA-256 sidecar, and
`load_torch` with and without verifying it, measured in the same process (median of --repeats), as a ratio.

    python scripts/bench_checksums.py [--model lenet_300_100|resnet20|vgg16] [--repeats 20]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lottery.core import files
from lottery.models import build_model

SHAPES = {"lenet_300_100": (1, 28, 28), "resnet20": (3, 32, 32), "vgg16": (3, 32, 32)}


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20", choices=sorted(SHAPES))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    state = build_model(args.model, SHAPES[args.model], 10).state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "final.pt"
        plain = median_time(lambda: files.atomic_write_bytes(path, lambda f: torch.save(state, f), checksum=False),
                            args.repeats)
        summed = median_time(lambda: files.save_torch(state, path), args.repeats)
        load_verified = median_time(lambda: files.load_torch(path), args.repeats)
        files.checksum_path(path).unlink()
        files._UNVERIFIED_SAID.add(path.parent)  # no warning in the timing
        load_plain = median_time(lambda: files.load_torch(path), args.repeats)
    print(f"{args.model}: {sum(t.numel() for t in state.values()) * 4 / 2**20:.1f} MiB of float32 state")
    print(f"save: {plain * 1e3:.2f} ms without checksum, {summed * 1e3:.2f} ms with (x{summed / plain:.2f})")
    print(f"load: {load_plain * 1e3:.2f} ms unverified, {load_verified * 1e3:.2f} ms verified "
          f"(x{load_verified / load_plain:.2f})")


if __name__ == "__main__":
    main()
