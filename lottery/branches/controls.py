"""The controls of the lottery-ticket papers and the ablations of pruning at initialization, registered as branches."""

from __future__ import annotations

from lottery import masks as M, pruning
from lottery.branches.base import LevelContext, Unit, register_branch
from lottery.pruning import granularity as G


def _moved(ctx: LevelContext, permute: bool):
    """The control's masks at the ticket's granularity: whole channels (companions following) for a channel ticket,
    n random of every m for an N:M ticket, single weights otherwise."""
    p = ctx.cfg.pruning
    g = G.kind(p)
    if g == "unstructured":
        return (pruning.shuffle if permute else pruning.random_like)(ctx.masks, ctx.generator())
    model = ctx.new_model()
    names = [q.name for q in M.prunable_tensors(model, p)]
    if g == "channel":
        return G.random_channels(ctx.masks, names, M.channel_companions(model), ctx.generator(), permute=permute)
    return G.random_nm(ctx.masks, names, *G.nm_of(p), ctx.generator())


# --- the controls of the lottery-ticket papers -----------------------------------------------------------------------


@register_branch("reinit", "reinit control (ticket mask, fresh random init)")
def reinit(ctx: LevelContext) -> list[Unit]:
    return [Unit(ctx.new_model(init_seed=ctx.seed), ctx.masks)]


@register_branch("random_prune", "random-pruning control (random mask, same per-layer sparsity)")
def random_prune(ctx: LevelContext) -> list[Unit]:
    masks = _moved(ctx, permute=False)
    return [Unit(ctx.ticket_model(masks), masks)]


@register_branch("shuffle", "shuffle control (ticket mask permuted within each layer)")
def shuffle(ctx: LevelContext) -> list[Unit]:
    masks = _moved(ctx, permute=True)
    return [Unit(ctx.ticket_model(masks), masks)]


# --- the ablations of pruning at initialization (Frankle, Dziugaite, Roy & Carbin 2021) ------------------------------


@register_branch("layer_shuffle", "layer-shuffle ablation (mask permuted within each layer)")
def layer_shuffle(ctx: LevelContext) -> list[Unit]:
    """Frankle et al. 2021's name for the shuffle control: random positions at the per-layer densities the criterion
    chose, which tests whether a method's value lies in which weights it keeps or only in how many per layer."""
    return shuffle(ctx)


@register_branch("invert", "invert ablation (lowest scores kept, same per-layer counts)")
def invert(ctx: LevelContext) -> list[Unit]:
    """The level's criterion scores recomputed (same weights, data and seed as the ticket's pruning step), the
    lowest-scoring weights kept, with the ticket's count in each layer. For an iterative schedule (pruning.rounds)
    every round keeps the lowest scores, as Synaptic-Flow's invert option does."""
    p = ctx.cfg.pruning
    if G.kind(p) == "channel":  # counts in the units the selection picks: channels, companions not counted
        names = [q.name for q in M.prunable_tensors(ctx.new_model(), p)]
        keep = {n: int(m.count_nonzero()) for n, m in G.channel_masks(G.weights_only(ctx.masks, names)).items()}
    else:
        keep = {n: int(m.count_nonzero()) for n, m in ctx.masks.items()}
    masks = ctx.prune(keep=keep, invert=True)
    return [Unit(ctx.ticket_model(masks), masks)]


@register_branch("retrain", "ticket retrained in isolation", selectable=False)
def in_isolation(ctx: LevelContext) -> list[Unit]:
    return [Unit(ctx.ticket_model(), ctx.masks)]
