"""Units: the trainings of a level (its ticket, each branch's units) as jobs, trained one at a time or together
(`execute`), and what a unit leaves once trained (its files, record and log line: `finish_unit`), and a branch once
its units are (`finish_branch`, with the branch's analysis)."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lottery import masks as M
from lottery.branches import BRANCHES, LevelContext, Unit
from lottery.core import device as D
from lottery.core.files import load_torch, save_torch
from lottery.core.seeds import derive_seed
from lottery.core.signals import Preempted, hand_over, stop_if_asked, stop_requested
from lottery.experiment import callbacks, plan, progress
from lottery.experiment.records import DETAIL_KEYS, unit_record, without_details
from lottery.experiment.replicate import Replicate, cpu_state
from lottery.training import Hooks, Network, lr_schedule, train
from lottery.training.dst import dst_settings
from lottery.training.updaters import starts_dense

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One unit to train: a replicate's model and masks from step `start`, on the data order of `data_seed`."""

    rep: Replicate
    level: int
    branch: str
    model: torch.nn.Module
    masks: M.Masks
    start: int
    unit: str = ""
    data_seed: int | None = None
    at_step: dict = field(default_factory=dict)
    on_done: Callable[[dict], None] | None = None  # files the next unit needs, written before result.json
    end: int | None = None  # last step (None: the end of training)
    lr_at: int | None = None  # hold the learning rate of this step (fine-tuning)
    deps: dict = field(default_factory=dict)  # training the unit's masks depended on: {"steps", "flops"}

    @property
    def tag(self) -> str:
        return f"{self.branch}/{self.unit}" if self.unit else self.branch


@dataclass
class BranchPlan:
    """A branch's units at one level: records of the finished ones, jobs for the others."""

    rep: Replicate
    ctx: LevelContext
    units: list[Unit]
    single: bool  # one unnamed unit and no analysis: the unit's record is the branch's
    records: list[dict | None]
    jobs: list[tuple[int, Job]]  # (index in units, job)


def context(rep: Replicate, level: int, branch: str, masks: M.Masks) -> LevelContext:
    """What branch `branch` sees of `level` of replicate `rep`."""
    from lottery.branches import branch_settings

    return LevelContext(
        level=level,
        branch=branch,
        masks=masks,
        rewind_step=rep.steps.rewind,
        settings=branch_settings(branch, rep.cfg) if BRANCHES[branch].selectable else {},
        replicate=rep.seed,
        cfg=rep.cfg,
        steps=rep.steps,
        data=rep.split,
        new_model=rep.new_model,
        state_at=rep.state_at,
        prune=lambda keep=None, invert=False: plan.prune_level(
            rep, level, plan.masks_before(rep, level), keep=keep, invert=invert
        ),
        trained_state=lambda: plan.trained_source(rep, level),
    )


def plan_branch(rep: Replicate, ctx: LevelContext, deps: dict | None = None) -> BranchPlan:
    """The branch's units; those with a result are read back, the others become jobs (`deps`: the training its masks
    depended on, for the records' cost)."""
    folder = rep.folder
    branch = BRANCHES[ctx.branch]
    units = branch.fn(ctx)
    if len(units) > 1 and len({u.name for u in units}) < len(units):
        raise ValueError(f"branch '{ctx.branch}' trains {len(units)} units: give each a distinct Unit.name")
    single = len(units) == 1 and not units[0].name and branch.analyze is None
    out = BranchPlan(rep, ctx, units, single, [None] * len(units), [])
    for i, u in enumerate(units):
        name = "" if single else (u.name or "unit")
        if folder.done(ctx.level, ctx.branch, name):
            rec = without_details(folder.load_result(ctx.level, ctx.branch, name))
            if u.keep_final:
                u.model.load_state_dict(load_torch(folder.unit_dir(ctx.level, ctx.branch, name) / "final.pt"))
            out.records[i] = rec
            if rec.get("diverged"):
                break  # the branch's other units and its analysis would build on a failed one
            continue
        if not starts_dense(rep.cfg.dst):  # gradual pruning: dense at the start, the masks are its target
            M.apply(u.model, u.masks)
        on_done = None
        if u.keep_final:
            final = folder.unit_dir(ctx.level, ctx.branch, name) / "final.pt"
            on_done = lambda _r, m=u.model, p=final: save_torch(cpu_state(m), p)  # noqa: E731 - this unit's
        start = ctx.rewind_step if u.start is None else u.start
        out.jobs.append(
            (
                i,
                Job(
                    rep,
                    ctx.level,
                    ctx.branch,
                    u.model,
                    u.masks,
                    start,
                    name,
                    u.data_seed,
                    on_done=on_done,
                    end=u.end,
                    lr_at=u.lr_at,
                    deps=dict(deps or {}),
                ),
            )
        )
    return out


def finish_branch(plan_: BranchPlan) -> dict:
    """The branch's record once its units have theirs: the unit's own, or the first unit's (the first diverged
    one's) plus the analysis."""
    rep, ctx = plan_.rep, plan_.ctx
    if not plan_.units:  # the branch skips this level (lmc's `levels` setting)
        return {}
    records = [r for r in plan_.records if r is not None]
    if plan_.single:
        return records[0]
    branch = BRANCHES[ctx.branch]
    failed = next((r for r in records if r.get("diverged")), None)
    record = {**(failed or records[0]), "branch": ctx.branch}
    record.pop("unit", None)
    if failed is not None:
        record["diverged_unit"] = failed.get("unit")
    elif branch.analyze is not None:
        record.update(branch.analyze(ctx, plan_.units, records))
        if record.get("instability_test") is not None:
            log.info(
                "%slevel %d %s: instability (error barrier) %.2f points on test, %.2f on train, copies from step %s",
                rep.name,
                ctx.level,
                ctx.branch,
                record["instability_test"],
                record.get("instability_train") or 0.0,
                record.get("lmc_step"),
            )
    rep.folder.save_result(ctx.level, ctx.branch, record)
    if progress.CURRENT is not None:
        progress.CURRENT.unit_done(0)  # the branch's record: its units' steps are counted
    record = without_details(record)
    rep.tracker.level(record)
    rep.folder.write_summary()
    return record


def finish_unit(job: Job, result: dict, resume: dict | None = None, wall_time: float | None = None) -> dict:
    """A unit's files once it is trained: what the next unit needs, its result (which marks it done), the summary."""
    rep, level, branch, unit, tag = job.rep, job.level, job.branch, job.unit, job.tag
    record = unit_record(rep, level, branch, job.model, job.masks, result, unit, job.deps, wall_time)
    if resume is not None and D.differences(resume.get("device_info"), rep.device_info):
        record["previous_device_info"] = resume["device_info"]  # the unit started on other hardware
    if job.on_done is not None:  # files the next unit needs go first: result.json marks the unit as done
        job.on_done(record)
    rep.folder.save_result(level, branch, {**record, **{k: result[k] for k in DETAIL_KEYS if k in result}}, unit)
    rep.folder.checkpoints(level, branch, unit).clear()
    if not unit:
        rep.tracker.level(record)
        rep.folder.write_summary()
    if record["diverged"]:
        last = record["last_finite_step"]
        log.error(
            "%slevel %d %-12s weights remaining %6.2f%%  DIVERGED: non-finite loss at step %d%s; stopped, "
            "recorded with diverged: true in %s",
            rep.name,
            level,
            tag,
            100 * record["weights_remaining"],
            record["diverged_step"],
            "" if last is None else f" (finite at step {last})",
            rep.folder.unit_dir(level, branch, unit) / "result.json",
        )
        return record
    early = (
        ""
        if record["early_stop_step"] is None
        else f"  early-stop step {record['early_stop_step']} (test acc {record['early_stop_test_accuracy']:.4f})"
    )
    log.info(
        "%slevel %d %-12s weights remaining %6.2f%%  test acc %.4f%s",
        rep.name,
        level,
        tag,
        100 * record["weights_remaining"],
        record["test_accuracy"],
        early,
    )
    if record["at_chance"]:
        pool = rep.split.pool
        log.warning(
            "%slevel %d %s ends at chance (test accuracy %.4f with %d classes, the most frequent of them %.4f "
            "of the test set) though its losses stayed finite: it learned nothing; recorded with at_chance: "
            "true (a learning rate too high or too low is the usual cause)",
            rep.name,
            level,
            tag,
            record["test_accuracy"],
            pool.num_classes,
            pool.majority,
        )
    return record


def _hooks(job: Job, ckpts, parent) -> Hooks:
    rep = job.rep
    level, tag = job.level, job.tag
    info = callbacks.UnitInfo(rep.folder.path, parent, level, job.branch, job.unit)
    logging_on = rep.cfg.logger.name != "none"
    return Hooks(
        on_eval=lambda r: rep.tracker.eval(level, tag, r),
        on_log=(lambda r: rep.tracker.train(level, tag, r)) if logging_on else None,
        log_every=rep.cfg.logger.log_every,
        at_step=callbacks.unit_steps(info, job.at_step),
        checkpoint=lambda s: ckpts.save({**s, "device_info": rep.device_info}),
        checkpoint_every=rep.steps.checkpoint_every,
        should_stop=stop_requested,
    )


def execute(
    jobs: list[Job],
    how: str,
    on_record: Callable[[Job, dict], None],
    *,
    parent=None,
    skip: Callable[[Job], bool] = lambda job: False,
) -> None:
    """Train `jobs` and give each unit's record to `on_record(job, record)` as soon as it has one. `how`:
    `sequential` (one unit after another, each alone: a plain run, and replica_batching=sequential), or a layout of
    lottery.training.layouts for batches of units that start and resume at the same step. A job for which `skip`
    is true when its turn comes is not trained (its replicate stopped)."""
    if how == "sequential":
        for job in jobs:
            if not skip(job):
                _train([(job, _checkpoint(job))], "interleaved", on_record, parent)
        return
    by_step = defaultdict(list)
    for job, state in zip(jobs, _resume_states(jobs)):
        key = (job.start, -1 if state is None else state["step"], job.end or -1, -1 if job.lr_at is None else job.lr_at)
        by_step[key].append((job, state))
    for key in sorted(by_step):
        group = [(job, state) for job, state in by_step[key] if not skip(job)]
        if group:
            _train(group, how, on_record, parent)


def _train(group: list[tuple[Job, dict | None]], layout: str, on_record, parent) -> None:
    stop_if_asked("between units")
    first = group[0][0]
    resumed = group[0][1]["step"] if group[0][1] is not None else None
    if len(group) > 1:
        seeds = sorted({j.rep.seed for j, _ in group})
        who = f"replicate{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}: " if first.rep.name else ""
        log.info(
            "level %d: training %d networks batched (%s) from step %d%s (%s%s)",
            first.level,
            len(group),
            layout,
            first.start,
            f", resumed at step {resumed}" if resumed is not None else "",
            who,
            ", ".join(sorted({j.tag for j, _ in group})),
        )
    elif resumed is not None:
        log.info("%slevel %d %s: resuming from step %d", first.rep.name, first.level, first.tag, resumed)
    networks = [
        Network(
            job.model,
            job.masks,
            job.rep.batches(job.data_seed),
            _hooks(job, job.rep.folder.checkpoints(job.level, job.branch, job.unit), parent),
            state,
            seed=derive_seed(job.rep.seed, "dst", job.level, job.branch, job.unit),
        )
        for job, state in group
    ]
    desc = f"level {first.level} {first.tag}" if len(group) == 1 else f"level {first.level} x{len(group)}"
    run, steps = first.rep.training, first.rep.steps
    rule, settings = dst_settings(first.rep.cfg.dst)
    lr = None
    if first.lr_at is not None:  # fine-tuning: the learning rate of one step of the schedule, throughout
        held = lr_schedule(run.train, steps)(first.lr_at)
        lr = lambda step: held  # noqa: E731
    began = time.perf_counter()
    tracking = progress.CURRENT
    if tracking is not None:
        tracking.unit_started(
            f"{first.rep.name}level {first.level} of {tracking.levels - 1} "
            f"{first.tag if len(group) == 1 else f'({len(group)} networks)'}"
        )
    try:
        results = train(
            networks,
            run,
            start=first.start,
            end=first.end,
            steps=steps,
            layout=layout,
            desc=desc,
            lr=lr,
            updater=None if rule is None else (rule, settings),
            on_step=None if tracking is None else tracking.step,
            evaluation_threads=first.rep.evaluation_threads,
        )
    except Preempted:
        hand_over()
        raise
    wall = round(time.perf_counter() - began, 3)
    for (job, state), result in zip(group, results):
        record = finish_unit(job, result, state, wall)
        if tracking is not None:
            tracking.unit_done(result["steps"] - result["start_step"], counted=not job.unit)
        on_record(job, record)


def _checkpoint(job: Job) -> dict | None:
    return job.rep.folder.checkpoints(job.level, job.branch, job.unit).load()


def _resume_states(jobs: list[Job]) -> list[dict | None]:
    """Each unit's checkpoint to resume from. A kill while N checkpoints are written leaves some units one checkpoint
    ahead; those fall back to their previous checkpoint when it matches the others, so the batch stays whole."""
    options = [job.rep.folder.checkpoints(job.level, job.branch, job.unit).states() for job in jobs]
    latest = [opts[0]["step"] for opts in options if opts]
    if not latest:
        return [None] * len(jobs)
    common = min(latest)
    chosen = []
    for opts in options:
        match = next((s for s in opts if s["step"] == common), None)
        chosen.append(match if match is not None else (opts[0] if opts else None))
    return chosen
