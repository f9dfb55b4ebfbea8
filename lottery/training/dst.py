"""Dynamic sparse training: the masks change during training, the number of weights per layer does not.

Every `delta_t` steps until `end` (a fraction of the training length) each layer of each network drops the fraction
`alpha` (annealed by `decay`) of its active weights with the smallest magnitude and grows as many among its inactive
weights: at random (`set`, Mocanu et al. 2018) or those with the largest magnitude of the dense gradient of the
current batch's loss (`rigl`, Evci et al. 2020). Grown weights start at zero with their optimizer state (momentum,
Adam's moments) reset to zero; a weight dropped and grown back in the same update keeps its value and state (it never
left). Both are mask updaters (lottery.training.updaters): `DropGrow` drops and grows, SET and RigL only say how they
score the weights to grow (and RigL takes the update step's gradient instead of an optimizer step); a user's own
grow rule is one `@register_dst` function, a method of another shape a `MaskUpdater`.

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

import torch

from lottery.core.ranges import at_least, between, one_of, setting
from lottery.core.registry import check_settings, plain
from lottery.core.seeds import derive_seed
from lottery.training.updaters import UPDATERS, MaskUpdater, register_updater, updater_settings

DECAYS = ("cosine", "constant")


@dataclass
class DstSettings:
    delta_t: int = setting(100, at_least(1))  # steps between mask updates (RigL: 100)
    end: float = setting(0.75, between(0, 1, lo_open=True))  # updates stop at this fraction of training (RigL: 0.75)
    # fraction of each layer's active weights dropped (and grown) at the first update (RigL: 0.3)
    alpha: float = setting(0.3, between(0, 1))
    decay: str = setting("cosine", one_of(*DECAYS))  # how the fraction falls to 0 at `end`: cosine | constant


def drop_fraction(settings: dict, step: int, end_step: int) -> float:
    if settings["decay"] == "constant":
        return settings["alpha"]
    return settings["alpha"] / 2 * (1 + math.cos(math.pi * min(step, end_step) / end_step))


def lowest_first(scores: torch.Tensor) -> torch.Tensor:
    """Indices of a flat tensor by ascending score, ties to the lower index."""
    return torch.sort(scores, stable=True).indices


class DropGrow(MaskUpdater):
    """Every `delta_t` steps until `end`, drop the active weights of smallest magnitude and grow as many of the
    highest `grow` scores. `gradient_step`: the update step's gradient grows connections and no optimizer step is
    taken (RigL); otherwise the masks change after the optimizer step (SET)."""

    Settings = DstSettings
    gradient_step = False

    def grow(self, weight: torch.Tensor, grad: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        """Scores (the weight's shape): the inactive weights with the highest grow."""
        raise NotImplementedError

    @classmethod
    def check_fit(cls, settings: dict, total_steps: int) -> None:
        end_step = max(1, int(settings["end"] * total_steps))
        if settings["delta_t"] > end_step:
            raise ValueError(
                f"dst.delta_t={settings['delta_t']} is longer than the part of training with mask updates "
                f"(dst.end={settings['end']} x {total_steps} steps = {end_step} steps), so no mask would "
                f"ever change; accepted: dst.delta_t <= {end_step} (or a longer train.duration)"
            )

    def __init__(self, settings: dict, ctx):
        super().__init__(settings, ctx)
        self.end_step = max(1, int(settings["end"] * ctx.total_steps))

    def due(self, step: int) -> bool:
        """Whether the step numbered `step` (1-based: after `step` optimizer steps) updates the masks."""
        return step % self.settings["delta_t"] == 0 and step <= self.end_step

    def after_backward(self, step, optimizer, active):
        if not (self.gradient_step and self.due(step)):
            return [], False
        changed = self.update(step, optimizer, active)
        for u in range(self.n):
            if active[u]:
                self.gradient_steps[u].append(step)
        return changed, True

    def after_step(self, step, optimizer, active):
        if not self.due(step):
            return []
        changed = [] if self.gradient_step else self.update(step, optimizer, active)
        for u in range(self.n):
            if active[u]:
                self.record(u, step)
        return changed

    @torch.no_grad()
    def update(self, step: int, optimizer: torch.optim.Optimizer, active: list[bool]) -> list[int]:
        """Drop and grow in every layer of every active network; returns the indices of the masks changed."""
        fraction = drop_fraction(self.settings, step, self.end_step)
        changed = []
        for u, layers in enumerate(self.ctx.layers):
            if not active[u]:
                continue
            for layer in layers:
                # seeded by the tensor's position in its network, not in the layout: a replicate draws what its
                # single run draws (single runs and stacked layouts: the same number)
                gen = torch.Generator().manual_seed(derive_seed(self.ctx.seeds[u], "dst", step, layer.index))
                if self._update_one(
                    layer.weight, layer.mask, layer.grad, gen, fraction, layer.optimizer_slots(optimizer)
                ):
                    changed.append(layer.entry)
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
        scores = self.grow(w, g, gen).reshape(-1)[candidates].float()
        grow = candidates[lowest_first(-scores)[:n]]
        new = after_drop.clone()
        new[grow] = True
        fresh = grow[~keep[grow]]  # grown and not just dropped: new connections start at zero with no history
        w.reshape(-1)[fresh] = 0
        for s in states:
            s.reshape(-1)[fresh] = 0
        flat_m.copy_(new.to(flat_m.dtype))
        return True


def register_dst(name: str, *, gradient_step: bool = False, settings: type = DstSettings):
    """`@register_dst("mine")` on grow(weight, grad, generator) -> scores (same shape): a drop-and-grow updater
    whose inactive weights with the highest scores grow. `gradient_step=True` takes RigL's order (the update step's
    gradient, no weight update)."""

    def decorator(fn):
        cls = type(
            f"DropGrow_{name}",
            (DropGrow,),
            {"Settings": settings, "gradient_step": gradient_step, "grow": lambda self, w, g, gen: fn(w, g, gen)},
        )
        register_updater(name)(cls)
        return fn

    return decorator


@register_updater("set")
class SET(DropGrow):
    """Grows at random among the inactive weights (Mocanu et al. 2018)."""

    def grow(self, weight, grad, generator):
        return torch.rand(weight.shape, generator=generator).to(weight.device)


@register_updater("rigl")
class RigL(DropGrow):
    """Grows where the dense gradient of the update step's batch is largest, and takes no optimizer step there
    (Evci et al. 2020)."""

    gradient_step = True

    def grow(self, weight, grad, generator):
        return torch.zeros_like(weight) if grad is None else grad.abs()


DST = UPDATERS  # the registry's name before mask updaters


def dst_settings(node) -> tuple[type[MaskUpdater] | None, dict]:
    """(the updater class, its settings) of a `dst` config node; (None, {}) for `name: none`, whose keys are
    checked as drop-and-grow settings all the same (a sweep over dst=none,set,rigl keeps them)."""
    raw = plain(node)
    if raw.get("name", "none") in (None, "none"):
        check_settings({k: v for k, v in raw.items() if k != "name"}, DstSettings, "dst")
    return updater_settings(raw)
