"""The pruning plan of a run: how many levels it has, and how level L's masks are made (which weights are scored, from
which masks, with which data and randomness)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lottery import masks as M, pruning
from lottery.branches import BRANCHES, branch_settings, check_levels
from lottery.core.files import load_torch
from lottery.core.seeds import derive_seed
from lottery.pruning import granularity as G


def counted(masks: M.Masks, pcfg) -> M.Masks:
    """The masks in the units the schedule counts: channels (one entry per output channel) with
    pruning.granularity=channel, else the weights themselves."""
    return G.channel_masks(masks) if G.kind(pcfg) == "channel" else masks


def level_count(cfg, masks: M.Masks, prunable) -> int:
    """Levels of the run, level 0 (dense) included: pruning.levels, or as many as pruning.target needs (in channels
    with pruning.granularity=channel)."""
    p = cfg.pruning
    if G.kind(p) == "nm":  # one shot to n/m (checked: pruning.one_shot=true)
        return 2
    if p.target is not None:
        return 2 if p.one_shot else len(pruning.plan_counts(counted(masks, p), prunable, p))
    return p.levels


def finetune_steps(rep) -> int:
    """Fine-tuning's budget: pruning.retrain_steps, by default what weight rewinding retrains (duration - rewind)."""
    from lottery.core.steps import parse_steps

    budget = rep.cfg.pruning.retrain_steps
    return (
        rep.steps.total - rep.steps.rewind
        if budget is None
        else parse_steps(budget, rep.steps.per_epoch, "pruning.retrain_steps")
    )


def preflight(rep, model) -> int:
    """Everything about the pruning plan that can be wrong, found before any work: the number of levels, a layer that
    the planned counts would empty (layerwise pruning and density distributions: the counts are known without
    scores; global pruning refuses at prune time, when the scores decide), the criterion's needs of the data and the
    branches' settings against the levels the run has. Returns the number of levels."""
    cfg, p = rep.cfg, rep.cfg.pruning
    check_layer_names(model, p, cfg.model.name)
    prunable = rep.prunable(model)
    masks = M.ones(model, prunable)
    n_levels = level_count(cfg, masks, prunable)
    if n_levels > 1 and not prunable:
        raise ValueError("nothing to prune: pruning.exclude removed every prunable tensor")
    if n_levels > 1 and G.kind(p) == "nm":  # every block keeps n >= 1: no layer can collapse
        G.check_nm({n: tuple(m.shape) for n, m in masks.items()}, *G.nm_of(p))
    unit = "channel" if G.kind(p) == "channel" else "weight"
    masks = counted(masks, p)
    if n_levels > 1 and G.kind(p) != "nm":
        before = sum(m.numel() for m in masks.values())
        for level in range(1, n_levels):
            counts = (
                pruning.survivors_after(masks, prunable, p, keep_fraction=p.target)
                if p.one_shot
                else pruning.level_survivors(masks, prunable, p, level)
            )
            total = counts if not isinstance(counts, dict) else sum(counts.values())
            if p.target is None and not p.one_shot and level > 1 and total >= before:
                raise ValueError(
                    f"pruning.levels={p.levels}: level {level} would keep the same {total} {unit}s as "
                    f"level {level - 1} (each tensor's count has stopped falling), so the levels after "
                    f"{level - 1} would train the same network again; accepted: pruning.levels <= "
                    f"{level} (level {level - 1} is the last that prunes)"
                )
            before = total
            if not isinstance(counts, dict):  # global: one total, split by the scores
                if counts < 1:
                    raise ValueError(
                        f"pruning to level {level} keeps no {unit} at all; keep more {unit}s "
                        f"(pruning.target, pruning.levels, pruning.rate)"
                    )
                continue
            empty = [n for n, c in counts.items() if c < 1 and masks[n].numel() > 0]
            if empty:
                total = sum(counts.values()) / sum(m.numel() for m in masks.values())
                raise ValueError(
                    f"{p.scope} pruning to {100 * total:.3g}% of the {unit}s (level {level}) would remove "
                    f"every {unit} of '{empty[0]}' ({masks[empty[0]].numel()} {unit}s; layer collapse"
                    f"{f', and {len(empty) - 1} more tensors' if len(empty) > 1 else ''}); keep more "
                    f"{unit}s (pruning.target, pruning.levels), give the layer a smaller rate "
                    f"(pruning.layer_rates) or exclude it (pruning.exclude=[{empty[0]}])"
                )
    if n_levels > 1:
        crit = pruning.CRITERIA[p.criterion["name"]]
        if crit.check is not None:
            crit.check(pruning.criterion_settings(p.criterion), rep.split)
        _collapse_at_init(rep, n_levels)
    check_levels("pruning.branch_levels", p.branch_levels, n_levels, bool(p.train_dense))
    for name in p.branches:
        check = BRANCHES[name].check
        if check is not None:
            check(branch_settings(name, cfg), n_levels, bool(p.train_dense), rep.steps)
    return n_levels


def _collapse_at_init(rep, n_levels: int) -> None:
    """Global pruning at initialization (scores of the initial weights, rewind 0): whether a level's selection would
    empty a layer depends on the seed alone, so every level is pruned here, in memory, on the initial weights the
    run will save (its init.pt when resuming), and a layer collapse refuses the run before anything is written. The
    same seeds and weights as the run's own pruning give the same masks. (Layerwise counts and the distributions are
    checked from counts alone above; scores of trained weights exist only once training has run.)"""
    p = rep.cfg.pruning
    if p.scope != "global" or G.kind(p) == "nm" or pruning.scores_at(p) != "at_init" or rep.steps.rewind != 0:
        return
    if rep.folder.init.exists():
        state = load_torch(rep.folder.init)
    else:
        from lottery.experiment.replicate import cpu_state

        state = cpu_state(rep.new_model(init_seed=rep.seed))
    model = rep.new_model()
    masks = M.ones(model, rep.prunable(model))
    for level in range(1, n_levels):
        masks = prune_level(rep, level, masks, state=state)


def check_layer_names(model, p, model_name: str) -> None:
    """Every pattern of pruning.exclude names a parameter of the model, every key of pruning.layer_rates a prunable
    tensor (with or without '.weight', as lottery.pruning.layer_rates matches them): a misspelt name would otherwise be
    ignored, and the run prune what it was told to leave."""
    import fnmatch

    names = [n for n, _ in model.named_parameters()]
    for pattern in p.exclude:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(
                f"pruning.exclude entry '{pattern}' names no parameter of model '{model_name}'; "
                f"accepted: names or glob patterns of its parameters: {', '.join(names)}"
            )
    prunable = [x.name for x in M.prunable_tensors(model, p)]
    if G.kind(p) == "channel" and getattr(p, "group_score", "sum") == "bn":
        G.check_batchnorm(model, prunable, model_name)
    for pattern in p.layer_rates:
        if not any(fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, f"{pattern}.weight") for n in prunable):
            raise ValueError(
                f"pruning.layer_rates key '{pattern}' names no pruned tensor; accepted: names or glob "
                f"patterns (with or without '.weight') of: {', '.join(prunable)}"
            )


def masks_before(rep, level: int) -> M.Masks:
    """The masks level `level` is pruned from: level L-1's ticket masks (all ones before level 1, and at every level
    with pruning.from_dense)."""
    model = rep.new_model()
    if level <= 1 or rep.cfg.pruning.from_dense:
        return M.ones(model, rep.prunable(model))
    return M.from_bool(rep.folder.load_ticket(level - 1).masks, model)


def source_level(cfg, level: int) -> int:
    """The level whose trained weights level `level`'s masks are pruned from."""
    return 0 if cfg.pruning.from_dense else level - 1


def trained_source(rep, level: int) -> dict:
    """The trained weights level `level` was pruned from (what lr_rewind and finetune keep)."""
    return load_torch(rep.folder.final_path(source_level(rep.cfg, level)))


# Keys of the record of the training a level's masks came from that its tickets repeat: an early-bird draw's step and
# the training it saved (lottery.training.early_bird).
CARRIED = ("early_bird_step", "early_bird_steps_saved")


def mask_cost(cfg, level: int, tickets: dict[int, dict]) -> dict:
    """Training the masks of `level` depended on, from the records of earlier levels' tickets ({level: record}):
    IMP's every earlier level, one-shot pruning after training its dense level, pruning at initialization nothing.
    The scoring itself (a batch for SNIP, SynFlow's rounds) is not counted."""
    needed: Iterable[int]
    if level == 0 or pruning.scores_at(cfg.pruning) == "at_init":
        needed = []
    elif cfg.pruning.from_dense:
        needed = [0]
    else:
        needed = range(level)
    out: dict[str, Any] = {"steps": 0, "flops": 0, "carry": {}}
    for lv in needed:
        rec = tickets.get(lv) or {}
        out["steps"] += rec.get("train_steps") or 0
        out["flops"] += rec.get("train_flops") or 0
        out["carry"].update({k: rec[k] for k in CARRIED if rec.get(k) is not None})
    return out


def prune_level(
    rep,
    level: int,
    masks: M.Masks,
    *,
    trained: dict | None = None,
    keep: dict[str, int] | int | None = None,
    invert: bool = False,
    state: dict | None = None,
) -> M.Masks:
    """Level `level`'s masks from `masks` (level L-1's): scored on L-1's trained weights (read from its final.pt
    unless given), or on the rewind-point weights (`pruning.when`, or the criterion's own). With `pruning.from_dense`
    every level prunes the dense network (level 0's weights, all-ones masks) to the count the level would have under
    the per-level rates. The scoring data and randomness depend only on (seed, level), so a branch calling this again
    gets the same scores; `keep` and `invert` are for such a branch (per-tensor counts, lowest scores kept). `state`:
    the rewind-point weights when they are not on disk yet (the collapse check before the first write)."""
    p = rep.cfg.pruning
    source = source_level(rep.cfg, level)  # the level whose masks (and trained weights) are pruned
    if p.from_dense:
        masks, trained = masks_before(rep, level), None
    if pruning.scores_at(p) == "after_training":
        state = trained if trained is not None else load_torch(rep.folder.final_path(source))
    elif state is None:
        state = rep.rewind_state

    def scoring_model(current: M.Masks):
        model = rep.new_model()
        model.load_state_dict(state)
        M.apply(model, current)
        return model

    model = scoring_model(masks)
    prunable = rep.prunable(model)
    if keep is None and p.from_dense and not p.one_shot:
        keep = pruning.level_survivors(
            counted(G.weights_only(masks, [q.name for q in prunable]), p), prunable, p, level
        )
    # built on first use: a criterion that reads no data draws no batch
    batches = iter(rep.batches(derive_seed(rep.seed, "score", level)))
    return pruning.prune(
        model,
        masks,
        prunable,
        p,
        keep_fraction=p.target if p.one_shot else None,
        rescore=scoring_model,
        keep=keep,
        invert=invert,
        batches=batches,
        generator=torch.Generator().manual_seed(derive_seed(rep.seed, "prune", level)),
    )


def branch_runs_at(p, name: str, level: int) -> bool:
    """Whether branch `name` runs on `level`'s ticket: at pruned levels (and level 0 for branches of the dense
    network), limited to pruning.branch_levels when it lists any."""
    if level == 0 and not BRANCHES[name].dense:
        return False
    return not p.branch_levels or level in p.branch_levels
