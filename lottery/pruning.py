"""Pruning: criteria score weights, one shared selection turns scores into masks, a schedule says when and how much.

- A **criterion** (registry `CRITERIA`) maps (model, masks, batches, generator, its settings) to one score per entry
  of every masked tensor; higher scores are kept. `magnitude` and `random` are here, the pruning-at-initialization
  criteria (magnitude_init, snip, grasp, synflow) in lottery/criteria.py; a user's own is one `@register_criterion`
  function in their module (`imports=[my_module]`).
- **Selection** is the only code that writes masks: exact counts (round half up), only surviving entries ranked
  (pitfall 3), ties to the lower flat index (a stable sort), layerwise or global, and a global prune never empties a
  tensor (pitfall 6).
- The **schedule** (`prune`) decides how many entries go: the per-level rates, or straight to `pruning.target` in one
  shot, optionally in `pruning.rounds` exponentially spaced rounds with fresh scores each round (SynFlow's iterative
  schedule). *When* the scores are taken (`pruning.when`: after training, or at the weights a level starts from) is
  the IMP driver's choice of which weights it hands in.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import inspect
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from lottery.masks import Masks, Prunable

Scores = dict[str, torch.Tensor]
Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


def round_half_up(x: float) -> int:
    # Python's round() rounds half to even, which would make counts depend on parity.
    return int(math.floor(x + 0.5))


# --- criteria --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Criterion:
    name: str
    fn: Callable[..., Scores]  # fn(model, masks, *, batches, generator, **settings) -> scores
    settings: Optional[type] = None  # dataclass of its keys under pruning.criterion (types and defaults)
    label: str = ""  # name in lottery-report's legends (SNIP, GraSP, ...); defaults to `name`
    when: Optional[str] = None  # "at_init": always scores the weights a level starts from, whatever pruning.when says


CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str, settings: Optional[type] = None, *, label: str = "", when: Optional[str] = None):
    """`@register_criterion("snip", settings=SnipSettings)`: `settings` is a dataclass whose fields are the keys the
    criterion accepts under `pruning.criterion` (checked and typed before any work). Without it, the keyword
    parameters of the function are the accepted keys. `when="at_init"` makes the criterion score the weights a level
    starts from even under pruning.when=after_training (magnitude_init)."""
    if when not in (None, "at_init", "after_training"):
        raise ValueError(f"register_criterion: when must be None, 'at_init' or 'after_training', got {when!r}")

    def decorator(fn):
        if name in CRITERIA:
            raise ValueError(f"pruning criterion '{name}' is already registered")
        CRITERIA[name] = Criterion(name, fn, settings, label or name, when)
        return fn
    return decorator


def scores_at(pcfg) -> str:
    """Which weights the schedule scores: the criterion's own `when` if it fixes one, else `pruning.when`."""
    crit = CRITERIA.get(pcfg.criterion["name"])
    return (crit.when if crit is not None and crit.when else None) or pcfg.when


def criterion_settings(node) -> dict:
    """The settings of the criterion node `pruning.criterion` as plain keyword arguments, validated: an unknown name,
    an unknown key or a value of the wrong type raises ValueError naming it and the accepted ones."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    raw = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})
    name = raw.pop("name", None)
    if name not in CRITERIA:
        raise ValueError(f"unknown pruning criterion '{name}'; accepted: {', '.join(sorted(CRITERIA))}")
    crit = CRITERIA[name]
    if crit.settings is not None:
        accepted = [f.name for f in dataclasses.fields(crit.settings)]
        unknown = sorted(set(raw) - set(accepted))
        if unknown:
            raise ValueError(f"unknown key pruning.criterion.{unknown[0]} for criterion '{name}'; accepted: "
                             f"{', '.join(accepted) or 'none'}")
        try:
            typed = OmegaConf.merge(OmegaConf.structured(crit.settings), raw)
        except OmegaConfBaseException as e:
            raise ValueError(f"bad setting for pruning criterion '{name}': {e.msg if hasattr(e, 'msg') else e}") \
                from None
        return OmegaConf.to_container(typed)
    params = inspect.signature(crit.fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n not in ("batches", "generator")]
        unknown = sorted(set(raw) - set(accepted))
        if unknown:
            raise ValueError(f"unknown key pruning.criterion.{unknown[0]} for criterion '{name}'; accepted: "
                             f"{', '.join(accepted) or 'none'}")
    return raw


def score(model: nn.Module, masks: Masks, criterion_node, *, batches: Batches, generator: torch.Generator) -> Scores:
    settings = criterion_settings(criterion_node)
    name = criterion_node["name"]
    scores = CRITERIA[name].fn(model, masks, batches=batches, generator=generator, **settings)
    missing = sorted(set(masks) - set(scores))
    if missing:
        raise ValueError(f"pruning criterion '{name}' gave no scores for {missing[:3]}")
    return scores


@register_criterion("magnitude")
def magnitude(model: nn.Module, masks: Masks, *, batches: Batches, generator: torch.Generator) -> Scores:
    """|w| of the weights handed in: trained weights for IMP, initial ones for magnitude at initialization."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().abs() for n in masks}


@register_criterion("random")
def random(model: nn.Module, masks: Masks, *, batches: Batches, generator: torch.Generator) -> Scores:
    """Uniform random scores: random positions at exactly the counts the schedule asks for."""
    return {n: torch.rand(m.shape, generator=generator).to(m.device) for n, m in masks.items()}


# --- selection -------------------------------------------------------------------------------------------------------

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


# --- schedule --------------------------------------------------------------------------------------------------------

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


def survivors_after(masks: Masks, prunable: list[Prunable], pcfg, keep_fraction: Optional[float] = None):
    """How many entries survive one pruning step: {name: count} for layerwise pruning, a total for global pruning.

    `keep_fraction` (one-shot) prunes straight to that fraction of each tensor (layerwise) or of all masked weights
    (global) instead of applying the per-level rates."""
    alive = {n: int(m.count_nonzero()) for n, m in masks.items()}
    if pcfg.scope == "global":
        now = sum(alive.values())
        if keep_fraction is not None:
            return round_half_up(keep_fraction * sum(m.numel() for m in masks.values()))
        return now - round_half_up(pcfg.rate * now)
    if keep_fraction is not None:
        return {n: round_half_up(keep_fraction * m.numel()) for n, m in masks.items()}
    rates = layer_rates(prunable, pcfg)
    return {n: a - round_half_up(rates[n] * a) for n, a in alive.items()}


def level_survivors(masks: Masks, prunable: list[Prunable], pcfg, level: int):
    """Survivors after `level` steps of the per-level rates from `masks`, from counts alone: {name: count} for
    layerwise pruning, a total for global pruning (the counts IMP's levels have; used by pruning.from_dense)."""
    alive = {n: int(m.count_nonzero()) for n, m in masks.items()}
    if pcfg.scope == "global":
        total = sum(alive.values())
        for _ in range(level):
            total -= round_half_up(pcfg.rate * total)
        return total
    rates = layer_rates(prunable, pcfg)
    for _ in range(level):
        alive = {n: a - round_half_up(rates[n] * a) for n, a in alive.items()}
    return alive


def _round_target(now: int, final: int, r: int, rounds: int) -> int:
    """Survivors after round r of `rounds`, spaced exponentially from `now` to `final` (the last round is exact)."""
    if r == rounds or now == 0:
        return final
    return max(final, min(now, round_half_up(now * (final / now) ** (r / rounds))))


def prune(model: nn.Module, masks: Masks, prunable: list[Prunable], pcfg, *, batches: Batches,
          generator: torch.Generator, keep_fraction: Optional[float] = None,
          rescore: Optional[Callable[[Masks], nn.Module]] = None, keep: Optional[dict[str, int] | int] = None,
          invert: bool = False) -> Masks:
    """One pruning step of the schedule: new masks scored on `model` (whose weights the caller chose).

    With `pruning.rounds` > 1 the step is split into rounds: after each round the masks are applied to the model
    (`rescore(masks)` returns the model to score next, defaulting to `model` with the masks applied) and scored anew.
    `keep` replaces the schedule's counts: {name: survivors} per tensor (layerwise selection) or a total (global);
    `invert` keeps the lowest scores instead of the highest (the invert ablation)."""
    if keep is None:
        target, scope = survivors_after(masks, prunable, pcfg, keep_fraction), pcfg.scope
    else:
        target, scope = (dict(keep), "layerwise") if isinstance(keep, dict) else (int(keep), "global")
    start = dict((n, int(m.count_nonzero())) for n, m in masks.items())
    name = pcfg.criterion["name"]
    rounds = int(pcfg.get("rounds", 1) or 1)
    for r in range(1, rounds + 1):
        if r > 1:
            model = rescore(masks) if rescore is not None else _masked(model, masks)
        scores = score(model, masks, pcfg.criterion, batches=batches, generator=generator)
        if invert:
            scores = {n: -s for n, s in scores.items()}
        alive = {n: int(m.count_nonzero()) for n, m in masks.items()}
        if scope == "global":
            now = _round_target(sum(start.values()), target, r, rounds)
            masks = select_global(scores, masks, sum(alive.values()) - now, name)
        else:
            now = {n: _round_target(start[n], target[n], r, rounds) for n in masks}
            masks = select_layerwise(scores, masks, {n: alive[n] - now[n] for n in masks})
    return masks


def _masked(model: nn.Module, masks: Masks) -> nn.Module:
    from lottery.masks import apply
    apply(model, masks)
    return model


def plan_counts(masks: Masks, prunable: list[Prunable], pcfg) -> list[int]:
    """Remaining prunable weights at each level, computed from counts alone (no weights needed).

    Used to decide how many levels a `pruning.target` needs. Exact for layerwise pruning; for global pruning the
    total is exact too (only the split between tensors depends on the scores)."""
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


# --- mask transforms for controls ------------------------------------------------------------------------------------

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


# imported last so that its @register_criterion calls see the registry above; always registered with this module
from lottery import criteria  # noqa: E402,F401
