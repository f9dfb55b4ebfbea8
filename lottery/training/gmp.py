"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune"), the RigL paper's "Pruning" baseline,
as a mask updater: the network trains dense from the start and, every `delta_t` steps from `begin` to `end` (fractions
of the training length), its surviving weights of smallest magnitude are removed down to the density of the cubic
schedule

    d_t = d_f + (d_i - d_f) * (1 - (t - t_0) / (n * delta_t)) ** 3,   t = t_0 + k * delta_t,  k = 1 .. n,

with d_i = 1 (dense), t_0 = begin, n = floor((end - begin) / delta_t) and d_f the unit's density (the level's count of
weights: the masks a unit is handed are its target, the network starts dense; `MaskUpdater.dense_start`). At update k
the network keeps exactly round_half_up(d_t * weights) weights (lottery.pruning.selection's rounding), split over its
layers by `distribution` (lottery.pruning.densities.allocate: uniform, er, erk; never more than a layer has left) or
ranked over all layers at once (`global`); the last update keeps exactly the unit's count. Pruned weights never come
back; ties go to the lower index, so there is no random choice (replicas interleaved equal single runs exactly).

Where this differs from Zhu & Gupta: their schedule is in sparsity (1 - density), which is the same curve; they prune
each layer to the schedule's sparsity (`uniform` here); the first update is at t_0 + delta_t (at t_0 the schedule's
density is d_i = 1 and nothing is pruned).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lottery.core.ranges import at_least, between, setting
from lottery.pruning.densities import allocate
from lottery.pruning.selection import Survivors, round_half_up
from lottery.training.updaters import MaskUpdater, register_updater

DISTRIBUTIONS = ("uniform", "er", "erk", "global")


@dataclass
class GmpSettings:
    delta_t: int = setting(100, at_least(1))  # steps between pruning steps
    begin: float = setting(0.0, between(0, 1, hi_open=True))  # t_0, the first pruning step, a fraction of training
    # no pruning step after this fraction of the training length (the last one is at t_0 + n * delta_t)
    end: float = setting(0.75, between(0, 1, lo_open=True))
    # how each step's count is split: uniform | er | erk (per layer) | global (one ranking)
    distribution: str = "uniform"

    def __post_init__(self):
        if self.delta_t < 1:
            raise ValueError(f"dst.delta_t must be >= 1, got {self.delta_t}")
        if not 0 <= self.begin < self.end <= 1:
            raise ValueError(
                f"dst.begin and dst.end are fractions of the training length with 0 <= begin < end <= 1, "
                f"got {self.begin} and {self.end}"
            )
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown dst.distribution '{self.distribution}'; accepted: {', '.join(DISTRIBUTIONS)}")


def cubic_density(step: int, t0: int, n: int, delta_t: int, final: float, initial: float = 1.0) -> float:
    """The schedule's density at `step` (held at `initial` before t_0 and at `final` after t_0 + n * delta_t)."""
    progress = min(max((step - t0) / (n * delta_t), 0.0), 1.0)
    return final + (initial - final) * (1 - progress) ** 3


@register_updater("gmp")
class GradualMagnitude(MaskUpdater):
    Settings = GmpSettings
    dense_start = True
    granularity_note = "prunes single weights gradually"

    @classmethod
    def check_fit(cls, settings: dict, total_steps: int) -> None:
        span = round_half_up(settings["end"] * total_steps) - round_half_up(settings["begin"] * total_steps)
        if settings["delta_t"] > span:
            raise ValueError(
                f"dst.delta_t={settings['delta_t']} is longer than the pruning span (dst.begin="
                f"{settings['begin']} to dst.end={settings['end']} of {total_steps} steps = {span} "
                f"steps), "
                f"so no pruning step would happen; accepted: dst.delta_t <= {span} (or a longer "
                f"train.duration)"
            )

    def __init__(self, settings: dict, ctx):
        super().__init__(settings, ctx)
        self.t0 = round_half_up(settings["begin"] * ctx.total_steps)
        self.n_steps = (round_half_up(settings["end"] * ctx.total_steps) - self.t0) // settings["delta_t"]
        # the unit's masks are the target: its count per layer and in all
        self.size = sum(layer.mask.numel() for layer in ctx.layers[0]) if ctx.layers else 0
        self.final = [[int(layer.mask.count_nonzero()) for layer in layers] for layers in ctx.layers]

    def updates(self) -> list[int]:
        """The steps that prune."""
        dt = self.settings["delta_t"]
        return [self.t0 + k * dt for k in range(1, self.n_steps + 1)]

    def target(self, u: int, step: int) -> int:
        """Network `u`'s count of weights after the pruning step at `step`: exact at the last one."""
        final = sum(self.final[u])
        if step >= self.t0 + self.n_steps * self.settings["delta_t"]:
            return final
        d = cubic_density(step, self.t0, self.n_steps, self.settings["delta_t"], final / self.size)
        return max(final, round_half_up(d * self.size))

    def begin(self, step: int) -> list[int]:
        changed = []
        for u, layers in enumerate(self.ctx.layers):
            for layer in layers:
                layer.mask.fill_(1)
                changed.append(layer.entry)
            self.mask_changes[u] = [[step, self.densities(u)]]
        return changed

    def after_step(self, step, optimizer, active):
        if (
            self.n_steps < 1
            or step <= self.t0
            or (step - self.t0) % self.settings["delta_t"]
            or step > self.t0 + self.n_steps * self.settings["delta_t"]
        ):
            return []
        changed = []
        for u, layers in enumerate(self.ctx.layers):
            if active[u]:
                changed += self.prune(u, step)
                self.record(u, step)
        return changed

    @torch.no_grad()
    def prune(self, u: int, step: int) -> list[int]:
        layers = self.ctx.layers[u]
        masks = {layer.name: layer.mask for layer in layers}
        left = Survivors(masks)
        now = left.counts()
        keep = self.target(u, step)
        scores = left.gather({layer.name: layer.weight.abs() for layer in layers})
        if self.settings["distribution"] == "global":
            left.remove_global(scores, sum(now) - keep, "gradual magnitude")
        else:
            shapes = {layer.name: tuple(layer.mask.shape) for layer in layers}
            counts = allocate(self.settings["distribution"], shapes, keep, upper=dict(zip(masks, now)))
            left.remove_layerwise(scores, [c - counts[name] for c, name in zip(now, masks)])
        for layer, new in zip(layers, left.masks().values()):
            layer.mask.copy_(new)
        return [layer.entry for layer in layers]
