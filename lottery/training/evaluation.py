"""Evaluation of a network on a whole split held on the device, and the lottery-ticket paper's early-stop step."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Evaluation feeds the model at most this many examples at once, on every device: a 10,000-example Conv-2 forward
# peaks at 7.5 GB of activations (about 8 GB on a GPU for Conv-2/4/6 and VGG on CIFAR-10) instead of 0.8 GB, and is
# no faster. Results do not depend on it: the loss is still summed per `train.eval_batch_size` batch, and chunked
# logits came out bit-identical to unchunked ones on the CPU for LeNet-300-100, Conv-2 and ResNet-20.
EVAL_CHUNK = 1000
# On a CPU, convolutional models go 100 at a time: a 1000-example chunk's activations (262 MB per Conv-2 layer) are
# fresh page-faulted memory on every forward, 100-example ones are reused from the heap. Measured (2026-11-29, 2-core
# CPU, 2 threads, examples/s at 1000 -> 100): Conv-2 512 -> 1,116, Conv-6 240 -> 378, VGG-11 257 -> 374, ResNet-20
# 643 -> 1,050, with bit-identical losses and accuracies; LeNet-300-100 would slow down (139k -> 94k), so MLPs keep
# 1000.
CPU_CONV_EVAL_CHUNK = 100


def conv_on_cpu(model: nn.Module, device) -> bool:
    """A convolutional model on a CPU: its activations outgrow the caches, which decides the evaluation chunk here and
    the replicas layout (lottery.training.layouts.choose)."""
    return torch.device(device).type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def eval_chunk(model: nn.Module, device) -> int:
    """Examples per forward in evaluation (EVAL_CHUNK, CPU_CONV_EVAL_CHUNK)."""
    return CPU_CONV_EVAL_CHUNK if conv_on_cpu(model, device) else EVAL_CHUNK


def batch_sums(out: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The evaluation metrics of a batch, summed over its examples: logits `out` [B, K] and labels `y` [B] give
    scalars; [B, U, K] and [B, U] (U stacked networks) give one sum per network. Each metric becomes `val_<name>` and
    `test_<name>` in every evaluation record, the final and `early_stop_` values in the unit's record, a column of
    the report and a W&B metric: a new metric is one entry here (its mean over a split is the sum / examples)."""
    if out.dim() == 2:
        return {"loss": F.cross_entropy(out, y, reduction="sum"), "accuracy": (out.argmax(1) == y).sum()}
    return {
        "loss": F.cross_entropy(out.flatten(0, 1), y.reshape(-1), reduction="none").view(y.shape).sum(0),
        "accuracy": (out.argmax(2) == y).sum(0),
    }


def metric_names() -> list[str]:
    return list(batch_sums(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)))


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, precision: str = "fp32") -> dict:
    """{metric: mean over the split} (`batch_sums`), for a whole split held on the device; one host sync per call.
    An empty split gives None for every metric."""
    if len(x) == 0:
        return dict.fromkeys(metric_names())
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    # Each batch goes through the model in chunks (eval_chunk; a small trailing chunk may differ in the last bit).
    chunk = min(batch_size, eval_chunk(model, x.device))
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size]
            out = (
                model(xb)
                if len(xb) <= chunk
                else torch.cat([model(xb[j : j + chunk]) for j in range(0, len(xb), chunk)])
            )
            for k, v in batch_sums(out.float(), y[i : i + batch_size]).items():
                sums[k] = sums[k] + v if k in sums else v
    model.train(was_training)
    values = torch.stack([v.to(torch.float32) for v in sums.values()]).tolist()
    return {k: v / len(x) for k, v in zip(sums, values)}


def early_stop(evals: list[dict]) -> dict:
    """The lottery-ticket paper's early-stop iteration: the evaluation with minimum validation loss (the earliest of
    equals), and every metric there (`early_stop_<key>`). Without a validation split every value is None."""
    keys = [k for k in (evals[0] if evals else {}) if k.startswith(("val_", "test_"))]
    scored = [e for e in evals if e.get("val_loss") is not None]
    if not scored:
        return {"early_stop_step": None, **{f"early_stop_{k}": None for k in keys}}
    best = min(scored, key=lambda e: e["val_loss"])
    return {"early_stop_step": best["step"], **{f"early_stop_{k}": best[k] for k in keys}}
