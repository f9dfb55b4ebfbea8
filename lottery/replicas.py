"""Replicas: R replicates of one experiment in one process, trained together (lottery.batched).

    <run dir>/replicas.json          the seeds and their folders (the parent holds no run of its own)
    <run dir>/replicate_<seed>/      a normal run folder, exactly as `lottery-train seed=<seed>` writes it

Each replicate keeps its own initialization, validation split, data order and augmentation (those of the single run
with its seed) and its own folder, so `lottery-report`, resume and sweeps see ordinary runs; a replicate folder can
even be resumed alone with `lottery-train seed=<seed> hydra.run.dir=<run dir>/replicate_<seed>`. The replicates step
through the levels in lockstep: at level 0 their dense tickets train as one batch (then the branches that run on the
dense network); at level L every replicate prunes its own masks, and its ticket plus every branch unit of the level
train as one batch, grouped by start step (the controls start at the rewind step like the ticket, so one level of R
replicates with three controls is one batch of 4R networks). Branch analyses run once their units are trained.
"""
from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from lottery import batched
from lottery.core.signals import hand_over
from lottery.core.files import save_json
from lottery.config import validate
from lottery.data import load_pool, split
from lottery.folder import RunFolder
from lottery import masks as M
from lottery.branches import BRANCHES, LevelContext, branch_settings
from lottery.core.files import load_torch, save_torch
from lottery.core.divergence import Diverged
from lottery.imp import Job, Run, cpu_state, level_count, set_threads
from lottery.models import build_model
from lottery.core.signals import Preempted
from lottery.core.device import resolve_device

log = logging.getLogger(__name__)


def replica_seeds(cfg) -> list[int] | None:
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


def check_model(cfg) -> None:
    """Before any work: a model the chosen layout cannot train fails with one line naming it."""
    from lottery.data import _SHAPES
    kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    name = kwargs.pop("name")
    shape = _SHAPES.get(cfg.dataset.name, _SHAPES.get(cfg.dataset.synthetic_shape, (1, 28, 28)))
    model = build_model(name, shape, 10, **kwargs)
    if layout(cfg, model) == "stacked":
        batched.check_supported(model, name)


def run_replicas(cfg: DictConfig, run_dir) -> list[dict]:
    """Run (or resume) `cfg` once per replicate seed, batched; returns every replicate's summary records."""
    validate(cfg)
    seeds = replica_seeds(cfg)
    if (cfg.get("replica_batching") or "auto") not in BATCHING:
        raise ValueError(f"unknown replica_batching '{cfg.replica_batching}'; accepted: {', '.join(BATCHING)}")
    check_model(cfg)
    set_threads(cfg)
    parent = Path(run_dir)
    parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        stack.enter_context(RunFolder(parent).lock())
        save_json({"replicas": seeds, "folders": [f"replicate_{s}" for s in seeds]}, parent / "replicas.json")
        runs, pools = [], {}
        for seed in seeds:
            rcfg = replicate_config(cfg, seed)
            folder = RunFolder(parent / f"replicate_{seed}")
            stack.enter_context(folder.lock())
            d = rcfg.dataset
            # One pool per dataset; synthetic data is drawn from the replicate seed, so it has one per seed.
            key = seed if d.name == "synthetic" else None
            if key not in pools:
                pools[key] = load_pool(d.name, d.root, val_size=d.val_size, download=d.download, verify=d.verify,
                                       augment=d.augment, device=resolve_device(rcfg.device),
                                       synthetic_shape=d.synthetic_shape, synthetic_train=d.synthetic_train,
                                       synthetic_test=d.synthetic_test, synthetic_seed=seed)
            run = Run(rcfg, folder, folder.prepare(rcfg), split=split(pools[key], d.val_size, seed),
                      concurrent_tracking=True)
            run.fault_marker = parent / ".fault_fired"  # test faults fire once per batched run, not per replicate
            runs.append(run)
        ok = False
        try:
            out = _run_levels(runs)
            ok = True
            return out
        finally:
            for run in runs:
                run.tracker.finish(run.folder.results(), ok=ok)


class Lineage:
    """One replicate's IMP state across levels, as lottery.imp._run_levels keeps it for a single run: its model,
    masks, the trained weights the next level prunes, and its diverged units."""

    def __init__(self, run: Run):
        self.run = run
        cfg, folder = run.cfg, run.folder
        self.model = model = run.new_model(init_seed=cfg.seed)
        if folder.init.exists():
            model.load_state_dict(load_torch(folder.init))
        else:
            save_torch(cpu_state(model), folder.init)
        self.init_state = cpu_state(model)
        self.prunable = M.prunable_tensors(model, cfg.pruning)
        self.n_levels = level_count(cfg, M.ones(model, self.prunable), self.prunable)
        if self.n_levels > 1 and not self.prunable:
            raise ValueError("nothing to prune: pruning.exclude removed every prunable tensor")
        self.masks = M.ones(model, self.prunable)
        if run.steps.rewind == 0 and not folder.rewind.exists():
            run.set_rewind_state(self.init_state)
        self.trained = None  # level L-1's trained weights while this process has them
        self.ticket: dict = {}
        self.diverged: list[dict] = []
        self.stopped = False  # its ticket diverged: no further levels

    def check(self, record: dict) -> None:
        if record.get("diverged"):
            self.diverged.append(record)
            if self.run.cfg.train.on_divergence == "stop":
                raise Diverged(self.diverged, stopped=True)

    def enter(self, level: int) -> bool:
        """Set the level's masks (the saved ticket's, or pruned from level L-1); False: this level is skipped."""
        run, folder = self.run, self.run.folder
        if self.stopped:
            return False
        if level == 0:
            return bool(run.cfg.pruning.train_dense)
        if folder.has_ticket(level):
            self.masks = M.from_bool(folder.load_ticket(level).masks, self.model)
        else:
            self.masks = run.prune_level(level, self.masks, trained=self.trained)
        return True

    def ticket_job(self, level: int) -> Optional[Job]:
        run, folder, model, masks = self.run, self.run.folder, self.model, self.masks
        if folder.done(level, "ticket"):
            self.ticket = folder.load_result(level, "ticket")
            self.trained = None
            return None
        start, at_step, finish_ticket = run.prepare_ticket(level, model, masks, self.init_state)
        return Job(run, level, "ticket", model, masks, start, at_step=at_step, on_done=finish_ticket)

    def ticket_trained(self, level: int, record: dict) -> None:
        self.ticket = record
        self.trained = cpu_state(self.model)
        self.run.tracker.artifact(self.run.folder.ticket_path(level), f"ticket-level{level}")

    def branch_plans(self, level: int) -> list:
        """Plans of the level's branches without a record; the records of the others are checked."""
        run, cfg = self.run, self.run.cfg
        plans = []
        for name in cfg.pruning.branches:
            if level == 0 and not BRANCHES[name].dense:
                continue
            if run.folder.done(level, name):
                self.check(run.folder.load_result(level, name))
                continue
            plans.append(run.plan_branch(LevelContext(run, level, name, self.masks, run.steps.rewind,
                                                      run.rewind_state, branch_settings(name, cfg))))
        return plans


def _run_levels(runs: list[Run]) -> list[dict]:
    lineages = [Lineage(run) for run in runs]
    for level in range(lineages[0].n_levels):
        active = [lin for lin in lineages if lin.enter(level)]
        jobs = {id(lin): (lin, lin.ticket_job(level)) for lin in active}
        jobs = {k: v for k, v in jobs.items() if v[1] is not None}
        done_tickets = {}

        def ticket_done(job, record):
            done_tickets[id(job)] = record

        if level == 0:  # the dense branches need the rewind point, which level 0's ticket passes on its way
            execute([j for _, j in jobs.values()], on_record=ticket_done)
            for lin, job in jobs.values():
                lin.ticket_trained(level, done_tickets[id(job)])
            jobs = {}
        for lin in active:
            lin.check(lin.ticket)
        plans = [plan for lin in active for plan in lin.branch_plans(level)]
        units = {id(job): (plan, i) for plan in plans for i, job in plan.jobs}

        def on_record(job, record):
            if id(job) in units:
                plan, i = units[id(job)]
                plan.records[i] = record
            else:
                done_tickets[id(job)] = record

        execute([*(j for _, j in jobs.values()), *(job for plan in plans for _, job in plan.jobs)],
                on_record=on_record)
        for lin, job in jobs.values():
            lin.ticket_trained(level, done_tickets[id(job)])
            lin.check(lin.ticket)
        for plan in plans:
            record = plan.ctx.run.finish_branch(plan)
            next(lin for lin in active if lin.run is plan.ctx.run).check(record)
        for lin in active:
            lin.run.release_data()
            if lin.ticket.get("diverged"):
                lin.stopped = True  # a diverged ticket is never pruned to make the next level
        runs[0].fault_after_level(level)
    summaries = [rec for run in runs for rec in run.folder.write_summary()]
    diverged = [r for lin in lineages for r in lin.diverged]
    if diverged:  # train.on_divergence=continue: the units that did not depend on it are done; the run still failed
        raise Diverged(diverged, stopped=False)
    return summaries


BATCHING = ("auto", "stacked", "interleaved", "sequential")


def layout(cfg, model) -> str:
    """`replica_batching` resolved: stacked | interleaved | sequential. auto = stacked, except models with
    convolutions on a CPU and models with layers `batched.stack` cannot batch, which go interleaved.

    Measured on the 2-core CPU (2026-11-29, scripts/bench.py --replicas 8, real data, batch 60, Adam, two threads):
    8 Conv-2 networks stacked ran at 0.62x the single-run loop run 8 times, interleaved at 1.03x. The grouped
    convolutions cost what 8 single ones do, but the element-wise work (ReLU, pooling, their gradients) over 8x larger
    activations falls out of the 32 MB cache into freshly page-faulted memory; interleaved keeps every activation the
    size of a single run's. 8 LeNet-300-100 networks stacked: 1.82x. On a GPU stacking is what fills the device (no GPU
    was lent to measure it: scripts/gpu_replicas.py)."""
    mode = cfg.get("replica_batching") or "auto"
    if mode == "auto":
        on_cpu = resolve_device(cfg.device).type == "cpu"
        conv_on_cpu = on_cpu and any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        return "interleaved" if conv_on_cpu or batched.unsupported_layer(model) else "stacked"
    return mode


def execute(jobs: list[Job], on_record) -> None:
    """Train `jobs` batched, one batch per (start step, resume step), or one after another (`layout`); each
    unit's files as a single run writes them; `on_record(job, record)` gets each unit's record."""
    if not jobs:
        return
    how = layout(jobs[0].run.cfg, jobs[0].model)
    if how == "sequential":
        order = {id(r): i for i, r in enumerate(dict.fromkeys(job.run for job in jobs))}
        previous = None
        for job in sorted(jobs, key=lambda j: order[id(j.run)]):  # one replicate's data copy at a time
            if previous is not None and previous is not job.run:
                previous.release_data()
            previous = job.run
            on_record(job, job.run.train_job(job))
        return
    groups = defaultdict(list)
    for job, state in zip(jobs, _resume_states(jobs)):
        groups[(job.start, None if state is None else state["step"])].append((job, state))
    for (start, resumed), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or -1)):
        runs = [job.run for job, _ in group]
        members = []
        for job, state in group:
            run = job.run
            seed = run.data_seed if job.data_seed is None else job.data_seed
            ckpts = run.folder.checkpoints(job.level, job.branch, job.unit)
            members.append(batched.Member(job.model, job.masks, run.split, seed, run.hooks(job, ckpts), state,
                                          desc=job.tag))
        desc = f"level {group[0][0].level} x{len(group)}"
        log.info("level %d: training %d networks batched (%s) from step %d%s (%s)", group[0][0].level, len(group),
                 how, start, f", resumed at step {resumed}" if resumed is not None else "",
                 ", ".join(sorted({j.tag for j, _ in group})))
        try:
            results = batched.train_batched(members, runs[0].cfg, start=start, steps=runs[0].steps, desc=desc,
                                            layout=how)
        except Preempted:
            hand_over()
            raise
        for (job, state), result in zip(group, results):
            on_record(job, job.run.finish_unit(job, result, state))


def _resume_states(jobs: list[Job]) -> list[dict | None]:
    """Each unit's checkpoint to resume from. A kill while R checkpoints are written leaves some units one checkpoint
    ahead; those fall back to their previous checkpoint when it matches the others, so the batch stays whole."""
    options = [job.run.folder.checkpoints(job.level, job.branch, job.unit).states() for job in jobs]
    latest = [opts[0]["step"] for opts in options if opts]
    if not latest:
        return [None] * len(jobs)
    common = min(latest)
    chosen = []
    for opts in options:
        match = next((s for s in opts if s["step"] == common), None)
        chosen.append(match if match is not None else (opts[0] if opts else None))
    return chosen

