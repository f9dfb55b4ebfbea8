"""The export's table: per variant, weights remaining, bytes on disk, latency at batch 1 and 256, test accuracy."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch
from torch import nn

from lottery.export.sparse import median_time

COLUMNS = [
    "variant",
    "weights",
    "bytes",
    "latency_b1_ms",
    "latency_b256_ms",
    "threads",
    "accuracy",
    "max_rel_diff",
    "file",
]


def state_bytes(model: nn.Module) -> int:
    """Bytes of torch.save(model.state_dict()): the dense network on disk."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def latency_ms(
    model: nn.Module, input_shape, batch: int, threads: int, min_run_time: float = 0.5, clock: str = "wall"
) -> float:
    x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0))
    return 1000 * median_time(model, x, threads, min_run_time, clock)  # no .eval(): an exported module refuses it


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    with torch.no_grad():
        right = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch))
    return right / len(x)


def accuracy_of(logits: torch.Tensor, y: torch.Tensor) -> float:
    return int((logits.argmax(1) == y).sum()) / len(y)


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the outputs of two networks on the same images, relative to the reference `b`."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def outputs(model: nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


def row(
    variant: str,
    weights: int,
    nbytes: int | None,
    model: nn.Module | None,
    input_shape,
    threads: int,
    acc: float | None,
    diff: float | None = None,
    file: str = "",
    min_run_time: float = 0.5,
    clock: str = "wall",
) -> dict:
    """One line of the table; latencies are measured here (none for a variant that is a file, not a network)."""
    lat = {
        b: (latency_ms(model, input_shape, b, threads, min_run_time, clock) if model is not None else None)
        for b in (1, 256)
    }
    return {
        "variant": variant,
        "weights": weights,
        "bytes": nbytes,
        "latency_b1_ms": lat[1],
        "latency_b256_ms": lat[256],
        "threads": threads,
        "accuracy": acc,
        "max_rel_diff": diff,
        "file": file,
    }


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write(rows: list[dict], out: Path) -> list[Path]:
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows([{c: r.get(c) for c in COLUMNS} for r in rows])
    (out / "table.md").write_text(markdown(rows))
    return [out / "table.csv", out / "table.md"]
