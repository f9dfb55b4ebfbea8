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

# Keys of a result file that stay there and out of summary.json: whole curves (training evaluations, an analysis's).
DETAIL_KEYS = ("evals", "curves")
# Keys of a training result that describe the loop rather than the network (not copied into the record).
_LOOP_KEYS = ("evals", "final_step")


def at_chance(accuracy, num_classes: int, n: int) -> bool:
    """Whether a test accuracy is what guessing gives: within three binomial standard deviations of 1 / classes on
    `n` examples (a network that predicts one class for everything lands here: it learned nothing)."""
    if accuracy is None or n == 0:
        return False
    chance = 1 / num_classes
    return accuracy <= chance + 3 * math.sqrt(chance * (1 - chance) / n)


def unit_record(rep, level: int, branch: str, model, masks: M.Masks, result: dict, unit: str = "") -> dict:
    """The record of one trained unit of replicate `rep` at `level`, from its training `result`."""
    remaining, total = M.count(masks)
    cfg = rep.cfg
    record = {"level": level, "branch": branch, "replicate": cfg.seed,
              "weights_remaining": remaining / total if total else 1.0,
              "params_remaining": M.params_remaining(model, masks),
              "weights_remaining_count": remaining, "weights_total": total, "layer_density": M.density(masks),
              **{k: v for k, v in result.items() if k not in _LOOP_KEYS and k != "last_finite_step"},
              "experiment": cfg.name, "model": cfg.model.name, "dataset": cfg.dataset.name,
              "init": cfg.init.get("_target_") or cfg.init.name, "device_info": rep.device_info}
    pool = rep.split.pool
    # a run whose losses stay finite but that ends at chance (Adam at a huge rate, say) is a failed run too
    record["at_chance"] = at_chance(result.get("test_accuracy"), pool.num_classes, len(pool.test_y))
    if result["diverged"]:
        record["last_finite_step"] = result["last_finite_step"]
    if unit:
        record["unit"] = unit
    return record


def without_details(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in DETAIL_KEYS}
