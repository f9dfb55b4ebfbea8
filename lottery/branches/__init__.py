"""Branches: what trains on a level's ticket besides the ticket itself (controls, ablations, linear mode connectivity).

- `base`: `Unit`, the typed `LevelContext` a branch sees, the registry `BRANCHES`, `register_branch`;
- `controls`: reinit, random_prune, shuffle, layer_shuffle, invert, retrain (registered here on import);
- `lmc`: linear mode connectivity and instability (registered here on import);
- `retraining`: finetune and lr_rewind (Renda et al. 2020), registered here on import.

Imports training (evaluation), pruning, masks and core; never the experiment that runs the branches.
"""

from lottery.branches import controls, lmc, retraining  # noqa: F401  (register the built-in branches)
from lottery.branches.base import (
    BRANCHES,
    Branch,
    LevelContext,
    Unit,
    branch_settings,
    check_levels,
    label,
    register_branch,
)

__all__ = ["BRANCHES", "Branch", "LevelContext", "Unit", "branch_settings", "check_levels", "label", "register_branch"]
