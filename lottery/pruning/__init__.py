"""Pruning: criteria score weights, one shared selection turns scores into masks, a schedule says when and how much.

- `criteria`: the registry `CRITERIA` of scoring functions (magnitude, random), `register_criterion`;
- `pai`: the pruning-at-initialization criteria (magnitude_init, SNIP, GraSP, SynFlow), registered here on import;
- `selection`: exact counts, survivors only, stable ties, layerwise or global, never an emptied tensor;
- `schedule`: the per-level rates, one-shot targets and rounds (`prune`), counts per level (`plan_counts`);
- `densities`: per-tensor densities and exact counts from one global density (uniform, er, erk as in RigL);
- `transforms`: random and shuffled masks for the controls;
- `granularity`: channel and N:M views (`pruning.granularity`): scores per group, whole groups selected, per-weight
  masks (with the bias and BatchNorm entries of removed channels) back.

Imports masks and core only.
"""

from lottery.pruning import pai  # noqa: F401  (registers the pruning-at-initialization criteria)
from lottery.pruning.criteria import CRITERIA, Criterion, criterion_settings, register_criterion, score, scores_at
from lottery.pruning.densities import DISTRIBUTIONS, allocate, distribution, survivor_counts
from lottery.pruning.schedule import layer_rates, level_survivors, plan_counts, prune, survivors_after
from lottery.pruning.selection import round_half_up, select_global, select_layerwise
from lottery.pruning.transforms import random_like, shuffle

__all__ = [
    "CRITERIA",
    "DISTRIBUTIONS",
    "Criterion",
    "allocate",
    "criterion_settings",
    "distribution",
    "layer_rates",
    "level_survivors",
    "plan_counts",
    "prune",
    "random_like",
    "register_criterion",
    "round_half_up",
    "score",
    "scores_at",
    "select_global",
    "select_layerwise",
    "shuffle",
    "survivor_counts",
    "survivors_after",
]
