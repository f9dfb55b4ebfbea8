"""Training: the one loop that trains one network or many, and what it is made of.

- `loop`: `train(networks, run, start=, steps=, layout=)` (`run`: a `Training`, the typed settings it reads),
  `Network`, `Hooks`: schedule, evaluation, divergence, checkpoints and results, the same for every layout;
- `layouts`: how N networks compute (`interleaved`, the single run when N = 1; `stacked`), `choose` (replicas' auto);
- `optimizers`: the registry `OPTIMIZERS` (sgd, adam, adamw), `register_optimizer`, `make_optimizer`;
- `schedule`: the learning rate as a function of the step;
- `evaluation`: `evaluate` on a whole split, the early-stop step;
- `updaters`: the mask-updater protocol (`MaskUpdater`, `register_updater`, the registry `UPDATERS`): what changes
  masks during training; built-ins in `dst` (set, rigl), `gmp` (gradual magnitude pruning) and `early_bird`,
  registered here.

Imports data, masks, the config schema's dataclasses and core.
"""

from lottery.training import dst, early_bird, gmp  # noqa: F401  (register the built-in updaters)
from lottery.training.evaluation import EVAL_CHUNK, batch_sums, early_stop, eval_chunk, evaluate, metric_names
from lottery.training.layouts import BATCHING, LAYOUTS, choose
from lottery.training.loop import Hooks, Network, Training, train
from lottery.training.optimizers import OPTIMIZERS, make_optimizer, optimizer_settings, register_optimizer
from lottery.training.schedule import lr_schedule
from lottery.training.updaters import UPDATERS, Layer, MaskUpdater, register_updater

__all__ = [
    "BATCHING",
    "EVAL_CHUNK",
    "LAYOUTS",
    "OPTIMIZERS",
    "UPDATERS",
    "Hooks",
    "Layer",
    "MaskUpdater",
    "Network",
    "Training",
    "batch_sums",
    "choose",
    "early_stop",
    "eval_chunk",
    "evaluate",
    "lr_schedule",
    "make_optimizer",
    "metric_names",
    "optimizer_settings",
    "register_optimizer",
    "register_updater",
    "train",
]
