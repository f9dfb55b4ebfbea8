"""Dynamic sparse training: the masks change during training, the number of weights per layer does not.

Every `delta_t` steps until `end` (a fraction of the training length) each layer of each network drops the fraction
`alpha` (annealed by `decay`) of its active weights with the smallest magnitude and grows as many among its inactive
weights: at random (`set`, Mocanu et al. 2018) or those with the largest magnitude of the dense gradient of the
current batch's loss (`rigl`, Evci et al. 2020). Grown weights start at zero with their optimizer state (momentum,
Adam's moments) reset to zero; a weight dropped and grown back in the same update keeps its value and state (it never
left). Registered rules live in `DST`; a user's own grow rule is one `@register_dst` function.

Following the authors' code (github google-research/rigl, rigl/sparse_optimizers_base.py):
- drop fraction: `alpha / 2 * (1 + cos(pi * t / T_end))` for `decay=cosine` (their `drop_fraction_anneal='cosine'`,
  TF's cosine_decay of the step t), `alpha` for `constant`; the count is floor(active * fraction) per layer;
- SET updates the masks after the optimizer step of an update step; RigL computes the gradient of the update step's
  batch and updates the masks instead of taking an optimizer step (their `cond_mask_update_op(global_step,
  apply_gradient_op)`), so an update step costs RigL a dense gradient and no weight update;
- RigL's gradient is the dense one: pruned weights are exactly zero here but are ordinary parameters, so backward
  gives every entry its gradient (their `compute_gradients(loss, var_list=masked_weights)`);
- grown weights are initialized to zero (`grow_init='zeros'`), their optimizer slots to zero (`reset_momentum` with
  `initial_acc_scale=0`); a regrown weight keeps its value (`reinit_when_same=False`).
Where this differs: ties are broken by the lower flat index instead of their N(0, 1e-5) noise on the drop scores (the
same choice wherever the magnitudes differ, and reproducible), SET's random scores come from a generator seeded per
network and step, and the first update is at step `delta_t` (not at step 0, where nothing has been trained yet).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from lottery.core.registry import Registry, check_settings, plain
from lottery.core.seeds import derive_seed

DECAYS = ("cosine", "constant")


@dataclass
class DstSettings:
    delta_t: int = 100  # steps between mask updates (RigL: 100)
    end: float = 0.75  # updates stop at this fraction of the training length (RigL: 0.75)
    alpha: float = 0.3  # fraction of each layer's active weights dropped (and grown) at the first update (RigL: 0.3)
    decay: str = "cosine"  # how the fraction falls to 0 at `end`: cosine | constant

    def __post_init__(self):
        if self.delta_t < 1:
            raise ValueError(f"dst.delta_t must be >= 1, got {self.delta_t}")
        if not 0 < self.end <= 1:
            raise ValueError(f"dst.end is a fraction of the training length in (0, 1], got {self.end}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"dst.alpha must be in [0, 1], got {self.alpha}")
        if self.decay not in DECAYS:
            raise ValueError(f"unknown dst.decay '{self.decay}'; accepted: {', '.join(DECAYS)}")


@dataclass(frozen=True)
class Rule:
    name: str
    grow: Callable  # grow(weight, grad, generator) -> scores; the highest inactive ones are grown
    gradient_step: bool  # True: an update step computes the gradient and updates masks instead of weights (RigL)
    settings: type = DstSettings


DST = Registry("dst rule")


def register_dst(name: str, *, gradient_step: bool = False, settings: type = DstSettings):
    """`@register_dst("mine")` on grow(weight, grad, generator) -> scores (same shape): the inactive weights with the
    highest scores grow. `gradient_step=True` takes RigL's order (the update step's gradient, no weight update)."""
    def decorator(fn):
        DST.add(name, Rule(name, fn, gradient_step, settings))
        return fn
    return decorator


@register_dst("set")
def grow_random(weight: torch.Tensor, grad: Optional[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    return torch.rand(weight.shape, generator=generator).to(weight.device)


@register_dst("rigl", gradient_step=True)
def grow_gradient(weight: torch.Tensor, grad: Optional[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    return torch.zeros_like(weight) if grad is None else grad.abs()


def dst_settings(node) -> tuple[Optional[Rule], dict]:
    """(the rule, its settings) of a `dst` config node; (None, {}) for `name: none`."""
    raw = plain(node)
    name = raw.pop("name", "none")
    if name in (None, "none"):
        check_settings(raw, DstSettings, "dst")  # checked as for any rule, then not used (a sweep over dst= keeps them)
        return None, {}
    rule = DST.lookup(name, extra=", none")
    return rule, check_settings(raw, rule.settings, "dst", of=f"dst rule '{name}'")


def drop_fraction(settings: dict, step: int, end_step: int) -> float:
    if settings["decay"] == "constant":
        return settings["alpha"]
    return settings["alpha"] / 2 * (1 + math.cos(math.pi * min(step, end_step) / end_step))


def lowest_first(scores: torch.Tensor) -> torch.Tensor:
    """Indices of a flat tensor by ascending score, ties to the lower index."""
    return torch.sort(scores, stable=True).indices


class Updater:
    """The mask updates of one training call. `entries`: per masked tensor of the layout, its parameter, its mask
    (edited in place), and the networks it holds as (network, index into the tensor's first dimension or None)."""

    def __init__(self, rule: Rule, settings: dict, total_steps: int, entries: list, seeds: list[int]):
        self.rule, self.settings = rule, settings
        self.end_step = max(1, int(settings["end"] * total_steps))
        self.entries, self.seeds = entries, seeds

    def due(self, step: int) -> bool:
        """Whether the step numbered `step` (1-based: after `step` optimizer steps) updates the masks."""
        return step % self.settings["delta_t"] == 0 and step <= self.end_step

    @torch.no_grad()
    def update(self, step: int, optimizer: torch.optim.Optimizer, active: list[bool]) -> list[int]:
        """Drop and grow in every layer of every active network; returns the indices of the masks changed."""
        fraction = drop_fraction(self.settings, step, self.end_step)
        changed = []
        for i, (param, mask, slices) in enumerate(self.entries):
            state = optimizer.state.get(param, {})
            for u, idx in slices:
                if not active[u]:
                    continue
                view = (lambda t: t) if idx is None else (lambda t, idx=idx: t[idx])
                w, m = view(param.data), view(mask)
                g = None if param.grad is None else view(param.grad)
                gen = torch.Generator().manual_seed(derive_seed(self.seeds[u], "dst", step, i))
                if self._update_one(w, m, g, gen, fraction,
                                    [view(v) for v in state.values() if torch.is_tensor(v) and v.shape == param.shape]):
                    changed.append(i)
        return sorted(set(changed))

    def _update_one(self, w, m, g, gen, fraction: float, states: list) -> bool:
        flat_m = m.reshape(-1)
        keep = flat_m != 0
        n_active = int(keep.sum())
        n = int(n_active * fraction)
        if n == 0 or n_active == keep.numel():
            return False
        active_idx = keep.nonzero().squeeze(1)
        drop = active_idx[lowest_first(w.reshape(-1)[active_idx].abs().float())[:n]]
        after_drop = keep.clone()
        after_drop[drop] = False
        candidates = (~after_drop).nonzero().squeeze(1)
        scores = self.rule.grow(w, g, gen).reshape(-1)[candidates].float()
        grow = candidates[lowest_first(-scores)[:n]]
        new = after_drop.clone()
        new[grow] = True
        fresh = grow[~keep[grow]]  # grown and not just dropped: new connections start at zero with no history
        w.reshape(-1)[fresh] = 0
        for s in states:
            s.reshape(-1)[fresh] = 0
        flat_m.copy_(new.to(flat_m.dtype))
        return True
