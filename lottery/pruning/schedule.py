"""The schedule: how many entries each pruning step removes (the per-level rates, or straight to `pruning.target` in
one shot), optionally in `pruning.rounds` exponentially spaced rounds with fresh scores each round (SynFlow's
iterative schedule). *When* the scores are taken (`pruning.when`) is the experiment's choice of which weights it hands
in.

`pruning.scope`: `layerwise` (each tensor at its own rate), `global` (one total, split by the scores), or a density
distribution `uniform | er | erk` (lottery.pruning.densities): the total is global pruning's (pruning.rate of all
surviving weights per level, or pruning.target in one shot) and the split between tensors is the distribution's, so
the counts are per tensor and selection is layerwise.

`pruning.counting`: how a round's count and ties are decided. `exact` (ours): each round keeps exactly its rounded
count (round half up), ties broken stably (the lower index is pruned first). `synflow`: Synaptic-Flow's code
(github ganguli-lab/Synaptic-Flow, Pruners/pruners.py `_global_mask` / `_local_mask`, prune.py `prune_loop`): round r
of R aims at density d_r = d^(r/R) of the whole tensor set (or of each tensor), k = int((1 - d_r) N) over all N
entries, the pruned ones scoring 0 (their weights are zero), and every entry scoring at or below the k-th smallest
score is pruned, ties included, so a round may prune more than k. Their masks can also revive an entry whose 0 score
lies above a negative threshold (GraSP); ours never revive: a pruned entry stays pruned."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping

import torch
from torch import nn

from lottery.masks import Masks, Prunable, apply, channel_companions
from lottery.pruning import granularity as G
from lottery.pruning.criteria import CRITERIA, Batches, criterion_settings, score
from lottery.pruning.densities import DISTRIBUTIONS, allocate
from lottery.pruning.selection import Survivors, round_half_up

COUNTINGS = ("exact", "synflow")


def _key(pcfg, key: str):
    """A key of the pruning settings that an older or hand-made config may lack (None then): the typed config
    (lottery.config.PruningConfig) has them all, a plain dict or a DictConfig perhaps not."""
    return pcfg.get(key) if isinstance(pcfg, Mapping) else getattr(pcfg, key, None)


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


def _split(masks: Masks, pcfg, total: int) -> dict[str, int]:
    """A global total split between the tensors by the distribution `pruning.scope`; no tensor gets more than it has
    now (a pruning step only removes)."""
    return allocate(
        pcfg.scope,
        {n: tuple(m.shape) for n, m in masks.items()},
        total,
        upper={n: int(m.count_nonzero()) for n, m in masks.items()},
    )


def survivors_after(masks: Masks, prunable: list[Prunable], pcfg, keep_fraction: float | None = None):
    """How many entries survive one pruning step: {name: count} for layerwise pruning and for a density
    distribution (uniform, er, erk), a total for global pruning.

    `keep_fraction` (one-shot) prunes straight to that fraction of each tensor (layerwise) or of all masked weights
    (global, distributions) instead of applying the per-level rates. A distribution splits the global total, the
    same count global pruning would keep, by its per-tensor densities of all masked weights."""
    alive = {n: int(m.count_nonzero()) for n, m in masks.items()}
    if pcfg.scope == "global" or pcfg.scope in DISTRIBUTIONS:
        now = sum(alive.values())
        if keep_fraction is not None:
            total = round_half_up(keep_fraction * sum(m.numel() for m in masks.values()))
        else:
            total = now - round_half_up(pcfg.rate * now)
        return total if pcfg.scope == "global" else _split(masks, pcfg, total)
    if keep_fraction is not None:
        return {n: round_half_up(keep_fraction * m.numel()) for n, m in masks.items()}
    rates = layer_rates(prunable, pcfg)
    return {n: a - round_half_up(rates[n] * a) for n, a in alive.items()}


def level_survivors(masks: Masks, prunable: list[Prunable], pcfg, level: int):
    """Survivors after `level` steps of the per-level rates from `masks`, from counts alone: {name: count} for
    layerwise pruning, a total for global pruning (the counts IMP's levels have; used by pruning.from_dense), and
    for a distribution the global total after `level` steps split by the distribution."""
    alive = {n: int(m.count_nonzero()) for n, m in masks.items()}
    if pcfg.scope == "global" or pcfg.scope in DISTRIBUTIONS:
        total = sum(alive.values())
        for _ in range(level):
            total -= round_half_up(pcfg.rate * total)
        return total if pcfg.scope == "global" else _split(masks, pcfg, total)
    rates = layer_rates(prunable, pcfg)
    for _ in range(level):
        alive = {n: a - round_half_up(rates[n] * a) for n, a in alive.items()}
    return alive


def _round_target(now: int, final: int, r: int, rounds: int) -> int:
    """Survivors after round r of `rounds`, spaced exponentially from `now` to `final` (the last round is exact)."""
    if r == rounds or now == 0:
        return final
    return max(final, min(now, round_half_up(now * (final / now) ** (r / rounds))))


def prune(
    model: nn.Module,
    masks: Masks,
    prunable: list[Prunable],
    pcfg,
    *,
    batches: Batches,
    generator: torch.Generator,
    keep_fraction: float | None = None,
    rescore: Callable[[Masks], nn.Module] | None = None,
    keep: dict[str, int] | int | None = None,
    invert: bool = False,
) -> Masks:
    """One pruning step of the schedule: new masks scored on `model` (whose weights the caller chose).

    With `pruning.rounds` > 1 the step is split into rounds, each scoring anew the model with the masks so far
    applied. `rescore(masks)` returns that model: it must be `model` with `masks` applied, and may be a fresh one
    (so that a criterion that changes the model it is handed cannot leak into the next round); without it the masks
    are applied to `model` in place. A criterion whose function has a `rounds` attribute (SynFlow:
    `lottery.pruning.pai.SynflowRounds`) keeps its own scoring copy instead: `rounds(model, masks, batches=...,
    generator=..., **settings)` is built once from round 1's model, and each round asks its `scores(index)` of the
    surviving entries (flat indices, as `Survivors`) and tells it `remove(index)` which ones were pruned; `rescore` is
    then never called. Either way a round scores the same weights, so the masks are the same.
    `keep` replaces the schedule's counts: {name: survivors} per tensor (layerwise selection) or a total (global);
    `invert` keeps the lowest scores instead of the highest (the invert ablation).

    `pruning.granularity` (lottery.pruning.granularity): `channel` selects whole output channels (counts and `keep`
    in channels) and returns their companions' masks too; `nm` keeps n of every m along the input dimension."""
    if G.kind(pcfg) == "channel":
        return _prune_channels(
            model,
            masks,
            prunable,
            pcfg,
            batches=batches,
            generator=generator,
            keep_fraction=keep_fraction,
            rescore=rescore,
            keep=keep,
            invert=invert,
        )
    if G.kind(pcfg) == "nm":
        return _prune_nm(
            model, masks, prunable, pcfg, batches=batches, generator=generator, rescore=rescore, invert=invert
        )
    target, scope = _target(masks, prunable, pcfg, keep_fraction, keep)
    left = Survivors(masks)
    start = dict(zip(masks, left.counts()))
    name = pcfg.criterion["name"]
    rounds = int(_key(pcfg, "rounds") or 1)
    counting = _key(pcfg, "counting") or "exact"
    crit = CRITERIA.get(name)
    incremental = getattr(crit.fn, "rounds", None) if crit is not None else None
    if incremental is not None:
        scorer = incremental(model, masks, batches=batches, generator=generator, **criterion_settings(pcfg.criterion))
        pruned = torch.cat([m.detach().reshape(-1) == 0 for m in masks.values()]).nonzero().squeeze(1)
    for r in range(1, rounds + 1):
        if incremental is not None:
            scores = scorer.scores(left.index)
        else:
            if r > 1:
                masks = left.masks()
                model = rescore(masks) if rescore is not None else _masked(model, masks)
            scores = left.gather(score(model, masks, pcfg.criterion, batches=batches, generator=generator))
        if invert:
            scores = -scores
        if counting == "synflow":
            fraction = keep_fraction if keep is None and scope in ("global", "layerwise") else None
            removed = left.remove_where(_synflow_drop(left, scores, start, target, r, rounds, scope, fraction), name)
        else:
            removed = _remove_round(left, scores, start, target, r, rounds, scope, name)
        if incremental is not None:  # round 2 scores the model with all the masks applied, as `_masked` does
            scorer.remove(torch.cat([pruned, removed]) if r == 1 else removed)
    return left.masks()


def _remove_round(
    left: Survivors,
    scores: torch.Tensor,
    start: dict,
    target,
    r: int,
    rounds: int,
    scope: str,
    name: str,
    unit: str = "weight",
) -> torch.Tensor:
    """Round r of `rounds`: the survivors' lowest `scores` go, down to the round's count over all tensors (global) or
    in each tensor (`start`: the counts before the first round, in the survivors' tensor order)."""
    if scope == "global":
        now = _round_target(sum(start.values()), target, r, rounds)
        return left.remove_global(scores, len(left.index) - now, name, unit=unit)
    return left.remove_layerwise(
        scores, [a - _round_target(start[n], target[n], r, rounds) for n, a in zip(start, left.counts())]
    )


def _prune_channels(model, masks, prunable, pcfg, *, batches, generator, keep_fraction, rescore, keep, invert) -> Masks:
    """`prune` with whole output channels as the selected entries: the same selection (`Survivors`) on one score per
    channel, the rounds, scopes and counts of the schedule in channels."""
    names = [p.name for p in prunable]
    weights = G.weights_only(masks, names)
    companions = channel_companions(model)
    groups = G.channel_masks(weights)
    target, scope = _target(groups, prunable, pcfg, keep_fraction, keep)
    left = Survivors(groups)
    start = dict(zip(groups, left.counts()))
    name = pcfg.criterion["name"]
    rounds = int(_key(pcfg, "rounds") or 1)
    how = _key(pcfg, "group_score") or "sum"
    current = weights
    for r in range(1, rounds + 1):
        if r > 1:
            full = G.expand(left.masks(), weights, companions)
            model = rescore(full) if rescore is not None else _masked(model, full)
            current = G.weights_only(full, names)
        if how == "bn":  # the channels' BatchNorm scales in the weights being scored, not a criterion's scores
            params = dict(model.named_parameters())
            scales = {n: params[s] for n, s in G.batchnorm_scales(model).items()}
            scores = left.gather(G.channel_scores({}, names, how, bn=scales))
        else:
            raw = score(model, current, pcfg.criterion, batches=batches, generator=generator)
            scores = left.gather(G.channel_scores(raw, names, how))
        if invert:
            scores = -scores
        _remove_round(left, scores, start, target, r, rounds, scope, name, unit="channel")
    return G.expand(left.masks(), weights, companions)


def _prune_nm(model, masks, prunable, pcfg, *, batches, generator, rescore, invert) -> Masks:
    """`prune` to n of every m along the input dimension; with `pruning.rounds` the kept count per block goes from m
    to n in exponentially spaced rounds, scored anew each round (SynFlow)."""
    n, m = G.nm_of(pcfg)
    names = [p.name for p in prunable]
    current = G.weights_only(masks, names)
    G.check_nm({k: tuple(v.shape) for k, v in current.items()}, n, m)
    rounds = int(_key(pcfg, "rounds") or 1)
    for r in range(1, rounds + 1):
        if r > 1:
            model = rescore(current) if rescore is not None else _masked(model, current)
        raw = score(model, current, pcfg.criterion, batches=batches, generator=generator)
        per_block = _round_target(m, n, r, rounds)
        current = {k: G.nm_select(-raw[k] if invert else raw[k], v, per_block, m) for k, v in current.items()}
    return current


def synflow_k(total: int, start: int, target: int, r: int, rounds: int, fraction: float | None) -> int:
    """Synaptic-Flow's count for round r of `rounds` over `total` entries: int((1 - d_r) total) with d_r =
    d^(r/rounds) (`sparse = sparsity**((epoch + 1) / epochs)` in their prune_loop), d the target density (`fraction`
    where the run gives one, as theirs; else target / total). From an already pruned start (density d0 < 1) the
    rounds go from d0 to d: d_r = d0 (d / d0)^(r/rounds). A count target's last round removes exactly total - target."""
    if fraction is None and r == rounds:
        return total - target
    d0 = start / total
    d = fraction if fraction is not None else target / total
    d_r = d ** (r / rounds) if start == total else d0 * (d / d0) ** (r / rounds)
    return int((1.0 - d_r) * total)


def synflow_drop(scores: torch.Tensor, total: int, k: int) -> torch.Tensor:
    """Which survivors (`scores`, over `total` entries of which the others are pruned and score 0) Synaptic-Flow's
    rule prunes: those scoring at or below the k-th smallest of all `total` scores (`torch.kthvalue`, `score <=
    threshold`); none when k < 1."""
    if k < 1 or scores.numel() == 0:
        return torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    pruned = torch.zeros(total - scores.numel(), dtype=scores.dtype, device=scores.device)
    threshold = torch.kthvalue(torch.cat([scores, pruned]), min(k, total)).values
    return scores <= threshold


def _synflow_drop(
    left: Survivors, scores: torch.Tensor, start: dict, target, r: int, rounds: int, scope: str, fraction: float | None
) -> torch.Tensor:
    if scope == "global":
        total = int(left.bounds[-1])
        return synflow_drop(scores, total, synflow_k(total, sum(start.values()), target, r, rounds, fraction))
    cuts = torch.searchsorted(left.index, left.bounds).tolist()
    drop = [
        synflow_drop(scores[a:b], size, synflow_k(size, start[n], target[n], r, rounds, fraction))
        for (n, size), a, b in zip(zip(start, left.sizes), cuts, cuts[1:])
    ]
    return torch.cat(drop) if drop else torch.zeros(0, dtype=torch.bool)


def _target(masks: Masks, prunable: list[Prunable], pcfg, keep_fraction, keep):
    """(survivors, scope) of one pruning step: the schedule's counts, or `keep` (per tensor: layerwise; a total:
    global). `masks` are weights or, for channel pruning, channels."""
    if keep is None:
        return survivors_after(masks, prunable, pcfg, keep_fraction), pcfg.scope
    return (dict(keep), "layerwise") if isinstance(keep, dict) else (int(keep), "global")


def _masked(model: nn.Module, masks: Masks) -> nn.Module:
    apply(model, masks)
    return model


def plan_counts(masks: Masks, prunable: list[Prunable], pcfg) -> list[int]:
    """Remaining prunable weights at each level, computed from counts alone (no weights needed).

    Used to decide how many levels a `pruning.target` needs. Exact for layerwise pruning; for global pruning the
    total is exact too (only the split between tensors depends on the scores), and a distribution has global
    pruning's totals (only their split differs)."""
    rates = layer_rates(prunable, pcfg)
    alive = {n: int(m.count_nonzero()) for n, m in masks.items()}
    counts = [sum(alive.values())]
    for _ in range(10_000):
        if pcfg.scope == "global" or pcfg.scope in DISTRIBUTIONS:
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
