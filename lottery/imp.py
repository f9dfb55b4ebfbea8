"""The IMP driver: levels, rewinding, branches, and resume.

A run is a list of units trained in order. Level 0 trains the dense network; level L prunes (scores taken after
level L-1's training, or at the weights the level starts from: `pruning.when`), rewinds the survivors to the rewind
point, and trains again from there with a fresh optimizer and the schedule restarted at the rewind step. The branches
in `pruning.branches` (lottery.branches) then run on the level's ticket. Paths, results and tickets belong to the run
folder (lottery.folder); a unit with a result is never trained again, so reruns and requeues resume.
"""
from __future__ import annotations

import itertools
import logging
import os
import signal
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from lottery.core import device as D
from lottery import masks as M
from lottery import pruning
from lottery.branches import BRANCHES, LevelContext, Unit, branch_settings
from lottery.core.signals import hand_over, stop_requested
from lottery.core.files import load_torch, save_torch
from lottery.core.steps import Steps
from lottery.core.seeds import derive_seed
from lottery.config import validate
from lottery.data import Batches, Split, load_data
from lottery.core.divergence import Diverged
from lottery.folder import DETAIL_KEYS, RunFolder
from lottery.init import initialize
from lottery.models import build_model
from lottery.ticket import Ticket, check_fits_config, load_ticket
from lottery.tracking import Tracker
from lottery.train import Hooks, train
from lottery.core.signals import Preempted

log = logging.getLogger(__name__)


def set_threads(cfg) -> None:
    """CPU threads: `threads` when set, else the CPUs SLURM gave the job, else PyTorch's default (every core).

    Small models on a busy CPU are much faster with fewer threads: PyTorch's parallel regions wait for every thread,
    so one core taken by another process stalls each operation (measured here: a BatchNorm on 32x4x32x32 took 23 ms
    with 2 threads next to a busy process, 0.27 ms with 1)."""
    cpus = cfg.threads or os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and str(cpus).isdigit():
        torch.set_num_threads(int(cpus))


def cpu_state(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@dataclass
class Job:
    """One unit to train: what `Run.train_job` (one at a time) or lottery.replicas (batched) needs."""
    run: "Run"
    level: int
    branch: str
    model: torch.nn.Module
    masks: M.Masks
    start: int
    unit: str = ""
    data_seed: Optional[int] = None
    at_step: dict = field(default_factory=dict)
    on_done: Optional[Callable[[dict], None]] = None

    @property
    def tag(self) -> str:
        return f"{self.branch}/{self.unit}" if self.unit else self.branch


@dataclass
class BranchPlan:
    """A branch's units at one level: records of the finished ones, jobs for the others."""
    ctx: LevelContext
    units: list[Unit]
    single: bool  # one unnamed unit and no analysis: the unit's record is the branch's
    records: list[Optional[dict]]
    jobs: list[tuple[int, Job]]  # (index in units, job)


class Run:
    """What the units of one run folder share: config, data, durations, the weights of the rewind point.

    `split` (lottery.replicas): the replicate's rows of a data pool shared with other replicates; its own copy of the
    data is then made only when something asks for `data` (a criterion that reads batches, a unit trained alone)."""

    def __init__(self, cfg: DictConfig, folder: RunFolder, resolved: dict, split: Optional[Split] = None,
                 concurrent_tracking: bool = False):
        self.cfg, self.folder, self.resolved = cfg, folder, resolved
        self.device, self.device_info = D.setup(cfg, folder.path)  # checks and records <run>/device.json; logs it
        self.split, self._data = split, None
        if split is None:
            d = cfg.dataset
            self._data = load_data(d.name, d.root, val_size=d.val_size, split_seed=cfg.seed, download=d.download,
                                   verify=d.verify, augment=d.augment, device=self.device,
                                   synthetic_shape=d.synthetic_shape, synthetic_train=d.synthetic_train,
                                   synthetic_test=d.synthetic_test, synthetic_seed=cfg.seed)
        n_train = len(self._data.train_y) if split is None else len(split.train_idx)
        if not 0 < cfg.train.batch_size <= n_train:
            raise ValueError(f"batch_size must be in [1, {n_train}] (training set size), got {cfg.train.batch_size}")
        spe = n_train // cfg.train.batch_size
        self.steps = Steps.resolve(cfg, spe)
        p = cfg.pruning
        if self.steps.rewind >= self.steps.total and (p.levels > 1 or p.target is not None or p.branches):
            raise ValueError(f"pruning.rewind={p.rewind} ({self.steps.rewind} steps) must come before the end of "
                             f"training (train.duration={cfg.train.duration}, {self.steps.total} steps)")
        self.data_seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
        self.capture_steps = self._capture_steps()
        self.tracker = Tracker(folder.path, cfg, resolved, group=cfg.name, concurrent=concurrent_tracking)
        self._rewind_state: Optional[dict] = None
        self.fault_marker = folder.path / ".fault_fired"

    @property
    def data(self):
        if self._data is None:
            self._data = self.split.data()
        return self._data

    def release_data(self) -> None:
        """Drop the replicate's own copy of the data (the shared pool stays)."""
        if self.split is not None:
            self._data = None

    def _capture_steps(self) -> list[int]:
        """Steps of level 0 whose state the branches in pruning.branches start from (besides 0 and the rewind step)."""
        out = set()
        for name in self.cfg.pruning.branches:
            capture = BRANCHES[name].capture
            if capture is None:
                continue
            for k in capture(branch_settings(name, self.cfg), self.steps):
                if not 0 <= k < self.steps.total:
                    raise ValueError(f"branch '{name}' starts from step {k}, outside training (train.duration="
                                     f"{self.cfg.train.duration}, {self.steps.total} steps); accepted: 0 to "
                                     f"{self.steps.total - 1}")
                out.add(k)
        return sorted(out - {0, self.steps.rewind})

    @property
    def rewind_state(self) -> dict:
        """Full state at the rewind point, read from disk at most once per process."""
        if self._rewind_state is None:
            self._rewind_state = load_torch(self.folder.rewind)
        return self._rewind_state

    def set_rewind_state(self, state: dict) -> None:
        save_torch(state, self.folder.rewind)
        self._rewind_state = state

    def state_at(self, step: int) -> dict:
        """Level 0's full state after `step` steps: saved while level 0 trained (`Branch.capture`), or, for a run
        whose level 0 ended before the branch was added, recomputed by training from init.pt to `step` (data order
        and schedule are functions of the step, so the replay is the same computation)."""
        if step == self.steps.rewind:
            return self.rewind_state
        if step == 0:
            return load_torch(self.folder.init)
        path = self.folder.state_path(step)
        if not path.exists():
            self._replay_level0(sorted({step, *[k for k in self.capture_steps if k < step]}))
        return load_torch(path)

    def _replay_level0(self, wanted: list[int]) -> None:
        missing = [k for k in wanted if not self.folder.state_path(k).exists()]
        log.info("level 0: state at step(s) %s was not saved while level 0 trained; replaying level 0 to step %d",
                 missing, missing[-1])
        model = self.new_model()
        model.load_state_dict(load_torch(self.folder.init))
        masks = M.ones(model, M.prunable_tensors(model, self.cfg.pruning))
        at_step = {k: (lambda k=k: save_torch(cpu_state(model), self.folder.state_path(k))) for k in missing}
        train(model, masks, self.data, self.cfg, start=0, end=missing[-1], steps=self.steps,
              hooks=Hooks(at_step=at_step), data_seed=self.data_seed, desc="level 0 replay")

    def new_model(self, init_seed: int | None = None):
        """Built and initialized on the CPU, so a seed gives the same weights on every device."""
        kwargs = OmegaConf.to_container(self.cfg.model, resolve=True)
        m = build_model(kwargs.pop("name"), self.data.input_shape, self.data.num_classes, **kwargs)
        if init_seed is not None:
            initialize(m, self.cfg.init, init_seed)
        return m.to(self.device)

    def record(self, level: int, branch: str, model, masks: M.Masks, result: dict) -> dict:
        remaining, total = M.count(masks)
        return {"level": level, "branch": branch, "replicate": self.cfg.seed,
                "weights_remaining": remaining / total if total else 1.0,
                "params_remaining": M.params_remaining(model, masks),
                "weights_remaining_count": remaining, "weights_total": total,
                "layer_density": M.density(masks),
                **{k: result[k] for k in ("test_accuracy", "test_loss", "val_loss", "val_accuracy", "early_stop_step",
                                          "early_stop_test_accuracy", "early_stop_val_loss", "start_step", "steps")},
                "experiment": self.cfg.name, "model": self.cfg.model.name, "dataset": self.cfg.dataset.name,
                "init": self.cfg.init.get("_target_") or self.cfg.init.name, "device_info": self.device_info,
                "diverged": result["diverged"], "diverged_step": result["diverged_step"],
                **({"last_finite_step": result["last_finite_step"]} if result["diverged"] else {})}

    def hooks(self, job: Job, ckpts) -> Hooks:
        at_step = dict(job.at_step)
        self._add_faults(job.level, job.tag, at_step)
        logging_on = self.cfg.logger.name != "none"
        level, tag = job.level, job.tag
        return Hooks(on_eval=lambda r: self.tracker.eval(level, tag, r),
                     on_log=(lambda r: self.tracker.train(level, tag, r)) if logging_on else None,
                     log_every=self.cfg.logger.log_every, at_step=at_step,
                     checkpoint=lambda s: ckpts.save({**s, "device_info": self.device_info}),
                     checkpoint_every=self.steps.checkpoint_every, should_stop=stop_requested)

    def train_unit(self, level: int, branch: str, model, masks: M.Masks, start: int, unit: str = "",
                   data_seed: Optional[int] = None, at_step: dict | None = None, on_done=None) -> dict:
        return self.train_job(Job(self, level, branch, model, masks, start, unit, data_seed, dict(at_step or {}),
                                  on_done))

    def train_job(self, job: Job) -> dict:
        """Train one unit to the end, resuming from its checkpoint if one is there; returns its record."""
        ckpts = self.folder.checkpoints(job.level, job.branch, job.unit)
        resume = ckpts.load()
        if resume is not None:
            log.info("level %d %s: resuming from step %d", job.level, job.tag, resume["step"])
        try:
            result = train(job.model, job.masks, self.data, self.cfg, start=job.start, steps=self.steps,
                           hooks=self.hooks(job, ckpts),
                           data_seed=self.data_seed if job.data_seed is None else job.data_seed,
                           desc=f"level {job.level} {job.tag}", resume=resume)
        except Preempted:
            hand_over()
            raise
        return self.finish_unit(job, result, resume)

    def finish_unit(self, job: Job, result: dict, resume: Optional[dict] = None) -> dict:
        """A unit's files once it is trained: what the next unit needs, its result (which marks it done), the
        summary."""
        level, branch, unit, tag = job.level, job.branch, job.unit, job.tag
        record = self.record(level, branch, job.model, job.masks, result)
        if unit:
            record["unit"] = unit
        if resume is not None and D.differences(resume.get("device_info"), self.device_info):
            record["previous_device_info"] = resume["device_info"]  # the unit started on other hardware
        if job.on_done is not None:  # files the next unit needs go first: result.json marks the unit as done
            job.on_done(record)
        self.folder.save_result(level, branch, {**record, "evals": result["evals"]}, unit)
        self.folder.checkpoints(level, branch, unit).clear()
        if not unit:
            self.tracker.level(record)
            self.folder.write_summary()
        if record["diverged"]:
            log.error("level %d %-12s weights remaining %6.2f%%  DIVERGED: non-finite loss at step %d (finite at step "
                      "%s); stopped, recorded with diverged: true in %s", level, tag, 100 * record["weights_remaining"],
                      record["diverged_step"], record["last_finite_step"],
                      self.folder.unit_dir(level, branch, unit) / "result.json")
            return record
        log.info("level %d %-12s weights remaining %6.2f%%  test acc %.4f  early-stop step %s (test acc %s)",
                 level, tag, 100 * record["weights_remaining"], record["test_accuracy"],
                 record["early_stop_step"], record["early_stop_test_accuracy"])
        return record

    def plan_branch(self, ctx: LevelContext) -> BranchPlan:
        """The branch's units; those with a result are read back, the others become jobs."""
        branch = BRANCHES[ctx.branch]
        units = branch.fn(ctx)
        if len(units) > 1 and len({u.name for u in units}) < len(units):
            raise ValueError(f"branch '{ctx.branch}' trains {len(units)} units: give each a distinct Unit.name")
        single = len(units) == 1 and not units[0].name and branch.analyze is None
        plan = BranchPlan(ctx, units, single, [None] * len(units), [])
        for i, u in enumerate(units):
            name = "" if single else (u.name or "unit")
            if self.folder.done(ctx.level, ctx.branch, name):
                rec = self.folder.load_result(ctx.level, ctx.branch, name)
                for key in DETAIL_KEYS:
                    rec.pop(key, None)
                if u.keep_final:
                    u.model.load_state_dict(load_torch(self.folder.unit_dir(ctx.level, ctx.branch, name) / "final.pt"))
                plan.records[i] = rec
                if rec.get("diverged"):
                    break  # the branch's other units and its analysis would build on a failed one
                continue
            M.apply(u.model, u.masks)
            on_done = None
            if u.keep_final:
                final = self.folder.unit_dir(ctx.level, ctx.branch, name) / "final.pt"
                on_done = lambda _r, m=u.model, p=final: save_torch(cpu_state(m), p)  # noqa: E731
            start = ctx.rewind_step if u.start is None else u.start
            plan.jobs.append((i, Job(self, ctx.level, ctx.branch, u.model, u.masks, start, name, u.data_seed,
                                     on_done=on_done)))
        return plan

    def finish_branch(self, plan: BranchPlan) -> dict:
        """The branch's record once its units have theirs: the unit's own, or the first unit's (the first diverged
        one's) plus the analysis."""
        ctx = plan.ctx
        if not plan.units:  # the branch skips this level (lmc's `levels` setting)
            return {}
        records = [r for r in plan.records if r is not None]
        if plan.single:
            return records[0]
        branch = BRANCHES[ctx.branch]
        failed = next((r for r in records if r.get("diverged")), None)
        record = {**(failed or records[0]), "branch": ctx.branch}
        record.pop("unit", None)
        if failed is not None:
            record["diverged_unit"] = failed.get("unit")
        elif branch.analyze is not None:
            record.update(branch.analyze(ctx, plan.units, records))
        self.folder.save_result(ctx.level, ctx.branch, record)
        for key in DETAIL_KEYS:
            record.pop(key, None)
        self.tracker.level(record)
        self.folder.write_summary()
        return record

    def run_branch(self, ctx: LevelContext) -> dict:
        """Train the branch's units that have no result yet, then its analysis; returns the branch's record."""
        plan = self.plan_branch(ctx)
        for i, job in plan.jobs:
            plan.records[i] = self.train_job(job)
            if plan.records[i].get("diverged"):
                break  # the branch's other units and its analysis would build on a failed one
        return self.finish_branch(plan)

    def _add_faults(self, level: int, tag: str, at_step: dict) -> None:
        """Test-only fault injection (`fault.signal_at`, `fault.kill_at`, with `fault.level` and `fault.branch`, which
        names a branch or a branch's unit as `branch/unit`): fires once per folder."""
        fault = self.cfg.fault
        if not fault or fault.get("level", 0) != level or tag != fault.get("branch", "ticket"):
            return
        marker = self.fault_marker
        if marker.exists():
            return
        for key, sig in (("signal_at", getattr(signal, "SIGUSR2", signal.SIGTERM)), ("kill_at", signal.SIGKILL)):
            if fault.get(key) is None:
                continue
            step = int(fault[key])
            previous = at_step.get(step)

            def fire(previous=previous, sig=sig):
                if previous:
                    previous()
                marker.write_text(str(sig))
                os.kill(os.getpid(), sig)

            at_step[step] = fire

    def fault_after_level(self, level: int) -> None:
        """Test-only: `fault.kill_after_level=L` SIGKILLs the run once, after level L's units, before level L+1."""
        fault = self.cfg.fault
        if not fault or fault.get("kill_after_level") is None or int(fault.kill_after_level) != level:
            return
        marker = self.fault_marker
        if not marker.exists():
            marker.write_text(str(signal.SIGKILL))
            os.kill(os.getpid(), signal.SIGKILL)

    def prune_level(self, level: int, masks: M.Masks, *, trained: dict | None = None,
                    keep: dict[str, int] | int | None = None, invert: bool = False) -> M.Masks:
        """Level `level`'s masks from `masks` (level L-1's): scored on L-1's trained weights (read from its final.pt
        unless given), or on the rewind-point weights (`pruning.when`, or the criterion's own). With
        `pruning.from_dense` every level prunes the dense network (level 0's weights, all-ones masks) to the count
        the level would have under the per-level rates. The scoring data and randomness depend only on (seed,
        level), so a branch calling this again gets the same scores; `keep` and `invert` are for such a branch
        (per-tensor counts, lowest scores kept)."""
        p = self.cfg.pruning
        source = 0 if p.from_dense else level - 1  # the level whose masks (and trained weights) are pruned
        if p.from_dense:
            masks, trained = self.masks_before(level), None
        if pruning.scores_at(p) == "after_training":
            state = trained if trained is not None else load_torch(self.folder.final_path(source))
        else:
            state = self.rewind_state

        def scoring_model(current: M.Masks):
            model = self.new_model()
            model.load_state_dict(state)
            M.apply(model, current)
            return model

        model = scoring_model(masks)
        prunable = M.prunable_tensors(model, p)
        if keep is None and p.from_dense and not p.one_shot:
            keep = pruning.level_survivors(masks, prunable, p, level)
        def batches():  # built on first use: a criterion that reads no data costs a replicate no copy of it
            b = Batches(self.data, self.cfg.train.batch_size, seed=derive_seed(self.cfg.seed, "score", level))
            yield from map(b.get, itertools.count())

        return pruning.prune(model, masks, prunable, p, keep_fraction=p.target if p.one_shot else None,
                             rescore=scoring_model, keep=keep, invert=invert, batches=batches(),
                             generator=torch.Generator().manual_seed(derive_seed(self.cfg.seed, "prune", level)))

    def masks_before(self, level: int) -> M.Masks:
        """The masks level `level` is pruned from: level L-1's ticket masks (all ones before level 1, and at every
        level with pruning.from_dense)."""
        model = self.new_model()
        if level <= 1 or self.cfg.pruning.from_dense:
            return M.ones(model, M.prunable_tensors(model, self.cfg.pruning))
        return M.from_bool(self.folder.load_ticket(level - 1).masks, model)

    def prepare_ticket(self, level: int, model, masks: M.Masks, init_state: dict):
        """Set `model` to where level `level`'s ticket starts (initialization for level 0, else the rewind point),
        masked; returns (start step, steps at which level 0 saves the rewind and capture states, the callback that
        writes final.pt and the ticket file once the unit is trained)."""
        folder = self.folder
        if level == 0:
            model.load_state_dict(init_state)
            at_step = {} if folder.rewind.exists() else {
                self.steps.rewind: lambda: self.set_rewind_state(cpu_state(model))}
            for k in self.capture_steps:  # the states branches start from (lmc's steps), once
                if not folder.state_path(k).exists():
                    at_step[k] = lambda k=k: save_torch(cpu_state(model), folder.state_path(k))
        else:
            model.load_state_dict(self.rewind_state)
            at_step = {}
        M.apply(model, masks)

        def finish_ticket(record):
            if not record["diverged"]:  # NaN weights are nothing to prune from
                save_torch(cpu_state(model), folder.final_path(level))
            folder.save_ticket(self.ticket(level, masks, model, record))

        return (0 if level == 0 else self.steps.rewind), at_step, finish_ticket

    def ticket(self, level: int, masks: M.Masks, model, record: dict | None) -> Ticket:
        state = {k: v.clone() for k, v in self.rewind_state.items()}
        for name, m in masks.items():
            state[name] = state[name] * m.to(state[name].device, state[name].dtype)
        remaining, total = M.count(masks)
        return Ticket(level=level, masks=M.to_bool(masks), rewind_step=self.steps.rewind, rewind_state=state,
                      config=self.resolved, weights_remaining=remaining / total if total else 1.0,
                      params_remaining=M.params_remaining(model, masks), metrics=record)


def level_count(cfg, masks: M.Masks, prunable) -> int:
    p = cfg.pruning
    if p.target is not None:
        return 2 if p.one_shot else len(pruning.plan_counts(masks, prunable, p))
    return p.levels


def run_experiment(cfg: DictConfig, run_dir) -> list[dict]:
    """Run (or resume) the experiment `cfg` in `run_dir`; returns the summary records. With `replicas`, one run
    folder per replicate below `run_dir`, trained batched (lottery.replicas)."""
    if cfg.get("replicas") is not None:
        from lottery.replicas import run_replicas
        return run_replicas(cfg, run_dir)
    validate(cfg)
    set_threads(cfg)
    folder = RunFolder(run_dir)
    with folder.lock():
        run = Run(cfg, folder, folder.prepare(cfg))
        ok = False
        try:
            summary = _run_levels(run)
            ok = True
            return summary
        finally:
            run.tracker.finish(folder.results(), ok=ok)


def _run_levels(run: Run) -> list[dict]:
    cfg, p, folder = run.cfg, run.cfg.pruning, run.folder
    diverged: list[dict] = []  # records of diverged units (lottery/divergence.py)

    def check(record: dict) -> None:
        if record.get("diverged"):
            diverged.append(record)
            if cfg.train.on_divergence == "stop":
                raise Diverged(diverged, stopped=True)

    model = run.new_model(init_seed=cfg.seed)
    if folder.init.exists():
        model.load_state_dict(load_torch(folder.init))
    else:
        save_torch(cpu_state(model), folder.init)
    init_state = cpu_state(model)
    prunable = M.prunable_tensors(model, p)
    n_levels = level_count(cfg, M.ones(model, prunable), prunable)
    if n_levels > 1 and not prunable:
        raise ValueError("nothing to prune: pruning.exclude removed every prunable tensor")
    masks = M.ones(model, prunable)
    rewind_step = run.steps.rewind
    if rewind_step == 0 and not folder.rewind.exists():
        run.set_rewind_state(init_state)
    trained = None  # level L-1's trained weights while this process has them

    for level in range(n_levels):
        if level > 0:
            if folder.has_ticket(level):
                masks = M.from_bool(folder.load_ticket(level).masks, model)
            else:
                masks = run.prune_level(level, masks, trained=trained)
        elif not p.train_dense:
            continue  # pruning at init from the rewind point (rewind 0) needs no dense network

        if not folder.done(level, "ticket"):
            start, at_step, finish_ticket = run.prepare_ticket(level, model, masks, init_state)
            ticket = run.train_unit(level, "ticket", model, masks, start, at_step=at_step, on_done=finish_ticket)
            trained = cpu_state(model)
            run.tracker.artifact(folder.ticket_path(level), f"ticket-level{level}")
        else:
            ticket = folder.load_result(level, "ticket")
            trained = None
        check(ticket)

        for name in p.branches:
            if level == 0 and not BRANCHES[name].dense:
                continue
            check(folder.load_result(level, name) if folder.done(level, name) else
                  run.run_branch(LevelContext(run, level, name, masks, rewind_step, run.rewind_state,
                                              branch_settings(name, cfg))))
        run.fault_after_level(level)
        if ticket.get("diverged"):
            break  # a diverged ticket is never pruned to make the next level

    summary = folder.write_summary()
    if diverged:  # train.on_divergence=continue: the units that did not depend on it are done; the run still failed
        raise Diverged(diverged, stopped=False)
    return summary


def retrain(cfg: DictConfig, ticket_path, run_dir) -> list[dict]:
    """Retrain a ticket in isolation (other seeds, data orders, optimizers, devices) with the same metrics."""
    if cfg.get("replicas") is not None:
        raise ValueError(f"lottery-retrain trains one ticket and takes no replicas (got replicas={cfg.replicas}); "
                         f"retrain each replicate's ticket, or drop replicas")
    validate(cfg)
    set_threads(cfg)
    ticket = load_ticket(ticket_path)
    check_fits_config(ticket, cfg)  # another model's ticket: one clear error before the folder is touched
    folder = RunFolder(run_dir)
    with folder.lock():
        run = Run(cfg, folder, folder.prepare(cfg))
        ok = False
        try:
            if ticket.rewind_step >= run.steps.total:
                raise ValueError(f"the ticket rewinds to step {ticket.rewind_step}, past the end of training "
                                 f"({run.steps.total} steps)")
            model = run.new_model()
            masks = M.from_bool(ticket.masks, model)
            run._rewind_state = ticket.rewind_state
            if not folder.done(ticket.level, "retrain"):
                run.run_branch(LevelContext(run, ticket.level, "retrain", masks, ticket.rewind_step,
                                            ticket.rewind_state))
            record = folder.load_result(ticket.level, "retrain")
            if record.get("diverged"):
                raise Diverged([record], stopped=True)
            ok = True
            return folder.write_summary()
        finally:
            run.tracker.finish(folder.results(), ok=ok)
