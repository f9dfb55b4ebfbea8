"""What the run folder's checksums cost: `save_torch` of a model's state with and without the SHA-256 sidecar, and
`load_torch` with and without verifying it, measured in the same process as a ratio (torch.utils.benchmark's Timer,
median of --repeats calls).

    python scripts/bench_checksums.py [--model lenet_300_100|resnet20|vgg16] [--repeats 20]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.utils.benchmark import Measurement, Timer

from lottery.core import files
from lottery.models import build_model

SHAPES = {"lenet_300_100": (1, 28, 28), "resnet20": (3, 32, 32), "vgg16": (3, 32, 32)}


def median_time(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls, each timed on its own (a save is milliseconds of disk work)."""
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return Measurement.merge([timer.timeit(1) for _ in range(repeats)])[0].median


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
        files.load_torch(path)  # its one warning per process (a file without a checksum), outside the timing
        load_plain = median_time(lambda: files.load_torch(path), args.repeats)
    print(f"{args.model}: {sum(t.numel() for t in state.values()) * 4 / 2**20:.1f} MiB of float32 state")
    print(f"save: {plain * 1e3:.2f} ms without checksum, {summed * 1e3:.2f} ms with (x{summed / plain:.2f})")
    print(f"load: {load_plain * 1e3:.2f} ms unverified, {load_verified * 1e3:.2f} ms verified "
          f"(x{load_verified / load_plain:.2f})")


if __name__ == "__main__":
    main()
