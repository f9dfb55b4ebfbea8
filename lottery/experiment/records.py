"""The record of a trained unit: what `result.json` holds and, without its curves, one row of `summary.json`, the
W&B level metrics, the report's tables and figures.

This is the one place a record's fields are made. Every metric of the training result (the final and early-stop
values of every evaluation metric, lottery.training.evaluation.batch_sums) is copied as it is, so a new evaluation
metric reaches the records, summary.json, the report and W&B without an edit here; a new field that is not an
evaluation metric (a count, a cost, an analysis) is added in `unit_record` and nowhere else.
"""

from __future__ import annotations

import math

from lottery import masks as M
from lottery.core.provenance import provenance
from lottery.training import cost

# Keys of a result file that stay there and out of summary.json: whole curves (training evaluations, an analysis's,
# the layer densities after each mask update of dynamic sparse training).
DETAIL_KEYS = ("evals", "curves", "mask_changes", "mask_distances")
# Keys of a training result that describe the loop rather than the network (not copied into the record).
_LOOP_KEYS = ("evals", "final_step", "mask_changes", "gradient_steps")


def at_chance(accuracy, num_classes: int, n: int, majority: float = 0.0) -> bool:
    """Whether a test accuracy is what guessing gives: within three binomial standard deviations of the better of
    1 / classes and `majority`, the most frequent class's share of the `n` test examples (a network that predicts
    that class for everything scores exactly it: MNIST's digit 1, 0.1135; it learned nothing)."""
    if accuracy is None or n == 0:
        return False
    chance = max(1 / num_classes, majority)
    return accuracy <= chance + 3 * math.sqrt(chance * (1 - chance) / n)


def majority_share(labels) -> float:
    """The most frequent class's share of `labels` (a tensor of class indices)."""
    return float(labels.bincount().max()) / len(labels) if len(labels) else 0.0


def training_cost(rep, model, masks: M.Masks, result: dict) -> dict:
    """What the unit's own training cost: optimizer steps, and FLOPs at the masks it trained with (each segment between
    mask updates at its densities, RigL's update steps with their dense weight gradient), and dense."""
    if getattr(rep, "cost_info", None) is None:
        rep.cost_info = cost.model_info(model, rep.split.pool.input_shape)
    structured = rep.cfg.pruning.granularity == "channel"
    counter = cost.TrainingCost(rep.cost_info, rep.cfg.train.batch_size, structured=structured)
    # channel tickets: the masks themselves, whose removed channels also remove the next layer's inputs in the
    # structured count; they never change during training (the one updater that accepts channel masks, early-bird,
    # only watches them)
    changes = result.get("mask_changes")
    if structured:
        assert not changes or len(changes) == 1, "channel masks changed during training"
        changes = [[result["start_step"], masks]]
    changes = changes or [[result["start_step"], M.density(masks)]]
    gradient_steps = result.get("gradient_steps") or []
    ends = [s for s, _ in changes[1:]] + [result["final_step"]]
    for (begin, densities), end in zip(changes, ends):
        counter.add(end - begin, densities, dense_weight_grad_steps=sum(begin < g <= end for g in gradient_steps))
    return {"train_steps": counter.steps, "train_flops": counter.flops_sparse, "train_flops_dense": counter.flops_dense}


def unit_record(
    rep,
    level: int,
    branch: str,
    model,
    masks: M.Masks,
    result: dict,
    unit: str = "",
    deps: dict | None = None,
    wall_time: float | None = None,
) -> dict:
    """The record of one trained unit of replicate `rep` at `level`, from its training `result`; `deps`: the training
    its masks depended on (earlier levels), which `cost_steps` and `cost_flops` add to the unit's own; `wall_time`:
    seconds of the training call that trained it (shared by the units trained together), in this process."""
    cfg = rep.cfg
    weights = M.counted(masks, model, cfg.pruning)
    remaining, total = M.count(weights)
    record = {
        "level": level,
        "branch": branch,
        "replicate": cfg.seed,
        "weights_remaining": remaining / total if total else 1.0,
        "params_remaining": M.params_remaining(model, masks),
        "weights_remaining_count": remaining,
        "weights_total": total,
        "layer_density": M.density(weights),
        **{k: v for k, v in result.items() if k not in _LOOP_KEYS and k != "last_finite_step"},
        "experiment": cfg.name,
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "init": cfg.init._target_ or cfg.init.name,
        "device_info": rep.device_info,
        "provenance": provenance(),
        "wall_time_s": wall_time,
    }
    if cfg.pruning.granularity == "channel":
        record["channels_remaining"] = {
            n: int((m.reshape(m.shape[0], -1) != 0).any(dim=1).sum()) for n, m in weights.items()
        }
    own = training_cost(rep, model, masks, result)
    deps = deps or {}
    record.update(deps.get("carry") or {})  # what the training its masks came from says of itself (early-bird draw)
    record.update(
        own, cost_steps=own["train_steps"] + deps.get("steps", 0), cost_flops=own["train_flops"] + deps.get("flops", 0)
    )
    pool = rep.split.pool
    # a run whose losses stay finite but that ends at chance (Adam at a huge rate, say) is a failed run too
    if getattr(pool, "majority", None) is None:
        pool.majority = majority_share(pool.test_y)
    record["at_chance"] = at_chance(result.get("test_accuracy"), pool.num_classes, len(pool.test_y), pool.majority)
    if result["diverged"]:
        record["last_finite_step"] = result["last_finite_step"]
    if unit:
        record["unit"] = unit
    return record


def without_details(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in DETAIL_KEYS}
