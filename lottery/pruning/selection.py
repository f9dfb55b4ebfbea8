"""Selection: the only code that turns scores into masks. Exact counts (round half up), only surviving entries ranked
(pitfall 3), ties to the lower flat index (a stable sort), layerwise or global, and a global prune never empties a
tensor (pitfall 6).

The survivors of all masked tensors are one sorted vector of flat indices (tensor order, then index: the order ties
are broken in), and the k lowest scores are found with one selection of the k-th value and comparisons, not a sort:
the same entries as the first k of a stable sort, at a fraction of its cost, and round after round (`Survivors`)
without rescanning the pruned entries."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from lottery.masks import Masks

Scores = dict[str, torch.Tensor]


def round_half_up(x: float) -> int:
    # Python's round() rounds half to even, which would make counts depend on parity.
    return int(math.floor(x + 0.5))  # noqa: RUF046 - x may be a tensor, whose floor is a tensor


def lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The `k` lowest of a 1-d tensor as a boolean mask: exactly the first k of a stable ascending sort (ties to the
    lower index, NaN above everything)."""
    n = scores.numel()
    if k <= 0 or k >= n:
        return torch.full((n,), k >= n and k > 0, dtype=torch.bool, device=scores.device)
    if scores.device.type == "cpu" and scores.dtype != torch.bfloat16:  # numpy's introselect: ~5x torch.kthvalue's
        v = np.partition(scores.detach().numpy(), k - 1)[k - 1].item()
    else:
        v = torch.kthvalue(scores, k).values.item()
    if math.isnan(v):  # NaNs among the k lowest: rare enough for the sort
        out = torch.zeros(n, dtype=torch.bool, device=scores.device)
        out[torch.sort(scores, stable=True).indices[:k]] = True
        return out
    out = scores <= v
    extra = int(out.sum()) - k
    if extra > 0:  # more entries equal the k-th value than are removed: the highest-index ones stay
        ties = (scores == v).nonzero().squeeze(1)
        out[ties[-extra:]] = False
    return out


class Survivors:
    """The surviving entries of `masks` as sorted flat indices; `remove_*` drop the lowest-scoring ones in place and
    return their flat indices, `masks()` gives the masks back (same names, shapes, dtypes and devices)."""

    def __init__(self, masks: Masks):
        self.like = masks
        self.sizes = [m.numel() for m in masks.values()]
        self.bounds = torch.tensor([0, *itertools.accumulate(self.sizes)])
        flat = [m.detach().reshape(-1) != 0 for m in masks.values()]
        self.index = torch.cat(flat).nonzero().squeeze(1) if flat else torch.zeros(0, dtype=torch.long)
        self.bounds = self.bounds.to(self.index.device)

    def counts(self) -> list[int]:
        """Survivors per tensor."""
        return torch.searchsorted(self.index, self.bounds).diff().tolist()

    def gather(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """The survivors' scores, in flat order."""
        flat = [scores[n].detach().reshape(-1).to(self.index.device) for n in self.like]
        return torch.cat(flat).index_select(0, self.index) if flat else torch.zeros(0, device=self.index.device)

    def _drop(self, drop: torch.Tensor) -> torch.Tensor:
        if self.index.device.type == "cpu":  # numpy's boolean indexing: ~3x torch's on one thread
            index, dropped = self.index.numpy(), drop.numpy()
            removed, self.index = torch.from_numpy(index[dropped]), torch.from_numpy(index[~dropped])
        else:
            removed, self.index = self.index[drop], self.index[~drop]
        return removed

    def remove_layerwise(self, scores: torch.Tensor, remove: list[int]) -> torch.Tensor:
        """Each tensor loses its `remove[i]` lowest-scoring survivors (`scores`: the survivors', in flat order)."""
        cuts = torch.searchsorted(self.index, self.bounds).tolist()
        drop = [lowest(scores[a:b], k) for a, b, k in zip(cuts, cuts[1:], remove)]
        return self._drop(torch.cat(drop) if drop else torch.zeros(0, dtype=torch.bool, device=self.index.device))

    def remove_global(
        self, scores: torch.Tensor, remove: int, criterion: str = "magnitude", unit: str = "weight"
    ) -> torch.Tensor:
        """The `remove` lowest-scoring survivors over all tensors; refuses to empty a whole tensor. `unit` names the
        entries in the message (channel pruning selects channels)."""
        return self.remove_where(lowest(scores, remove), criterion, unit)

    def remove_where(self, drop: torch.Tensor, criterion: str = "magnitude", unit: str = "weight") -> torch.Tensor:
        """The survivors where `drop` (boolean, survivors in flat order) is true; refuses to empty a whole tensor."""
        keep = (len(self.index) - int(drop.sum())) / int(self.bounds[-1])
        removed = self._drop(drop)
        empty = [n for n, c in zip(self.like, self.counts()) if c == 0]
        if empty:
            raise ValueError(
                f"global {criterion} pruning to {100 * keep:.3g}% of the {unit}s would remove every "
                f"{unit} of '{empty[0]}' (layer collapse); keep more {unit}s, exclude the layer "
                f"(pruning.exclude=[{empty[0]}]) or use pruning.scope=layerwise"
            )
        return removed

    def masks(self) -> Masks:
        flat = torch.zeros(int(self.bounds[-1]), dtype=torch.bool, device=self.index.device)
        flat[self.index] = True
        return {
            n: f.to(device=m.device, dtype=m.dtype, copy=True).view(m.shape)
            for (n, m), f in zip(self.like.items(), flat.split(self.sizes))
        }


def select_layerwise(scores: dict[str, torch.Tensor], masks: Masks, remove: dict[str, int]) -> Masks:
    """Each tensor loses its `remove[name]` lowest-scoring surviving entries."""
    left = Survivors(masks)
    left.remove_layerwise(left.gather(scores), [remove[n] for n in masks])
    return left.masks()


def select_global(scores: dict[str, torch.Tensor], masks: Masks, remove: int, criterion: str = "magnitude") -> Masks:
    """The `remove` lowest-scoring surviving entries over all tensors; refuses to empty a whole tensor."""
    left = Survivors(masks)
    left.remove_global(left.gather(scores), remove, criterion)
    return left.masks()
