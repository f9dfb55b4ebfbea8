"""Criteria: a registered function from (model, masks, batches, generator, its settings) to one score per entry of
every masked tensor; higher scores are kept. `magnitude` and `random` are here, the pruning-at-initialization criteria
in lottery.pruning.pai; a user's own is one `@register_criterion` function in their module (`imports=[my_module]`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lottery.core.registry import Registry, check_settings, plain
from lottery.masks import Masks

Scores = dict[str, torch.Tensor]
Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Criterion:
    name: str
    fn: Callable[..., Scores]  # fn(model, masks, *, batches, generator, **settings) -> scores
    settings: type | None = None  # dataclass of its keys under pruning.criterion (types and defaults)
    label: str = ""  # name in lottery-report's legends (SNIP, GraSP, ...); defaults to `name`
    when: str | None = None  # "at_init": always scores the weights a level starts from, whatever pruning.when says
    # check(settings, split): what the criterion needs of a replicate's data (raises ValueError), before any work
    check: Callable | None = None


CRITERIA = Registry("pruning criterion")


def register_criterion(
    name: str, settings: type | None = None, *, label: str = "", when: str | None = None, check: Callable | None = None
):
    """`@register_criterion("snip", settings=SnipSettings)`: `settings` is a dataclass whose fields are the keys the
    criterion accepts under `pruning.criterion` (checked and typed before any work). Without it, the keyword
    parameters of the function are the accepted keys. `when="at_init"` makes the criterion score the weights a level
    starts from even under pruning.when=after_training (magnitude_init). `check(settings, split)` checks what the
    criterion needs of a replicate's data (lottery.data.Split) once it is loaded, before anything is written."""
    if when not in (None, "at_init", "after_training"):
        raise ValueError(f"register_criterion: when must be None, 'at_init' or 'after_training', got {when!r}")

    def decorator(fn):
        CRITERIA.add(name, Criterion(name, fn, settings, label or name, when, check))
        return fn

    return decorator


def scores_at(pcfg) -> str:
    """Which weights the schedule scores: the criterion's own `when` if it fixes one, else `pruning.when`."""
    crit = CRITERIA.get(pcfg.criterion["name"])
    return (crit.when if crit is not None and crit.when else None) or pcfg.when


def criterion_settings(node) -> dict:
    """The settings of the criterion node `pruning.criterion` as plain keyword arguments, validated: an unknown name,
    an unknown key or a value of the wrong type raises ValueError naming it and the accepted ones."""
    raw = plain(node)
    name = raw.pop("name", None)
    crit = CRITERIA.lookup(name)
    return check_settings(
        raw,
        crit.settings,
        "pruning.criterion",
        of=f"pruning criterion '{name}'",
        fn=crit.fn,
        skip=("model", "masks", "batches", "generator"),
    )


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
