"""Mask transforms for the controls: random masks with the same per-tensor counts, and masks permuted within their
tensor."""

from __future__ import annotations

import torch

from lottery.masks import Masks


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
