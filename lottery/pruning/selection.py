"""Selection: the only code that turns scores into masks. Exact counts (round half up), only surviving entries ranked
(pitfall 3), ties to the lower flat index (a stable sort), layerwise or global, and a global prune never empties a
tensor (pitfall 6)."""
from __future__ import annotations

import math

import torch

from lottery.masks import Masks

Scores = dict[str, torch.Tensor]


def round_half_up(x: float) -> int:
    # Python's round() rounds half to even, which would make counts depend on parity.
    return int(math.floor(x + 0.5))


def _remove_lowest(mask: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    flat = mask.reshape(-1)
    alive = flat.nonzero().squeeze(1)
    order = torch.sort(scores.reshape(-1)[alive], stable=True).indices
    new = flat.clone()
    new[alive[order[:k]]] = 0
    return new.view_as(mask)


def select_layerwise(scores: Scores, masks: Masks, remove: dict[str, int]) -> Masks:
    """Each tensor loses its `remove[name]` lowest-scoring surviving entries."""
    return {n: _remove_lowest(m, scores[n].detach(), remove[n]) for n, m in masks.items()}


def select_global(scores: Scores, masks: Masks, remove: int, criterion: str = "magnitude") -> Masks:
    """The `remove` lowest-scoring surviving entries over all tensors; refuses to empty a whole tensor."""
    names = list(masks)
    alive = [masks[n].reshape(-1).nonzero().squeeze(1) for n in names]
    # float64: SynFlow's scores can be far below float32's range; float32 scores convert exactly, order unchanged
    flat_scores = torch.cat([scores[n].detach().reshape(-1)[a].double().cpu() for n, a in zip(names, alive)])
    owner = torch.cat([torch.full((len(a),), i) for i, a in enumerate(alive)])
    index = torch.cat([a.cpu() for a in alive])
    drop = torch.sort(flat_scores, stable=True).indices[:remove]
    out = {}
    for i, n in enumerate(names):
        flat = masks[n].reshape(-1).clone()
        flat[index[drop[owner[drop] == i]].to(flat.device)] = 0
        if not flat.any():
            total = sum(m.numel() for m in masks.values())
            keep = (len(flat_scores) - remove) / total
            raise ValueError(f"global {criterion} pruning to {100 * keep:.3g}% of the weights would remove every "
                             f"weight of '{n}' (layer collapse); keep more weights, exclude the layer "
                             f"(pruning.exclude=[{n}]) or use pruning.scope=layerwise")
        out[n] = flat.view_as(masks[n])
    return out
