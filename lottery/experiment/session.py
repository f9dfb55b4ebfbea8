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
import functools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lottery.branches import BRANCHES, branch_settings
from lottery.config import typed
from lottery.core import device as D, threads
from lottery.core.files import repair_torn_line, save_json
from lottery.core.registry import as_dict
from lottery.core.signals import stop_if_asked
from lottery.core.steps import Steps, parse_steps
from lottery.data import DATASETS, load_pool, split
from lottery.experiment.check import checked
from lottery.experiment.folder import RunFolder
from lottery.experiment.plan import preflight
from lottery.experiment.replicate import Replicate
from lottery.experiment.tracking import Tracker
from lottery.training import choose
from lottery.training.cost import model_info, step_flops
from lottery.training.dst import dst_settings
from lottery.training.layouts import check_supported

log = logging.getLogger(__name__)


def replica_seeds(cfg) -> list[int] | None:
    """`replicas=R`: seeds seed, seed+1, ..., seed+R-1; `replicas=[s, ...]`: those seeds; null: no replicas."""
    r = cfg.get("replicas")
    if r is None:
        return None
    if OmegaConf.is_list(r) or isinstance(r, (list, tuple)):
        seeds = list(r)
        if (
            not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
            or len(set(seeds)) < len(seeds)
        ):
            raise ValueError(f"replicas must be a count >= 1 or a list of distinct integer seeds, got {list(r)}")
        return seeds
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"replicas must be a count >= 1 or a list of distinct integer seeds, got {r!r}")
    return [cfg.seed + i for i in range(r)]


def replicate_config(cfg: DictConfig, seed: int) -> DictConfig:
    """The config of the single run with this seed (what the replicate folder's config.yaml holds)."""
    out = OmegaConf.create(as_dict(cfg, resolve=False))
    OmegaConf.set_struct(out, False)
    out.seed = seed
    out.replicas = None
    return out


def resolve_steps(cfg, n_train: int) -> Steps:
    """Every duration of `cfg` in steps for a training set of `n_train` examples, with the checks that need it."""
    if not 0 < cfg.train.batch_size <= n_train:
        raise ValueError(
            f"train.batch_size must be in [1, {n_train}] (the training set size), got {cfg.train.batch_size}"
        )
    steps = Steps.resolve(cfg, n_train // cfg.train.batch_size)
    p = cfg.pruning
    if steps.rewind >= steps.total and (p.levels > 1 or p.target is not None or p.branches):
        raise ValueError(
            f"pruning.rewind={p.rewind} ({steps.rewind} steps) must come before the end of training "
            f"(train.duration={cfg.train.duration}, {steps.total} steps)"
        )
    t = cfg.train
    late = [
        m
        for m, k in zip(t.milestones, [parse_steps(m, steps.per_epoch, "train.milestones entry") for m in t.milestones])
        if k >= steps.total
    ]
    if late:
        fix = ",".join(f"{max(1, round(k * 0.75 * steps.total / steps.milestones[-1]))}it" for k in steps.milestones)
        raise ValueError(
            f"train.milestones={list(t.milestones)}: {', '.join(map(str, late))} is not inside the "
            f"training (train.duration={t.duration}, {steps.total} steps), so that decay would never "
            f"happen; accepted: milestones below {steps.total} steps, e.g. train.milestones=[{fix}] "
            f"(scaled so the last falls at three quarters of the run, as in the presets)"
        )
    if steps.warmup >= steps.total:
        raise ValueError(
            f"train.warmup={t.warmup} ({steps.warmup} steps) is not shorter than the training "
            f"(train.duration={t.duration}, {steps.total} steps); accepted: fewer than {steps.total} "
            f"steps"
        )
    rule, dst = dst_settings(cfg.get("dst"))
    if rule is not None:  # each mask updater knows what its settings need of the training's length
        rule.check_fit(dst, steps.total)
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
                raise ValueError(
                    f"branch '{name}' starts from step {k}, outside training (train.duration="
                    f"{cfg.train.duration}, {steps.total} steps); accepted: 0 to {steps.total - 1}"
                )
            out.add(k)
    return sorted(out - {0, steps.rewind})


@dataclass
class Session:
    replicates: list[Replicate]
    how: str  # how a level's units train: sequential, or a layout of lottery.training.layouts
    parent: Path | None  # the replicas parent folder, if any


# Replicates beyond which a replicas run says what it is about to cost before it starts.
MANY_REPLICATES = 64


def _check_parent(parent: Path, cfg, seeds: list[int]) -> list[int]:
    """A replicas parent holds replicas of one experiment: refuse a single run's folder and a parent of another
    experiment (naming the differing keys); returns the seeds replicas.json will list (earlier ones first)."""
    from lottery.core.files import load_json
    from lottery.experiment.folder import FolderRefused, differences

    if (parent / "config.yaml").exists():
        raise FolderRefused(
            f"{parent} holds a single run (its config.yaml), not replicas; choose another folder with "
            f"hydra.run.dir=..., or drop replicas to resume that run"
        )
    path = parent / "replicas.json"
    if not path.exists():
        return list(seeds)
    try:
        old = load_json(path)
    except (OSError, ValueError) as e:
        raise FolderRefused(
            f"{path} is unreadable ({type(e).__name__}); what this replicas folder holds is unknown: "
            f"choose another folder with hydra.run.dir=..., or restore the file"
        ) from None
    if "config" in old:
        from lottery.config import EXTENDING_KEYS

        diff = differences(old["config"], _parent_config(cfg))
        if diff and not set(diff) <= set(EXTENDING_KEYS):  # more levels: each replicate's folder decides
            raise FolderRefused(
                f"replicas folder {parent} already holds replicates of a different experiment "
                f"(differs in: {', '.join(diff)}); choose another folder with hydra.run.dir=... or "
                f"rerun with the same settings to resume or add replicates"
            )
    return list(dict.fromkeys([*old.get("replicas", []), *seeds]))


def _parent_config(cfg) -> dict:
    """What a replicas parent records of its experiment: the config without the keys that tell replicates apart."""
    out = as_dict(cfg, resolve=True)
    for key in ("seed", "data_seed", "replicas"):
        out.pop(key, None)
    return out


def _cost_warning(cfg, seeds: list[int], model, device) -> str | None:
    """For many replicates: what a level will hold in memory and cost in time, before anything starts."""
    if len(seeds) < MANY_REPLICATES:
        return None
    networks = len(seeds) * (1 + len(cfg.pruning.branches))
    params = sum(p.numel() for p in model.parameters())
    # weights, gradients, two optimizer moments and the mask, float32, per network of a level's batch
    need = networks * params * 4 * 5
    if device.type == "cuda":
        have = torch.cuda.mem_get_info(device)[1]
        where = "GPU memory"
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        where = "memory"
    return (
        f"replicas={len(seeds)}: a level trains up to {networks} networks together ({len(seeds)} replicates x "
        f"{1 + len(cfg.pruning.branches)} units), about {need / 2**30:.1f} GiB of weights, gradients, optimizer "
        f"state and masks ({100 * need / have:.0f}% of this machine's {have / 2**30:.0f} GiB of {where}) before "
        f"activations and checkpoints, and about {len(seeds)} times a single run's training time: batched "
        f"replicas save per-step overhead, not arithmetic. Fewer replicates per job (a sweep over seed lists) "
        f"spread them over jobs"
    )


def _extension(rep: Replicate, old: dict) -> str | None:
    """None when `rep`'s config extends the run `old` (its config.yaml) with more levels, which leaves every level it
    has as it is: IMP's level L keeps the same count whatever the number of levels (pruning.rate per level; a target
    only says when to stop). Otherwise why not. Sets `rep.extends` to (old levels, new levels)."""
    from lottery import masks as M
    from lottery.experiment.plan import level_count

    if (old.get("pruning") or {}).get("one_shot") or rep.cfg.pruning.one_shot:
        return "one-shot pruning goes straight to pruning.target, so another target is another pruned level"
    model = rep.new_model()
    prunable = rep.prunable(model)
    before = level_count(OmegaConf.create(old), M.ones(model, prunable), prunable)
    after = level_count(rep.cfg, M.ones(model, prunable), prunable)
    if after < before:
        return (
            f"the folder holds {before} levels and this command asks for {after}; fewer levels would leave "
            f"its later ones out of its config (lottery-report reads any level of the folder as it is)"
        )
    rep.extends = (before, after)
    return None


@contextlib.contextmanager
def open_session(
    cfg: DictConfig, run_dir, *, ticket=None, on_owned: Callable[[Path], None] | None = None
) -> Iterator[Session]:
    """Check, lock, load, check again, then (the folders are this process's now) call `on_owned(run_dir)`, write,
    and yield the session; close the trackers on leaving. `ticket` (lottery-retrain): the ticket to retrain, which
    must fit the model and come before the end of training. Nothing is logged before the folders are owned either:
    the log file lives in the run folder."""
    cfg = checked(cfg)
    seeds = replica_seeds(cfg)
    if ticket is not None:
        from lottery.experiment.ticket import check_fits_config

        if seeds is not None:
            raise ValueError(
                f"lottery-retrain trains one ticket and takes no replicas (got replicas={cfg.replicas}); "
                f"retrain each replicate's ticket, or drop replicas"
            )
        check_fits_config(ticket, cfg)  # another model's ticket: one clear error before the folder is touched
    device, info, warnings, described = D.setup(cfg)
    run_dir = Path(run_dir)
    parent = run_dir if seeds is not None else None
    configs = [replicate_config(cfg, s) for s in seeds] if seeds is not None else [cfg]
    folders = [RunFolder(run_dir / f"replicate_{s}") for s in seeds] if seeds is not None else [RunFolder(run_dir)]
    how = "sequential"
    with contextlib.ExitStack() as stack:
        stop_if_asked("before set-up")
        if parent is not None:
            stack.enter_context(RunFolder(parent).lock())
            assert seeds is not None  # a parent folder is a replicas run's
            listed = _check_parent(parent, cfg, seeds)
        elif RunFolder(run_dir).holds_replicas():
            from lottery.experiment.folder import FolderRefused

            raise FolderRefused(
                f"{run_dir} holds replicas (replicas.json, replicate_<seed>/ folders), not a single "
                f"run; rerun with the same replicas=... to resume them, resume one replicate in "
                f"{run_dir}/replicate_<seed>, or choose another folder with hydra.run.dir=..."
            )
        for folder in folders:
            stack.enter_context(folder.lock())
        pools, reps, resumed = {}, [], []
        for rcfg, folder in zip(configs, folders):
            stop_if_asked("during set-up")
            d = rcfg.dataset
            key = rcfg.seed if DATASETS[d.name].seeded else None  # seeded data: one pool per replicate
            if key not in pools:
                pools[key] = load_pool(d, device=device, seed=rcfg.seed)
            data = split(pools[key], d.val_size, rcfg.seed)
            steps = resolve_steps(rcfg, data.n_train)
            if ticket is not None and ticket.rewind_step >= steps.total:
                raise ValueError(
                    f"the ticket rewinds to step {ticket.rewind_step}, past the end of training ({steps.total} steps)"
                )
            resolved = as_dict(rcfg, resolve=True)
            # below this point the run reads typed settings, not the DictConfig (the folder keeps `resolved`)
            rep = Replicate(typed(resolved), folder, data, steps, capture_steps(rcfg, steps), device, info)
            if seeds is not None:
                rep.name = f"replicate {rcfg.seed}: "
            rep.resolved = resolved
            if folder.check_config(rep.resolved, extends=functools.partial(_extension, rep)):
                folder.check_files()
                resumed.append(folder.path)
            reps.append(rep)
        model = reps[0].new_model()
        for rep in reps:
            preflight(rep, model)
        if seeds is not None:
            how = choose(cfg.get("replica_batching") or "auto", model, device)
            if how == "stacked":
                check_supported(model, cfg.model.name)
            warning = _cost_warning(cfg, seeds, model, device)
            if warning:
                warnings.append(warning)
        # the thread count depends on the size of a training step (lottery.core.threads); nothing before this point
        # computes anything whose result depends on it. Stacked replicas keep every core: R networks' step is one
        # large one (LeNet-300-100, R = 8: 48,281 samples/s on two threads, 26,870 on one; docs/benchmarks.md)
        flops = step_flops(model_info(model, reps[0].split.pool.input_shape), None, cfg.train.batch_size)
        stack.callback(torch.set_num_threads, torch.get_num_threads())  # a caller in this process gets its own back
        chosen = threads.set_threads(cfg, None if how == "stacked" else flops)
        for rep in reps:
            rep.evaluation_threads = chosen.evaluation
        if device.type == "cpu":
            info["threads"] = torch.get_num_threads()  # CPU results depend on it: device.json records it
        if seeds is not None:
            info["batching"] = how  # so do replicas' results, at round-off: a resume another way is warned about
        for rep in reps:
            warning = D.check_folder(rep.folder.path, info, rep.cfg.device)
            if warning and warning not in warnings:
                warnings.append(warning)
        stop_if_asked("during set-up")
        # every check has passed: the folders are this process's, and from here on they are written
        if on_owned is not None:
            on_owned(run_dir)
        log.info("run folder %s; %s; %s", run_dir, described, threads.describe())
        for warning in warnings:
            log.warning(warning)
        if resumed:
            log.info(
                "resuming %s",
                resumed[0] if len(resumed) == 1 else f"{len(resumed)} of {len(folders)} replicate folders in {parent}",
            )
        extended = [rep.extends for rep in reps if rep.extends]
        if extended and extended[0][1] > extended[0][0]:
            log.info(
                "extending the run from %d to %d levels (level 0 included); the levels it has stay as they are",
                *extended[0],
            )
        if parent is not None:
            save_json(
                {"replicas": listed, "folders": [f"replicate_{s}" for s in listed], "config": _parent_config(cfg)},
                parent / "replicas.json",
            )
        for rep in reps:
            repair_torn_line(rep.folder.metrics)
            rep.folder.clean()
            rep.folder.write_config(rep.resolved)
            save_json(info, rep.folder.path / "device.json")
            rep.tracker = Tracker(rep.folder.path, rep.cfg, rep.resolved, group=cfg.name)
        ok = False
        try:
            yield Session(reps, how, parent)
            ok = True
        finally:
            for rep in reps:
                rep.tracker.finish(rep.folder.results(), ok=ok)
