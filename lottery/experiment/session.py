"""One command's set-up and tear-down, the same for `lottery-train` (one replicate or R) and `lottery-retrain`.

Order matters: everything that can be wrong is found before the first byte is written. `open_session`
1. checks the config (lottery.experiment.check: names, settings, ranges, paths) and expands it;
2. takes the lock of every folder it will write (the replicas parent and each replicate's folder);
3. loads the data (one pool per dataset, or per seed for seeded datasets) and splits it per replicate;
4. resolves every duration in steps and checks what depends on the data (batch size, rewind point, the steps branches
   start from) and, for a folder that exists, that it holds the same experiment and ran on compatible hardware;
5. only then writes: replicas.json, each folder's config.yaml and device.json, and opens the trackers;
and on leaving closes every tracker (W&B's run is finished as failed when the body raised).
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from lottery.branches import BRANCHES, branch_settings
from lottery.core import device as D
from lottery.core.files import save_json
from lottery.core.steps import Steps
from lottery.data import DATASETS, load_pool, split
from lottery.experiment.check import checked
from lottery.experiment.folder import RunFolder
from lottery.experiment.replicate import Replicate
from lottery.experiment.tracking import Tracker
from lottery.training import choose
from lottery.training.layouts import check_supported

log = logging.getLogger(__name__)


def set_threads(cfg) -> None:
    """CPU threads: `threads` when set, else the CPUs SLURM gave the job, else PyTorch's default (every core).

    Small models on a busy CPU are much faster with fewer threads: PyTorch's parallel regions wait for every thread,
    so one core taken by another process stalls each operation (measured here: a BatchNorm on 32x4x32x32 took 23 ms
    with 2 threads next to a busy process, 0.27 ms with 1)."""
    cpus = cfg.threads or os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and str(cpus).isdigit():
        torch.set_num_threads(int(cpus))


def replica_seeds(cfg) -> Optional[list[int]]:
    """`replicas=R`: seeds seed, seed+1, ..., seed+R-1; `replicas=[s, ...]`: those seeds; null: no replicas."""
    r = cfg.get("replicas")
    if r is None:
        return None
    if OmegaConf.is_list(r) or isinstance(r, (list, tuple)):
        seeds = list(r)
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) \
                or len(set(seeds)) < len(seeds):
            raise ValueError(f"replicas must be a count >= 1 or a list of distinct integer seeds, got {list(r)}")
        return seeds
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"replicas must be a count >= 1 or a list of distinct integer seeds, got {r!r}")
    return [cfg.seed + i for i in range(r)]


def replicate_config(cfg: DictConfig, seed: int) -> DictConfig:
    """The config of the single run with this seed (what the replicate folder's config.yaml holds)."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    OmegaConf.set_struct(out, False)
    out.seed = seed
    out.replicas = None
    return out


def resolve_steps(cfg, n_train: int) -> Steps:
    """Every duration of `cfg` in steps for a training set of `n_train` examples, with the checks that need it."""
    if not 0 < cfg.train.batch_size <= n_train:
        raise ValueError(f"train.batch_size must be in [1, {n_train}] (the training set size), got "
                         f"{cfg.train.batch_size}")
    steps = Steps.resolve(cfg, n_train // cfg.train.batch_size)
    p = cfg.pruning
    if steps.rewind >= steps.total and (p.levels > 1 or p.target is not None or p.branches):
        raise ValueError(f"pruning.rewind={p.rewind} ({steps.rewind} steps) must come before the end of training "
                         f"(train.duration={cfg.train.duration}, {steps.total} steps)")
    return steps


def capture_steps(cfg, steps: Steps) -> list[int]:
    """Steps of level 0 whose state the branches in pruning.branches start from (besides 0 and the rewind step)."""
    out = set()
    for name in cfg.pruning.branches:
        capture = BRANCHES[name].capture
        if capture is None:
            continue
        for k in capture(branch_settings(name, cfg), steps):
            if not 0 <= k < steps.total:
                raise ValueError(f"branch '{name}' starts from step {k}, outside training (train.duration="
                                 f"{cfg.train.duration}, {steps.total} steps); accepted: 0 to {steps.total - 1}")
            out.add(k)
    return sorted(out - {0, steps.rewind})


@dataclass
class Session:
    replicates: list[Replicate]
    how: str  # how a level's units train: sequential, or a layout of lottery.training.layouts
    parent: Optional[Path]  # the replicas parent folder, if any


@contextlib.contextmanager
def open_session(cfg: DictConfig, run_dir, *, ticket=None) -> Iterator[Session]:
    """Check, lock, load, check again, write, then yield the session; close the trackers on leaving. `ticket`
    (lottery-retrain): the ticket to retrain, which must fit the model and come before the end of training."""
    cfg = checked(cfg)
    seeds = replica_seeds(cfg)
    if ticket is not None:
        from lottery.experiment.ticket import check_fits_config
        if seeds is not None:
            raise ValueError(f"lottery-retrain trains one ticket and takes no replicas (got replicas={cfg.replicas}); "
                             f"retrain each replicate's ticket, or drop replicas")
        check_fits_config(ticket, cfg)  # another model's ticket: one clear error before the folder is touched
    set_threads(cfg)
    device, info = D.setup(cfg)
    run_dir = Path(run_dir)
    parent = run_dir if seeds is not None else None
    configs = [replicate_config(cfg, s) for s in seeds] if seeds is not None else [cfg]
    folders = [RunFolder(parent / f"replicate_{s}") for s in seeds] if seeds is not None else [RunFolder(run_dir)]
    how = "sequential"
    with contextlib.ExitStack() as stack:
        if parent is not None:
            stack.enter_context(RunFolder(parent).lock())
        for folder in folders:
            stack.enter_context(folder.lock())
        pools, reps = {}, []
        for rcfg, folder in zip(configs, folders):
            d = rcfg.dataset
            key = rcfg.seed if DATASETS[d.name].seeded else None  # seeded data: one pool per replicate
            if key not in pools:
                pools[key] = load_pool(d, device=device, seed=rcfg.seed)
            data = split(pools[key], d.val_size, rcfg.seed)
            steps = resolve_steps(rcfg, data.n_train)
            if ticket is not None and ticket.rewind_step >= steps.total:
                raise ValueError(f"the ticket rewinds to step {ticket.rewind_step}, past the end of training "
                                 f"({steps.total} steps)")
            rep = Replicate(rcfg, folder, data, steps, capture_steps(rcfg, steps), device, info)
            rep.resolved = OmegaConf.to_container(rcfg, resolve=True)
            if folder.check_config(rep.resolved):
                log.info("resuming run in %s", folder.path)
            D.check_folder(folder.path, info, rcfg.device)
            reps.append(rep)
        if seeds is not None:
            model = reps[0].new_model()
            how = choose(cfg.get("replica_batching") or "auto", model, device)
            if how == "stacked":
                check_supported(model, cfg.model.name)
        # every check has passed: from here on, the folders are written
        if parent is not None:
            save_json({"replicas": seeds, "folders": [f.path.name for f in folders]}, parent / "replicas.json")
        for rep in reps:
            rep.folder.write_config(rep.resolved)
            save_json(info, rep.folder.path / "device.json")
            rep.tracker = Tracker(rep.folder.path, rep.cfg, rep.resolved, group=cfg.name, concurrent=parent is not None)
        ok = False
        try:
            yield Session(reps, how, parent)
            ok = True
        finally:
            for rep in reps:
                rep.tracker.finish(rep.folder.results(), ok=ok)
