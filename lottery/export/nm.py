"""N:M tickets on a GPU: the 2:4 linear layers as PyTorch semi-structured sparse tensors (half precision).

PyTorch's 2:4 kernels (CUTLASS, or cuSPARSELt where installed) are CUDA-only and accept a weight only in multiples of
their tile: (rows, cols) divisible by (32, 64) for CUTLASS in fp16, (16, 16) for cuSPARSELt. A layer of another
shape (LeNet-300-100's 300-, 100- and 10-row layers, every classifier with 10 rows) is left dense in fp16: padding it
would spend the saving on the padding for layers this small. Conv layers are left dense too (the kernels are for
matrix products).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class NotApplicable(ValueError):
    """The variant does not apply here (one line says why)."""


def is_2to4(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every 4 consecutive weights along the input dimension."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def tile() -> tuple[int, int]:
    """(rows, cols) multiples the 2:4 fp16 kernels of this PyTorch accept."""
    cusparselt = getattr(torch.backends, "cusparselt", None)
    return (16, 16) if cusparselt is not None and cusparselt.is_available() else (32, 64)


def semi_structured(model: nn.Module, device) -> tuple[nn.Module, list[dict]]:
    """(fp16 copy of `model` on `device` with each accepted 2:4 Linear converted, one row per Linear: layer, shape,
    chosen ("2:4" or why it stayed dense))."""
    device = torch.device(device)
    if device.type != "cuda":
        raise NotApplicable(
            f"2:4 semi-structured sparsity does not apply on {device.type}: PyTorch's 2:4 kernels "
            f"are CUDA-only (run the export on a GPU machine)"
        )
    from torch.sparse import to_sparse_semi_structured

    new = copy.deepcopy(model).half().to(device).eval()
    rows_mult, cols_mult = tile()
    rows = []
    for name, lin in [(n, m) for n, m in new.named_modules() if isinstance(m, nn.Linear)]:
        shape = tuple(lin.weight.shape)
        if not is_2to4(lin.weight):
            chosen = "dense (not 2:4)"
        elif shape[0] % rows_mult or shape[1] % cols_mult:
            chosen = f"dense (shape {shape[0]}x{shape[1]} not in multiples of {rows_mult}x{cols_mult})"
        else:
            lin.weight = nn.Parameter(to_sparse_semi_structured(lin.weight.detach()), requires_grad=False)
            chosen = "2:4"
        rows.append({"layer": name, "shape": list(shape), "chosen": chosen})
    return new, rows
