"""Pruning strategies: new masks from old masks (and trained weights).

Counts are exact: a tensor pruned at rate r loses round_half_up(r x its surviving count) entries; a global prune
removes round_half_up(r x all surviving entries). Only surviving entries are ranked (pitfall 3), ties go to the lower
flat index (a stable sort), so the same weights always give the same masks.
"""
from __future__ import annotations

import fnmatch
import math

import torch

from lottery.masks import Masks, Prunable


def round_half_up(x: float) -> int:
    # Python's round() rounds half to even, which would make counts depend on parity.
    return int(math.floor(x + 0.5))


def layer_rates(prunable: list[Prunable], pcfg) -> dict[str, float]:
    """Per-tensor rate: `layer_rates` (name or glob, with or without '.weight') > `rates[kind]` > `rate`."""
    out = {}
    for p in prunable:
        rate = pcfg.rates.get(p.kind, pcfg.rate) if p.kind in ("linear", "conv", "output") else pcfg.rate
        for pattern, r in pcfg.layer_rates.items():
            if fnmatch.fnmatchcase(p.name, pattern) or fnmatch.fnmatchcase(p.name, f"{pattern}.weight"):
                rate = r
        out[p.name] = float(rate)
    return out


def _remove_smallest(mask: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    flat = mask.reshape(-1)
    alive = flat.nonzero().squeeze(1)
    order = torch.sort(scores.reshape(-1)[alive], stable=True).indices
    new = flat.clone()
    new[alive[order[:k]]] = 0
    return new.view_as(mask)


def magnitude_layerwise(weights: dict[str, torch.Tensor], masks: Masks, rates: dict[str, float]) -> Masks:
    out = {}
    for name, mask in masks.items():
        alive = int(mask.count_nonzero())
        out[name] = _remove_smallest(mask, weights[name].detach().abs() * mask, round_half_up(rates[name] * alive))
    return out


def magnitude_global(weights: dict[str, torch.Tensor], masks: Masks, rate: float) -> Masks:
    """One threshold over all masked tensors; refuses to empty a whole tensor (pitfall 6)."""
    names = list(masks)
    alive = [masks[n].reshape(-1).nonzero().squeeze(1) for n in names]
    scores = torch.cat([weights[n].detach().abs().reshape(-1)[a].float().cpu() for n, a in zip(names, alive)])
    owner = torch.cat([torch.full((len(a),), i) for i, a in enumerate(alive)])
    index = torch.cat([a.cpu() for a in alive])
    k = round_half_up(rate * len(scores))
    drop = torch.sort(scores, stable=True).indices[:k]
    out = {}
    for i, n in enumerate(names):
        flat = masks[n].reshape(-1).clone()
        flat[index[drop[owner[drop] == i]].to(flat.device)] = 0
        if not flat.any():
            raise ValueError(f"global pruning at rate {rate} would remove every weight of '{n}'; lower pruning.rate, "
                             f"exclude the layer (pruning.exclude=[{n}]) or use pruning.scope=layerwise")
        out[n] = flat.view_as(masks[n])
    return out


def random_like(masks: Masks, generator: torch.Generator) -> Masks:
    """Random masks with the same number of survivors in each tensor (the random-pruning control)."""
    out = {}
    for name, mask in masks.items():
        keep = int(mask.count_nonzero())
        flat = torch.zeros(mask.numel(), dtype=mask.dtype)
        flat[torch.randperm(mask.numel(), generator=generator)[:keep]] = 1
        out[name] = flat.view_as(mask).to(mask.device)
    return out


def shuffle(masks: Masks, generator: torch.Generator) -> Masks:
    """Each mask's entries permuted within its tensor (the shuffle control)."""
    out = {}
    for name, mask in masks.items():
        flat = mask.reshape(-1).cpu()
        out[name] = flat[torch.randperm(flat.numel(), generator=generator)].view_as(mask).to(mask.device)
    return out


def prune(weights: dict[str, torch.Tensor], masks: Masks, prunable: list[Prunable], pcfg,
          generator: torch.Generator | None = None, keep_fraction: float | None = None) -> Masks:
    """One pruning step. `keep_fraction` (one-shot) prunes straight to that fraction of each tensor (layerwise) or of
    all prunable weights (global) instead of applying the per-level rates."""
    if keep_fraction is not None:
        if pcfg.scope == "global":
            total = sum(m.numel() for m in masks.values())
            alive = sum(int(m.count_nonzero()) for m in masks.values())
            rate = 1 - round_half_up(keep_fraction * total) / alive
            rates = {n: rate for n in masks}
        else:
            rates = {n: 1 - round_half_up(keep_fraction * m.numel()) / int(m.count_nonzero())
                     for n, m in masks.items()}
    else:
        rates = layer_rates(prunable, pcfg)
        rate = pcfg.rate
    if pcfg.strategy == "random":
        if generator is None:
            raise ValueError("random pruning needs a seeded generator")
        # Random pruning as a strategy: remove the same counts as magnitude pruning, at random positions.
        random_scores = {n: torch.rand(m.shape, generator=generator).to(m.device) for n, m in masks.items()}
        if pcfg.scope == "global":
            return magnitude_global(random_scores, masks, rate)
        return magnitude_layerwise(random_scores, masks, rates)
    if pcfg.scope == "global":
        return magnitude_global(weights, masks, rate)
    return magnitude_layerwise(weights, masks, rates)


def plan_counts(masks: Masks, prunable: list[Prunable], pcfg) -> list[int]:
    """Remaining prunable weights at each level, computed from counts alone (no weights needed).

    Used to decide how many levels a `pruning.target` needs. Exact for layerwise pruning; for global pruning the
    total is exact too (only the split between tensors depends on the weights)."""
    rates = layer_rates(prunable, pcfg)
    alive = {n: int(m.count_nonzero()) for n, m in masks.items()}
    counts = [sum(alive.values())]
    for _ in range(10_000):
        if pcfg.scope == "global":
            total = counts[-1]
            counts.append(total - round_half_up(pcfg.rate * total))
        else:
            alive = {n: a - round_half_up(rates[n] * a) for n, a in alive.items()}
            counts.append(sum(alive.values()))
        if counts[-1] == counts[-2]:
            break
        if pcfg.target is not None and counts[-1] <= pcfg.target * counts[0]:
            break
    return counts
