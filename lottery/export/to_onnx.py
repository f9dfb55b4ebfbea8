"""ONNX export (optional extra `lottery[export]`: onnx, onnxruntime) checked with ONNX Runtime against PyTorch.

torch.onnx's TorchScript-based exporter (dynamo=False) is used: the dynamo exporter needs onnxscript, one more
dependency, for networks this plain."""

from __future__ import annotations

import importlib.util

import torch
from torch import nn


def available() -> str | None:
    """None if onnx and onnxruntime import, else the line saying what is missing."""
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    return (
        f"ONNX export skipped: {' and '.join(missing)} not installed (pip install 'lottery[export]')"
        if missing
        else None
    )


def export(model: nn.Module, input_shape, path) -> None:
    """`model` in eval mode (an eager module: the ONNX exporter traces it)."""
    torch.onnx.export(
        model,
        (torch.zeros(2, *input_shape),),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
    )


def run(path, x: torch.Tensor) -> torch.Tensor:
    """The ONNX file's outputs on `x`, from ONNX Runtime on the CPU with one thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
