"""The level loop: one loop for one replicate or R. Level 0 trains the dense network; level L prunes (scores taken after
level L-1's training, or at the weights the level starts from: `pruning.when`), rewinds the survivors to the rewind
point, and trains again from there with a fresh optimizer and the schedule restarted at the rewind step. The branches
in `pruning.branches` then run on the level's ticket. A unit with a result is never trained again, so reruns and
requeues resume.

Replicates go through the levels in lockstep: each prunes its own masks, and the units of a level are trained as
`execute` is told: one after another (a plain run), or the tickets and branch units of every replicate together,
grouped by start step (replicas). Level 0's tickets train before the branches that run on the dense network, which
start from states level 0 saves on its way.

Divergence (lottery.core.divergence): a diverged ticket is never pruned to make the next level. With
`train.on_divergence=stop` the replicate whose unit diverged stops there (its later units are not trained) and the
other replicates go on; with `continue` the units that do not build on the diverged one still train. Either way the run
ends with `Diverged` naming every diverged unit and its replicate.
"""

from __future__ import annotations

import logging

from lottery import masks as M
from lottery.core.divergence import AtChance, Diverged
from lottery.core.files import load_torch, save_torch
from lottery.core.signals import stop_if_asked
from lottery.experiment import callbacks, plan, progress
from lottery.experiment.replicate import Replicate, cpu_state
from lottery.experiment.ticket import Ticket
from lottery.experiment.units import BranchPlan, Job, context, execute, finish_branch, plan_branch
from lottery.training.updaters import starts_dense

log = logging.getLogger(__name__)


class Lineage:
    """One replicate's state across levels: its model, its masks, the trained weights the next level prunes, its
    diverged units, and whether it has stopped."""

    def __init__(self, rep: Replicate):
        self.rep = rep
        cfg, folder = rep.cfg, rep.folder
        self.model = model = rep.new_model(init_seed=cfg.seed)
        if folder.init.exists():
            model.load_state_dict(load_torch(folder.init))
        else:
            save_torch(cpu_state(model), folder.init)
        self.init_state = cpu_state(model)
        self.prunable = rep.prunable(model)
        self.n_levels = plan.level_count(cfg, M.ones(model, self.prunable), self.prunable)
        self.masks = M.ones(model, self.prunable)
        if rep.steps.rewind == 0 and not folder.rewind.exists():
            rep.set_rewind_state(self.init_state)
        self.trained: dict | None = None  # level L-1's trained weights while this process has them
        self.ticket: dict = {}
        self.tickets: dict[int, dict] = {}  # each level's ticket record (what training its masks cost)
        self.diverged: list[dict] = []
        self.at_chance: dict | None = None  # the at-chance ticket a next level would have been built from
        self.stopped = False

    def check(self, record: dict) -> None:
        if record.get("diverged"):
            self.diverged.append(record)
            if self.rep.cfg.train.on_divergence == "stop":
                self.stopped = True

    def enter(self, level: int) -> bool:
        """Set the level's masks (the saved ticket's, or pruned from level L-1); False: this level is skipped."""
        if self.stopped:
            return False
        if level == 0:
            return bool(self.rep.cfg.pruning.train_dense)
        folder = self.rep.folder
        if folder.has_ticket(level):
            self.masks = M.from_bool(folder.load_ticket(level).masks, self.model)
        else:
            self.masks = plan.prune_level(self.rep, level, self.masks, trained=self.trained)
        return True

    def ticket_job(self, level: int) -> Job | None:
        """The job of the level's ticket, or None when it has a result (then read into `ticket`). How a pruned level
        trains is `pruning.retrain`: its survivors rewound to the rewind point (weight_rewind), or the trained weights
        it was pruned from kept with the schedule from the rewind step (lr_rewind) or at the final learning rate for
        `pruning.retrain_steps` more steps (finetune)."""
        rep, folder, model, masks = self.rep, self.rep.folder, self.model, self.masks
        if folder.done(level, "ticket"):
            self.ticket = self.tickets[level] = folder.load_result(level, "ticket")
            self.trained = None
            return None
        steps, retrain = rep.steps, rep.cfg.pruning.retrain
        start, end, lr_at, at_step = 0 if level == 0 else steps.rewind, None, None, {}
        if level == 0:
            model.load_state_dict(self.init_state)
            at_step = rep.capture_hooks(model)
        elif retrain == "weight_rewind":
            model.load_state_dict(rep.rewind_state)
        else:
            kept = (
                self.trained
                if self.trained is not None and not rep.cfg.pruning.from_dense
                else plan.trained_source(rep, level)
            )
            model.load_state_dict(kept)
            if retrain == "finetune":
                start, end, lr_at = steps.total, steps.total + plan.finetune_steps(rep), steps.total - 1
        if not starts_dense(rep.cfg.dst):  # gradual pruning: dense at the start, the masks are its target
            M.apply(model, masks)
        kept_state = cpu_state(model) if level and retrain != "weight_rewind" else None  # what the ticket starts from

        def finish_ticket(record):
            if not record["diverged"]:  # NaN weights are nothing to prune from
                save_torch(cpu_state(model), folder.final_path(level))
            folder.save_ticket(make_ticket(rep, level, masks, model, record, kept_state))

        return Job(
            rep,
            level,
            "ticket",
            model,
            masks,
            start,
            at_step=at_step,
            on_done=finish_ticket,
            end=end,
            lr_at=lr_at,
            deps=plan.mask_cost(rep.cfg, level, self.tickets),
        )

    def ticket_trained(self, level: int, record: dict) -> None:
        self.ticket = self.tickets[level] = record
        self.trained = cpu_state(self.model)
        self.rep.tracker.artifact(self.rep.folder.ticket_path(level), f"ticket-level{level}")

    def branch_plans(self, level: int) -> list[BranchPlan]:
        """Plans of the level's branches without a record; the records of the others are checked."""
        rep = self.rep
        plans = []
        for name in rep.cfg.pruning.branches:
            if not plan.branch_runs_at(rep.cfg.pruning, name, level):
                continue
            if rep.folder.done(level, name):
                self.check(rep.folder.load_result(level, name))
                continue
            plans.append(
                plan_branch(rep, context(rep, level, name, self.masks), plan.mask_cost(rep.cfg, level, self.tickets))
            )
        return plans


def make_ticket(
    rep: Replicate, level: int, masks: M.Masks, model, record: dict | None, start_state: dict | None = None
) -> Ticket:
    """The ticket file of `level`: its masks and the state its training starts from (the rewind point's, masked,
    unless `start_state` says otherwise: the kept trained weights of lr_rewind and finetune)."""
    state = {k: v.clone() for k, v in (start_state or rep.rewind_state).items()}
    for name, m in masks.items():  # overwritten, not multiplied (as masks.apply): pruned entries +0.0, never -0.0
        state[name] = state[name].masked_fill(m.to(state[name].device) == 0, 0)
    remaining, total = M.count(M.counted(masks, model, rep.cfg.pruning))
    return Ticket(
        level=level,
        masks=M.to_bool(masks),
        rewind_step=rep.steps.rewind,
        rewind_state=state,
        config=rep.resolved,
        weights_remaining=remaining / total if total else 1.0,
        params_remaining=M.params_remaining(model, masks),
        metrics=record,
    )


def run_levels(reps: list[Replicate], how: str, parent=None) -> list[dict]:
    """Run (or resume) every level of every replicate; returns the summary records of all of them. The log says what
    the run will cost before it starts and how far it is while it runs (lottery.experiment.progress)."""
    lineages = []
    for rep in reps:  # hundreds of replicates take a while to set up: a stop signal is honoured here too
        stop_if_asked("while setting up the replicates")
        lineages.append(Lineage(rep))
    cfg = reps[0].cfg
    tracking = progress.Progress(lineages, every=float(cfg.train.progress_every))
    tracking.announce(lineages[0], measure=bool(cfg.train.estimate))
    progress.CURRENT = tracking
    try:
        return _run_levels(lineages, how, parent)
    finally:
        progress.CURRENT = None


def _run_levels(lineages: list[Lineage], how: str, parent) -> list[dict]:
    reps = [lin.rep for lin in lineages]
    of = {id(lin.rep): lin for lin in lineages}
    units: dict[int, tuple[BranchPlan, int]] = {}  # id(job) -> (its branch plan, its index there)
    trained = []  # units trained by this process

    def skip(job: Job) -> bool:
        if of[id(job.rep)].stopped:
            return True
        unit = units.get(id(job))  # a branch's other units would build on a diverged one (its analysis too)
        return unit is not None and any(r is not None and r.get("diverged") for r in unit[0].records)

    for level in range(lineages[0].n_levels):
        active = [lin for lin in lineages if lin.enter(level)]
        if not active and all(lin.stopped for lin in lineages):
            break
        tickets = []
        for lin in active:
            job = lin.ticket_job(level)
            if job is None:
                lin.check(lin.ticket)
            else:
                tickets.append(job)

        def on_record(job: Job, record: dict, level=level) -> None:
            trained.append(job)
            lin = of[id(job.rep)]
            if id(job) in units:
                branch_plan, i = units[id(job)]
                branch_plan.records[i] = record
                if record.get("diverged") and lin.rep.cfg.train.on_divergence == "stop":
                    lin.stopped = True
            else:
                lin.ticket_trained(level, record)
                lin.check(record)

        if level == 0 or how == "sequential":  # the dense branches start from states level 0 saves on its way
            execute(tickets, how, on_record, parent=parent, skip=skip)
            tickets = []
        plans = [p for lin in active if not lin.stopped for p in lin.branch_plans(level)]
        units.update({id(job): (p, i) for p in plans for i, job in p.jobs})
        execute([*tickets, *(job for p in plans for _, job in p.jobs)], how, on_record, parent=parent, skip=skip)
        for p in plans:
            if all(r is not None for r in p.records) or any(r and r.get("diverged") for r in p.records):
                of[id(p.rep)].check(finish_branch(p))
        for lin in active:
            if lin.ticket.get("diverged"):
                lin.stopped = True  # a diverged ticket is never pruned to make the next level
            elif (
                lin.ticket.get("at_chance")
                and level + 1 < lin.n_levels
                and builds_on_previous(lin.rep.cfg)
                and lin.rep.cfg.train.on_chance == "stop"
            ):
                lin.at_chance, lin.stopped = lin.ticket, True  # nor is one that learned nothing
        callbacks.level_done(level, [rep.folder.path for rep in reps], parent)
    summaries = [rec for rep in reps for rec in rep.folder.write_summary()]
    closing_summary(reps, parent, finished_before=not trained)
    diverged = [r for lin in lineages for r in lin.diverged]
    if diverged:  # the units that did not depend on a diverged one are done; the run still failed
        raise Diverged(diverged, stopped=reps[0].cfg.train.on_divergence == "stop", replicas=parent is not None)
    collapsed = [lin.at_chance for lin in lineages if lin.at_chance is not None]
    if collapsed:
        raise AtChance(collapsed, replicas=parent is not None)
    return summaries


def builds_on_previous(cfg) -> bool:
    """Whether level L+1 is built from level L's training: its masks scored on L's trained weights, or those weights
    kept (lr_rewind, finetune). Not with pruning.from_dense (every level from the dense network), nor for pruning at
    initialization with weight rewinding (scores on the rewind point's weights)."""
    from lottery.pruning import scores_at

    p = cfg.pruning
    return not p.from_dense and (scores_at(p) == "after_training" or p.retrain != "weight_rewind")


def closing_summary(reps: list[Replicate], parent, finished_before: bool) -> None:
    """The end of the log: one line per level (per replicate) with its weights remaining and the test accuracy of its
    ticket and of each branch; or, when nothing was left to train, that the run was finished already."""
    where = parent if parent is not None else reps[0].folder.path
    if finished_before:
        log.info("%s is finished: every unit has its result (summary.json); nothing was trained", where)
    log.info("summary of %s (test accuracy at the end of training):", where)
    for rep in reps:
        by_level: dict[int, list[dict]] = {}
        for rec in rep.folder.results():
            by_level.setdefault(rec["level"], []).append(rec)
        for level, recs in sorted(by_level.items()):
            parts = []
            for r in recs:
                acc = (
                    "diverged"
                    if r.get("diverged")
                    else "-"
                    if r.get("test_accuracy") is None
                    else f"{r['test_accuracy']:.4f}"
                )
                parts.append(
                    f"{r['branch']} {acc}"
                    + (f" (instability {r['instability_test']:.2f})" if r.get("instability_test") is not None else "")
                )
            log.info(
                "%slevel %d  weights remaining %6.2f%%  %s",
                rep.name,
                level,
                100 * recs[0]["weights_remaining"],
                "  ".join(parts),
            )
    answer = progress.answer(reps, float(reps[0].cfg.match_tolerance))
    if answer:
        log.info("%s", answer)
