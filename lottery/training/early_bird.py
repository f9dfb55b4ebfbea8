"""Early-bird tickets (You et al., ICLR 2020, "Drawing Early-Bird Tickets"; github GATECH-EIC/Early-Bird-Tickets) as
a mask updater: during dense training, at every check it draws the mask magnitude pruning would draw now at density
`target`, measures how far it moved since the previous check, and ends training once it has settled; the experiment
then prunes the weights of that step (level 0's final weights) and trains the ticket, rewound as IMP's.

- check: every evaluation (`every: 0`) or every `every` steps;
- the mask of a check: the largest magnitudes, exactly round_half_up(target * weights) of them, over all masked
  tensors at once (`distribution: global`) or per tensor by lottery.pruning.densities (uniform, er, erk); it never
  changes the network's masks (the network trains dense);
- distance between consecutive masks: the fraction of kept weights that changed, |A xor B| / (|A| + |B|) (with equal
  counts, the kept weights of A not kept by B over the kept count; normalized by the kept count, not by all weights:
  at 5% density an all-weights Hamming distance is at most 0.1 and would always fire);
- the ticket is drawn at the first check where the last `window` distances (5) all exist and their largest is below
  `eps` (0.1): the checks before the window fills never stop training.

With `pruning.granularity=channel` the masks are channel masks, as the paper's: a channel's score is
`pruning.group_score` of its weights' magnitudes, or with `pruning.group_score=bn` the magnitude of its BatchNorm
scale (the paper's network-slimming score), `target` the fraction of channels kept (the output layer is never a
channel: lottery.pruning.granularity), and the distance the fraction of kept channels that changed. The ticket the
experiment then prunes at level 1 with the same granularity and group score is the last check's mask (tested).
Where this still differs from the paper: checks at evaluations (or every `every` steps), not once per epoch; and
without `pruning.granularity=channel` the masks are per weight by magnitude, the criterion IMP uses.
A unit that does not start dense (a ticket trained after the draw) trains on unwatched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lottery import masks as M
from lottery.core.ranges import at_least, between, setting
from lottery.pruning import granularity as G
from lottery.pruning.densities import survivor_counts
from lottery.pruning.selection import Survivors, round_half_up
from lottery.training.updaters import MaskUpdater, register_updater

DISTRIBUTIONS = ("global", "uniform", "er", "erk")


@dataclass
class EarlyBirdSettings:
    target: float | None = setting(None, between(0, 1, lo_open=True, hi_open=True))  # the ticket's density
    every: int = setting(0, between(0, integer=True))  # steps between checks; 0: at every evaluation
    window: int = setting(5, at_least(1))  # distances the stop rule looks at (You et al.: 5)
    eps: float = setting(0.1, between(0, 1, lo_open=True))  # drawn when the largest of them is below (You et al.: 0.1)
    distribution: str = "global"  # the check's mask: one ranking (global) or per tensor: uniform | er | erk
    granularity: str = "unstructured"  # pruning.granularity: unstructured (weights) | channel (whole channels)
    group_score: str = "sum"  # channel: a channel's score (pruning.group_score): sum | l1 | l2 | bn (BatchNorm scale)

    def __post_init__(self):
        if self.target is None or not 0 < self.target < 1:
            raise ValueError(
                f"dst.target is the early-bird ticket's density in (0, 1) (set pruning.target), got {self.target}"
            )
        if self.every < 0 or self.window < 1 or not 0 < self.eps <= 1:
            raise ValueError(
                f"dst.every >= 0, dst.window >= 1 and dst.eps in (0, 1] are needed, got {self.every}, "
                f"{self.window} and {self.eps}"
            )
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown dst.distribution '{self.distribution}'; accepted: {', '.join(DISTRIBUTIONS)}")
        if self.granularity not in ("unstructured", "channel"):
            raise ValueError(
                f"early-bird tickets are drawn per weight or per channel, not with pruning.granularity="
                f"{self.granularity}; accepted: unstructured, channel"
            )
        if self.granularity == "channel" and self.distribution not in ("global", "uniform"):
            raise ValueError(
                f"dst.distribution={self.distribution} is a density per weight tensor; with "
                "pruning.granularity=channel use global or uniform"
            )
        if self.group_score not in G.GROUP_SCORES:
            raise ValueError(f"unknown pruning.group_score '{self.group_score}'; accepted: {', '.join(G.GROUP_SCORES)}")


def mask_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The fraction of kept weights that changed between masks `a` and `b`: |a xor b| / (|a| + |b|)."""
    changed = sum(int((a[n] != b[n]).sum()) for n in a)
    kept = sum(int(a[n].sum()) + int(b[n].sum()) for n in a)
    return changed / kept if kept else 0.0


def settled(distances: list[float], window: int, eps: float) -> bool:
    """The stop rule: `window` distances exist and the largest of the last `window` is below `eps`."""
    return len(distances) >= window and max(distances[-window:]) < eps


@register_updater("early_bird")
class EarlyBird(MaskUpdater):
    Settings = EarlyBirdSettings
    granularities = ("unstructured", "channel")
    granularity_note = "draws per-weight or channel masks"

    def __init__(self, settings: dict, ctx):
        super().__init__(settings, ctx)
        # only dense training is watched: the ticket trained after the draw is not
        self.watching = [all(bool(layer.mask.all()) for layer in layers) for layers in ctx.layers]
        self.last: list[dict | None] = [None] * self.n  # the previous check's mask
        self.distances: list[list] = [[] for _ in range(self.n)]  # [step, distance] per check after the first
        self.drawn_at: list[int | None] = [None] * self.n

    def check_mask(self, u: int) -> dict[str, torch.Tensor]:
        """The mask magnitude pruning would draw now at `target`: per weight, or per channel."""
        if self.settings["granularity"] == "channel":
            return self.check_channels(u)
        layers = self.ctx.layers[u]
        scores = {layer.name: layer.weight.detach().abs() for layer in layers}
        ones = {layer.name: torch.ones_like(layer.mask, dtype=torch.bool) for layer in layers}
        size = sum(m.numel() for m in ones.values())
        keep = round_half_up(self.settings["target"] * size)
        left = Survivors(ones)
        if self.settings["distribution"] == "global":
            left.remove_global(left.gather(scores), size - keep, "early-bird magnitude")
        else:
            counts = survivor_counts(
                self.settings["distribution"], {n: tuple(m.shape) for n, m in ones.items()}, keep / size
            )
            left.remove_layerwise(left.gather(scores), [m.numel() - counts[n] for n, m in ones.items()])
        return {n: m.cpu() for n, m in left.masks().items()}

    def check_channels(self, u: int) -> dict[str, torch.Tensor]:
        """One entry per output channel of each channel-pruned layer: the `target` fraction of all channels (global)
        or of each layer's (uniform) with the highest scores, as lottery.pruning's channel selection keeps them."""
        assert self.ctx.parameters is not None, "channel checks read the networks' parameters"
        model, params = self.ctx.models[u], self.ctx.parameters(u)
        masked = {layer.name for layer in self.ctx.layers[u]}
        # the pruned weights: masked tensors with output channels (while dense, no companion has a mask yet)
        names = [n for n in M.channel_companions(model) if n in masked]
        how = self.settings["group_score"]
        bn = {n: params[s].detach() for n, s in G.batchnorm_scales(model).items()}
        scores = G.channel_scores({n: params[n].detach().abs() for n in names}, names, how, bn=bn)
        groups = {n: torch.ones(params[n].shape[0], dtype=torch.bool) for n in names}
        left = Survivors(groups)
        ranked = left.gather({n: s.cpu() for n, s in scores.items()})
        target = self.settings["target"]
        if self.settings["distribution"] == "global":
            size = sum(g.numel() for g in groups.values())
            left.remove_global(ranked, size - round_half_up(target * size), "early-bird channel", unit="channel")
        else:
            left.remove_layerwise(ranked, [g.numel() - round_half_up(target * g.numel()) for g in groups.values()])
        return left.masks()

    def check(self, u: int, step: int) -> None:
        mask = self.check_mask(u)
        last = self.last[u]
        if last is not None:
            self.distances[u].append([step, mask_distance(last, mask)])
            if settled([d for _, d in self.distances[u]], self.settings["window"], self.settings["eps"]):
                self.drawn_at[u] = step
        self.last[u] = mask

    def after_step(self, step, optimizer, active):
        if self.settings["every"] and step % self.settings["every"] == 0:
            for u in range(self.n):
                if active[u] and self.watching[u]:
                    self.check(u, step)
        return []

    def at_eval(self, step, records):
        if not self.settings["every"]:
            for u in records:
                if self.watching[u] and not (records[u] or {}).get("diverged"):
                    self.check(u, step)
        return []

    def finished(self, u: int) -> bool:
        return self.drawn_at[u] is not None

    def state_dict(self, u):
        return {
            **super().state_dict(u),
            "last": self.last[u],
            "distances": self.distances[u],
            "drawn_at": self.drawn_at[u],
            "watching": self.watching[u],
        }

    def load_state_dict(self, u, state):
        self.last[u], self.distances[u] = state["last"], list(state["distances"])
        self.drawn_at[u], self.watching[u] = state["drawn_at"], state["watching"]
        return super().load_state_dict(u, state)

    def result(self, u):
        if not self.watching[u]:
            return super().result(u)
        total = self.ctx.total_steps
        drawn = self.drawn_at[u]
        return {
            **super().result(u),
            "early_bird_step": drawn,
            "mask_distances": self.distances[u],
            "early_bird_steps_saved": 0 if drawn is None else total - drawn,
        }
