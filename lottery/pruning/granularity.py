"""Granularity: a view on scores and masks. `pruning.granularity` groups the weights of each masked tensor, the
schedule selects whole groups with the shared selection (exact counts, survivors only, stable ties, layerwise, global
or a distribution), and the groups expand back to per-weight masks, so training, tickets, resume, replicas and the
cost count see ordinary masks.

- `unstructured`: every weight its own group (the selection code as it always was; nothing here runs).
- `channel`: a group is an output channel (a convolution's filter, a linear layer's output neuron: dimension 0 of the
  weight). Its score is the sum of its weights' scores (`pruning.group_score=sum`), or their L1 or L2 norm, or the
  magnitude of the scale of the BatchNorm that normalizes it (`bn`: network slimming, Liu et al. 2017, the channel
  score of You et al.'s early-bird tickets; every channel-pruned layer needs a BatchNorm). Counts are
  channels: layerwise pruning keeps round(rate x channels) of each layer, `pruning.target` is the fraction of
  channels kept. The bias and BatchNorm scale and shift of a removed channel get masks too (lottery.masks
  `channel_companions`): they are entries of the same masks dict, so the one masking place (lottery.masks.Masker)
  keeps them exactly zero during training, whatever the optimizer does. The output layer is never channel-pruned
  (lottery.masks.prunable_tensors leaves it out: an output neuron is a class).
- `nm`: in every block of `pruning.m` consecutive weights along the input dimension (dimension 1; for a convolution
  along the input channels at each kernel position, as sparse tensor cores contract them) exactly `pruning.n` are kept,
  the highest-scoring (ties: the higher index stays, as in `selection.lowest`). The density is n/m by construction, so
  it is a one-shot target, not an IMP schedule.

Companion masks are derived, never scored or counted by the schedule: `weights_only` drops them before selection and
`expand` adds them back.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lottery.masks import Masks, channel_companions

GRANULARITIES = ("unstructured", "channel", "nm")
GROUP_SCORES = ("sum", "l1", "l2", "bn")


def kind(pcfg) -> str:
    return getattr(pcfg, "granularity", None) or "unstructured"


def nm_of(pcfg) -> tuple[int, int]:
    return int(pcfg.n), int(pcfg.m)


def weights_only(masks: Masks, names) -> Masks:
    """The masks of the scored tensors `names` (the prunable weights), without derived companion masks."""
    names = set(names)
    return {n: m for n, m in masks.items() if n in names}


# --- channel ---------------------------------------------------------------------------------------------------------


def channel_masks(masks: Masks) -> Masks:
    """One entry per output channel: 1 where any weight of the channel survives (a channel mask has whole rows)."""
    return {n: (m.detach().reshape(m.shape[0], -1) != 0).any(dim=1).to(m.dtype) for n, m in masks.items()}


def batchnorm_scales(model: nn.Module) -> dict[str, str]:
    """{weight name: the name of the scale (weight) of the BatchNorm that normalizes its output channels} for the
    layers that have one (lottery.masks.channel_companions finds it by structure)."""
    scales = {
        f"{name}.weight"
        for name, mod in model.named_modules()
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.affine
    }
    return {w: c for w, comps in channel_companions(model).items() for c in comps if c in scales}


def check_batchnorm(model: nn.Module, names, model_name: str) -> None:
    """pruning.group_score=bn scores a channel by its BatchNorm scale: one line naming the first channel-pruned
    tensor without a BatchNorm."""
    have = batchnorm_scales(model)
    for n in names:
        if n not in have:
            raise ValueError(
                f"pruning.group_score=bn scores a channel by the scale of the BatchNorm after it, but "
                f"'{n}' of model '{model_name}' has no BatchNorm; exclude it (pruning.exclude=[{n}]) or "
                f"use another pruning.group_score ({', '.join(s for s in GROUP_SCORES if s != 'bn')})"
            )


def channel_scores(
    scores: Mapping[str, torch.Tensor], names, how: str = "sum", bn: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Per output channel: the sum of its weights' scores, or their L1 / L2 norm; for `bn`, the magnitude of the
    BatchNorm scale of the channel (`bn`: {weight name: that scale tensor})."""
    if how not in GROUP_SCORES:
        raise ValueError(f"unknown pruning.group_score '{how}'; accepted: {', '.join(GROUP_SCORES)}")
    if how == "bn":
        assert bn is not None, "group_score=bn needs the BatchNorm scales"
        return {n: bn[n].detach().abs() for n in names}
    out = {}
    for n in names:
        s = scores[n].detach().reshape(scores[n].shape[0], -1)
        out[n] = s.sum(dim=1) if how == "sum" else s.abs().sum(dim=1) if how == "l1" else s.pow(2).sum(dim=1).sqrt()
    return out


def channel_size(mask: torch.Tensor) -> int:
    return mask[0].numel() if mask.shape[0] else 0


def expand(groups: Masks, like: Masks, companions: Mapping[str, list[str]]) -> Masks:
    """Per-weight masks from channel masks (`like`: the weight masks, for shapes, dtypes and devices), plus a mask for
    every companion (bias, BatchNorm scale and shift) of each channel-pruned tensor."""
    out: Masks = {}
    for n, m in like.items():
        g = groups[n].to(device=m.device, dtype=m.dtype)
        out[n] = g.view(-1, *([1] * (m.dim() - 1))).expand_as(m).clone()
    for n in like:
        for c in companions.get(n, []):
            out[c] = groups[n].to(device=like[n].device, dtype=like[n].dtype).clone()
    return out


def with_companions(masks: Masks, names, companions: Mapping[str, list[str]]) -> Masks:
    """Weight masks whose channels are whole (a channel ticket, a control's random channels) with their companions."""
    weights = weights_only(masks, names)
    return expand(channel_masks(weights), weights, companions)


# --- N:M -------------------------------------------------------------------------------------------------------------


def _blocks(t: torch.Tensor, m: int) -> torch.Tensor:
    """View of `t` as (..., blocks, m) with blocks of m consecutive entries along the input dimension (dim 1): a
    convolution's weight (out, in, *kernel) is permuted to (out, *kernel, in) first."""
    if t.dim() > 2:
        t = t.movedim(1, -1)
    return t.reshape(*t.shape[:-1], t.shape[-1] // m, m)


def _unblocks(b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dim() > 2:
        shape = (like.shape[0], *like.shape[2:], like.shape[1])
        return b.reshape(shape).movedim(-1, 1).contiguous()
    return b.reshape(like.shape).contiguous()


def check_nm(shapes: Mapping[str, tuple], n: int, m: int) -> None:
    """Every tensor must have an input dimension that m divides; one line naming the first that does not."""
    for name, shape in shapes.items():
        if len(shape) < 2 or shape[1] % m:
            raise ValueError(
                f"pruning.granularity=nm needs the input dimension of every pruned tensor to be a "
                f"multiple of pruning.m={m}, but '{name}' has shape {list(shape)}; exclude it "
                f"(pruning.exclude=[{name}]) or choose another m"
            )


def nm_select(scores: torch.Tensor, mask: torch.Tensor, keep: int, m: int) -> torch.Tensor:
    """A mask keeping, in every block of m along the input dimension, the `keep` highest-scoring survivors (a block
    with fewer survivors keeps them all). Ties: the lower index goes first, as in the shared selection."""
    s = _blocks(scores.detach().to(torch.float64), m).clone()
    alive = _blocks(mask.detach() != 0, m)
    s[~alive] = float("-inf")  # pruned entries are never ranked above a survivor (survivors only)
    order = torch.sort(s, dim=-1, stable=True).indices  # ascending; NaN last (above everything), as `lowest`
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(m, device=order.device).expand_as(order))
    kept = (rank >= m - keep) & alive
    return _unblocks(kept, mask).to(dtype=mask.dtype, device=mask.device)


def nm_random(mask: torch.Tensor, n: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """n random positions in every block of m (the random-pruning and shuffle controls of an N:M ticket)."""
    scores = torch.rand(mask.shape, generator=generator)
    return nm_select(scores, torch.ones_like(mask, device="cpu"), n, m).to(mask.device)


def nm_counts_ok(mask: torch.Tensor, n: int, m: int) -> bool:
    """Whether every block of m holds exactly n non-zeros."""
    return bool(((_blocks(mask != 0, m)).sum(dim=-1) == n).all())


def random_channels(masks: Masks, names, companions, generator: torch.Generator, *, permute: bool) -> Masks:
    """Whole channels at random, the same number per layer as `masks` (random pruning), or the channel mask permuted
    within its layer (shuffle); companions follow."""
    weights = weights_only(masks, names)
    groups = channel_masks(weights)
    out = {}
    for n, g in groups.items():
        flat = g.cpu()
        if permute:
            out[n] = flat[torch.randperm(flat.numel(), generator=generator)].to(g.device)
        else:
            new = torch.zeros_like(flat)
            new[torch.randperm(flat.numel(), generator=generator)[: int(flat.count_nonzero())]] = 1
            out[n] = new.to(g.device)
    return expand(out, weights, companions)


def random_nm(masks: Masks, names, n: int, m: int, generator: torch.Generator) -> Masks:
    weights = weights_only(masks, names)
    return {k: nm_random(v, n, m, generator) for k, v in weights.items()}


def describe(pcfg) -> str | None:
    """'channel' / '2:4' for records and logs; None for unstructured."""
    k = kind(pcfg)
    return None if k == "unstructured" else ("channel" if k == "channel" else f"{pcfg.n}:{pcfg.m}")
