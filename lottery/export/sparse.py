"""Sparse kernels for unstructured tickets: a Linear layer replaced by a CSR one (torch.sparse_csr) only where that
was measured faster than the dense layer at the batch size the export is for.

Whether CSR pays depends on the density, the layer's shape, the batch size and the CPU (at batch 256 a dense GEMM
is hard to beat below ~1% density on some CPUs, at batch 1 a sparse matrix-vector product wins far earlier), so
nothing is assumed: `choose` times both forms of each layer with `timer` (the median of torch.utils.benchmark
repeats by default; tests inject one) and keeps the faster.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

Timer = Callable[[nn.Module, torch.Tensor], float]  # seconds per call of module(x)


class CSRLinear(nn.Module):
    """y = x W^T + b with W held as a CSR matrix (only its non-zeros)."""

    weight: torch.Tensor  # buffers (register_buffer), declared for the type checker
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with warnings.catch_warnings():  # "sparse CSR support is in beta": said once in the docs, not per layer
            warnings.simplefilter("ignore", UserWarning)
            self.register_buffer("weight", linear.weight.detach().to_sparse_csr())
        self.register_buffer("bias", linear.bias.detach().clone() if linear.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # CSR @ dense with W on the sparse side; a contiguous x^T is 2-3x faster at batch 256 than the strided view
        # (measured: 300x784 at 1%, 146 us vs 409 us, 2-core AMD EPYC, 1 thread)
        y = torch.mm(self.weight, x.t().contiguous()).t()
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        nnz = self.weight.values().numel()
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={nnz}"


CLOCKS = ("wall", "thread")


def median_time(
    module: nn.Module, x: torch.Tensor, threads: int = 1, min_run_time: float = 0.2, clock: str = "wall"
) -> float:
    """Median seconds per module(x) over torch.utils.benchmark's repeats, with `threads` threads. `clock="thread"`:
    the CPU time of the calling thread (time.thread_time) instead of wall time, which with one thread counts the
    kernels' work and not the time the scheduler gave to other processes (a shared machine)."""
    import time

    from torch.utils import benchmark

    if clock not in CLOCKS:
        raise ValueError(f"unknown clock {clock!r}; accepted: {', '.join(CLOCKS)}")
    if clock == "thread" and threads != 1:
        raise ValueError(f"clock 'thread' measures one thread; got threads={threads}")
    kwargs: dict[str, Any] = {"timer": time.thread_time} if clock == "thread" else {}
    with torch.no_grad():
        t = benchmark.Timer(stmt="m(x)", globals={"m": module, "x": x}, num_threads=threads, **kwargs)
        return t.blocked_autorange(min_run_time=min_run_time).median


def choose(
    model: nn.Module, input_shape, batch: int, timer: Timer | None = None, threads: int = 1, clock: str = "wall"
) -> tuple[nn.Module, list[dict]]:
    """(copy of `model` with every Linear whose CSR form timed faster replaced by it, one row per Linear: name,
    density, dense_s, csr_s, chosen). Each layer is timed on its own input at batch `batch`, as captured from one
    forward pass of random data."""
    timer = timer or (lambda m, x: median_time(m, x, threads, clock=clock))
    inputs: dict[str, torch.Tensor] = {}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    handles = [
        m.register_forward_hook(lambda mod, inp, out, n=n: inputs.__setitem__(n, inp[0].detach()))
        for n, m in linears.items()
    ]
    try:
        with torch.no_grad():
            model.eval()(torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0)))
    finally:
        for h in handles:
            h.remove()
    new = copy.deepcopy(model).eval()
    rows = []
    for name, lin in linears.items():
        x = inputs[name]
        csr = CSRLinear(lin)
        dense_s, csr_s = timer(lin, x), timer(csr, x)
        chosen = "csr" if csr_s < dense_s else "dense"
        if chosen == "csr":
            parent, _, attr = name.rpartition(".")
            setattr(new.get_submodule(parent) if parent else new, attr, csr)
        rows.append(
            {
                "layer": name,
                "density": int(lin.weight.count_nonzero()) / lin.weight.numel(),
                "dense_s": dense_s,
                "csr_s": csr_s,
                "chosen": chosen,
            }
        )
    return new, rows


def crossover(
    shape: tuple[int, int],
    batch: int,
    densities=(0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01),
    threads: int = 1,
    timer: Timer | None = None,
    seed: int = 0,
) -> dict:
    """Dense vs CSR time of one random-mask Linear of `shape` (out, in) at each density; `crossover` is the highest
    density at which CSR was faster (None: never)."""
    timer = timer or (lambda m, x: median_time(m, x, threads, min_run_time=0.1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, shape[1], generator=g)
    rows = []
    for d in sorted(densities, reverse=True):
        lin = nn.Linear(shape[1], shape[0])
        with torch.no_grad():
            lin.weight.mul_(torch.rand(shape, generator=g) < d)
        rows.append({"density": d, "dense_s": timer(lin, x), "csr_s": timer(CSRLinear(lin), x)})
    faster = [r["density"] for r in rows if r["csr_s"] < r["dense_s"]]
    return {
        "shape": list(shape),
        "batch": batch,
        "threads": threads,
        "rows": rows,
        "crossover": max(faster) if faster else None,
    }


def save(model: nn.Module, input_shape, out) -> tuple[Path, str]:
    """(file, format): the network with CSR layers as TorchScript (`csr.ts`). torch.export refuses the CSR product
    (aten.mm on a sparse operand is not an exportable operator in torch 2.14), while a TorchScript trace keeps the
    sparse weights and their product, and `torch.jit.load` runs it without lottery."""
    path = Path(out) / "csr.ts"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice
        traced = torch.jit.trace(model.eval(), torch.zeros(2, *input_shape), check_trace=False)
    traced.save(str(path))
    return path, "TorchScript (torch.jit.trace)"


def load(path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path))
