"""Masks: which tensors are prunable, and the one place where masks touch weights.

A mask is a plain tensor beside its parameter (same shape, 1 = kept, 0 = pruned), kept in a dict keyed by parameter
name. Parameters stay ordinary `nn.Parameter`s: no hooks or parametrizations, so `deepcopy`, `torch.compile` and
`torch.func` see exactly what runs (pitfall 8). Pruned weights are zeroed after every optimizer step by `apply`, which
makes them exactly zero whatever the optimizer's momentum or weight decay does to them (pitfall 2).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from lottery.core.spans import MASK, span

Masks = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Prunable:
    name: str  # parameter name, e.g. "hidden.0.weight"
    kind: str  # "linear", "conv", "output", "bias" or "batchnorm": selects the per-kind pruning rate


def prunable_tensors(model: nn.Module, pcfg) -> list[Prunable]:
    """The prunable parameters, in `named_parameters` order.

    Default policy: weights of Linear and Conv layers. Biases and BatchNorm parameters only when asked
    (`pruning.prune_biases`, `pruning.prune_batchnorm`). `pruning.exclude` holds glob patterns over parameter names.
    The output layer (the last Linear) gets its own kind so it can be pruned at its own rate, as in the paper.
    With `pruning.granularity=channel` only the hidden layers' weights are prunable: the output layer keeps every
    output neuron (removing one would delete a class), and biases and BatchNorm parameters are not scored on their
    own but follow their channel (`channel_companions`).
    """
    channel = getattr(pcfg, "granularity", "unstructured") == "channel"
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    output = linears[-1] if linears else None
    kinds: dict[str, str] = {}
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            kind = "output" if mod is output else ("linear" if isinstance(mod, nn.Linear) else "conv")
            if not (channel and kind == "output"):
                kinds[prefix + "weight"] = kind
            if mod.bias is not None and pcfg.prune_biases and not channel:
                kinds[prefix + "bias"] = "bias"
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm) and pcfg.prune_batchnorm and mod.affine and not channel:
            kinds[prefix + "weight"] = "batchnorm"
            kinds[prefix + "bias"] = "batchnorm"
    excluded = list(pcfg.exclude)
    return [
        Prunable(name, kinds[name])
        for name, _ in model.named_parameters()
        if name in kinds and not any(fnmatch.fnmatchcase(name, pat) for pat in excluded)
    ]


def channel_companions(model: nn.Module) -> dict[str, list[str]]:
    """{weight name: the 1-d parameters that belong to its output channels}: the layer's bias and the affine scale and
    shift of the BatchNorm that normalizes its output. A removed channel must take them along: with its filter zero
    but its bias or BatchNorm shift kept, the channel would still output a constant (and BatchNorm of a zero channel
    is -mean/std * scale + shift). The BatchNorm of a layer is the next one in `named_modules` order, before any
    other Linear or Conv, with as many features as the layer has output channels (the models register each
    BatchNorm right after its convolution; lottery/models/registry.py)."""
    out: dict[str, list[str]] = {}
    last: str | None = None  # the weight of the last Linear/Conv seen that has no BatchNorm yet
    channels = 0
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            last = prefix + "weight"
            channels = mod.weight.shape[0]
            out[last] = [prefix + "bias"] if mod.bias is not None else []
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if last is not None and mod.affine and mod.num_features == channels:
                out[last] += [prefix + "weight", prefix + "bias"]
            last = None
    return out


def counted(masks: Masks, model: nn.Module, pcfg) -> Masks:
    """The masks whose entries count as weights (remaining counts, densities): with pruning.granularity=channel the
    companions' masks (biases, BatchNorm entries of removed channels) are left out, so counts stay those of the
    weights the schedule selected; otherwise `masks` itself."""
    if getattr(pcfg, "granularity", "unstructured") != "channel":
        return masks
    names = {p.name for p in prunable_tensors(model, pcfg)}
    return {n: m for n, m in masks.items() if n in names}


def ones(model: nn.Module, prunable: list[Prunable]) -> Masks:
    params = dict(model.named_parameters())
    return {p.name: torch.ones_like(params[p.name]) for p in prunable}


def apply(model: nn.Module, masks: Masks) -> None:
    """Zero the pruned entries in place. Called after every optimizer step and after every weight load."""
    Masker(model, masks)()


# integer type of each float type's width, to reinterpret weights as bits
_BITS = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


class Masker:
    """`apply` for the training loop: the parameter and mask lists are built once, not per step.

    Pruned entries are overwritten with zero rather than multiplied by it: a diverging run's inf or NaN times 0 is
    NaN, and a pruned weight must be exactly zero whatever happens to the others."""

    def __init__(self, model: nn.Module, masks: Masks):
        params = dict(model.named_parameters())
        self.names = list(masks)
        self.params = [params[n] for n in masks]
        self.masks = [masks[n] for n in masks]  # the caller's tensors: a mask update (lottery.training.dst) edits them
        self.keep_bits = [self._bits(p, m) for p, m in zip(self.params, self.masks)]

    @staticmethod
    def _bits(param: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Overwriting as a bitwise AND of the weight's bits with all-ones (kept) or all-zeros (pruned): the same bits
        # as masked_fill_(pruned, 0), NaN-safe too, but vectorized (a random boolean mask makes masked_fill_ ~10x
        # slower on CPU, ~0.5 ms per LeNet-300-100 step on 2 cores).
        return (mask.to(device=param.device) != 0).to(_BITS[param.dtype]).neg_()  # True -> -1: all bits set

    def refresh(self, i: int) -> None:
        """Mask `i` was changed in place (a mask update during training): use it from now on."""
        self.keep_bits[i] = self._bits(self.params[i], self.masks[i])

    def __call__(self) -> None:
        with torch.no_grad(), span(MASK):
            for p, keep in zip(self.params, self.keep_bits):
                p.view(keep.dtype).bitwise_and_(keep)


def count(masks: Masks) -> tuple[int, int]:
    """(remaining, total) over the masked tensors; exact integers."""
    remaining = sum(int(m.count_nonzero()) for m in masks.values())
    return remaining, sum(m.numel() for m in masks.values())


def overlap(a: Masks, b: Masks) -> dict[str, float]:
    """Per tensor, the fraction of kept weights two masks share, |a and b| / ((|a| + |b|) / 2), and the same over all
    tensors under `"all"` (1: the same weights; two independent random masks at density d share d in expectation)."""
    out, shared, kept = {}, 0, 0
    for n in a:
        x, y = a[n] != 0, b[n].to(a[n].device) != 0
        s, k = int((x & y).sum()), int(x.sum()) + int(y.sum())
        out[n] = 2 * s / k if k else 1.0
        shared, kept = shared + s, kept + k
    out["all"] = 2 * shared / kept if kept else 1.0
    return out


def density(masks: Masks) -> dict[str, float]:
    return {n: int(m.count_nonzero()) / m.numel() for n, m in masks.items()}


def params_remaining(model: nn.Module, masks: Masks) -> float:
    """Fraction of ALL parameters remaining (unprunable ones count as kept). Buffers are not parameters."""
    total = sum(p.numel() for p in model.parameters())
    pruned = sum(m.numel() - int(m.count_nonzero()) for m in masks.values())
    return (total - pruned) / total


def to_bool(masks: Masks) -> dict[str, torch.Tensor]:
    """Compact, device-independent form for files."""
    return {n: m.detach().to("cpu", torch.bool) for n, m in masks.items()}


def from_bool(masks: dict[str, torch.Tensor], model: nn.Module) -> Masks:
    params = dict(model.named_parameters())
    missing = sorted(set(masks) - set(params))
    if missing:
        raise KeyError(f"masks name parameters the model does not have: {missing[:5]}")
    return {n: m.to(device=params[n].device, dtype=params[n].dtype) for n, m in masks.items()}
