"""The whole run's progress in the log (a file too, not only a terminal): before the first step what the run will cost
(units, steps, and a time from a few timed steps of a copy of the model), then `progress:` lines with units done of
the total, elapsed time and an estimate of what is left, after every unit and at most every `train.progress_every`
seconds inside one; and at the end the answer: the sparsest ticket that still matches the dense network.

The unit counts are the run's (level, branch) records per replicate, as summary.json lists them; steps are those of
training (a branch's several copies, lmc's, count as one unit), so the estimate of what is left is an estimate.
"""

from __future__ import annotations

import copy
import logging
import time

import torch

log = logging.getLogger(__name__)

# The progress of the run_levels call now in this process (None outside one: lottery-retrain, a test's own training).
CURRENT: Progress | None = None


def duration(seconds: float) -> str:
    """`45s`, `12m 5s`, `3h 20m`: a time as people read it."""
    s = int(round(seconds))  # noqa: RUF046 - a NumPy float's round() is a float
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    return f"{s // 3600}h {s % 3600 // 60}m"


def planned_units(lin) -> list[tuple[int, str, int]]:
    """(level, branch, training steps) of every record the lineage's run makes."""
    rep, cfg = lin.rep, lin.rep.cfg
    from lottery.experiment.plan import branch_runs_at, finetune_steps

    steps = rep.steps
    out = []
    for level in range(lin.n_levels):
        if level == 0 and not cfg.pruning.train_dense:
            continue
        if level == 0:
            n = steps.total
        elif cfg.pruning.retrain == "finetune":
            n = finetune_steps(rep)
        else:
            n = steps.total - steps.rewind
        out.append((level, "ticket", n))
        for name in cfg.pruning.branches:
            if branch_runs_at(cfg.pruning, name, level):
                out.append((level, name, steps.total - (steps.rewind if level else 0)))
    return out


class Progress:
    """Counts units and steps over every replicate of the run; `step` is called by the training loop after each
    step of each training call, `unit_done` after each unit's record."""

    def __init__(self, lineages, every: float):
        self.every = every
        self.units = [(lin.rep, *u) for lin in lineages for u in planned_units(lin)]
        self.levels = max((lin.n_levels for lin in lineages), default=0)
        done = [u for u in self.units if u[0].folder.done(u[1], u[2])]
        self.total, self.done = len(self.units), len(done)
        self.total_steps = sum(u[3] for u in self.units)
        self.left_steps = self.total_steps - sum(u[3] for u in done)
        self.began = time.monotonic()
        self.last = self.began
        self.trained = 0  # network-steps trained by this process
        self.pending = 0  # of those, the steps of units without their record yet
        self.first_step: float | None = None  # when this process trained its first step (after set-up, warm-up)
        self.per_step: float | None = None  # measured before starting (seconds per network-step), if asked
        self.where = ""

    # --- before ---------------------------------------------------------------------------------------------------
    def announce(self, lin, measure: bool) -> None:
        """What the run will cost: units, steps, and (measured) time."""
        cost = f"{self.total} unit{'s' * (self.total != 1)} ({self.levels} level{'s' * (self.levels != 1)}"
        branches = list(lin.rep.cfg.pruning.branches)
        cost += f", ticket{' + ' + ' + '.join(branches) if branches else ''}"
        reps = len({id(u[0]) for u in self.units})
        cost += f", {reps} replicates)" if reps > 1 else ")"
        cost += f", {self.total_steps:,} training steps"
        if self.done:
            cost += f"; {self.done} units ({self.total_steps - self.left_steps:,} steps) done already"
        if measure and self.left_steps > 0 and lin.rep.cfg.train.compile:
            cost += "; no time estimate with train.compile (compiling would be most of what a measurement times)"
        elif measure and self.left_steps > 0:
            evals = sum(
                u[3] // max(u[0].steps.eval_every, 1) + 1 for u in self.units if not u[0].folder.done(u[1], u[2])
            )
            if self.left_steps < 10 * MEASURED_STEPS or evals < 10:
                # Measuring takes MEASURED_STEPS steps and one evaluation: more than a tenth of a run this short
                # (a 100-step Conv-2 run on CIFAR-10 with two evaluations took 21 s more, 50 s instead of 29 s).
                cost += "; no time estimate (measuring it would be a tenth of the run or more)"
            else:
                step_s, eval_s = measure_step(lin)
                self.per_step = step_s
                left = self.left_steps * step_s + evals * eval_s
                cost += (
                    f"; about {duration(left)} on this machine (measured: {1000 * step_s:.1f} ms a step, "
                    f"{eval_s:.2f} s an evaluation; train.estimate=false skips the measurement)"
                )
        log.info("this run: %s", cost)

    # --- during ---------------------------------------------------------------------------------------------------
    def unit_started(self, where: str) -> None:
        self.where = where

    def step(self, networks: int, step: int, end: int) -> None:
        now = time.monotonic()
        if self.first_step is None:
            self.first_step = now
        self.trained += networks
        self.pending += networks
        if self.every > 0 and now - self.last >= self.every:
            self._line(now, f"{self.where} at step {step} of {end}; ")

    def unit_done(self, steps: int, counted: bool = True) -> None:
        """A unit trained `steps` steps; `counted`: it is a record of its own (a branch of several units counts once,
        when the branch has its record)."""
        self.left_steps -= steps
        self.pending = max(self.pending - steps, 0)
        if counted:
            self.done += 1
            self._line(time.monotonic(), "")

    def _line(self, now: float, inside: str) -> None:
        self.last = now
        elapsed = now - self.began
        left_steps = max(self.left_steps - self.pending, 0)
        # seconds per network-step since the first step (set-up and the first call's warm-up are once only)
        rate = self.per_step
        if self.trained > 1:
            assert self.first_step is not None  # set at the first step
            rate = (now - self.first_step) / (self.trained - 1)
        left = "" if rate is None else f", about {duration(left_steps * rate)} left"
        log.info(
            "progress: %s%d/%d units done (%.0f%%); elapsed %s%s",
            inside,
            self.done,
            self.total,
            100 * self.done / max(self.total, 1),
            duration(elapsed),
            left,
        )


MEASURED_STEPS = 14  # the training steps measure_step takes (2 of warm-up, 10 timed, 2 to stop)


def measure_step(lin) -> tuple[float, float]:
    """Seconds per training step and per evaluation, from a few steps of a copy of the lineage's model on its data
    (its own batches, a fresh optimizer): nothing of the run is touched, and no random stream either (the global
    generators are restored; batches use their own). The first steps are not timed (warm-up); the one evaluation is
    the step-0 one."""
    from dataclasses import replace

    from lottery import masks as M
    from lottery.training import Hooks, Network, train

    rep = lin.rep
    first, last = 2, MEASURED_STEPS - 2
    marks: dict[str, float] = {}

    class Enough(Exception):
        pass

    def mark(name):
        marks[name] = time.perf_counter()

    def stop():
        raise Enough

    devices = [rep.device.index or 0] if rep.device.type == "cuda" else []
    # One evaluation, at step 0 (timed from the step-0 hook, which runs just before it): a second one would double the
    # measurement's cost for a small gain in precision.
    steps = replace(rep.steps, eval_every=MEASURED_STEPS)
    began = time.perf_counter()
    with torch.random.fork_rng(devices=devices):
        model = copy.deepcopy(lin.model)
        masks = M.ones(model, rep.prunable(model))
        hooks = Hooks(
            on_eval=lambda r: mark(f"eval_{r['step']}"),
            at_step={
                0: lambda: mark("eval_start"),
                first: lambda: mark("first"),
                last: lambda: mark("last"),
                last + 1: stop,
            },
        )
        try:
            train(
                [Network(model, masks, rep.batches(), hooks)],
                rep.training,
                start=0,
                end=min(last + 2, rep.steps.total),
                steps=steps,
                evaluation_threads=rep.evaluation_threads,
            )
        except Enough:
            pass
    if "last" not in marks:  # a run shorter than the measurement: what was timed is all there is
        return (time.perf_counter() - began) / max(rep.steps.total, 1), 0.0
    return (marks["last"] - marks["first"]) / (last - first), marks["eval_0"] - marks["eval_start"]


def answer(reps, tolerance: float) -> str | None:
    """The run's answer in one line: the sparsest level whose ticket's test accuracy (mean over replicates) is within
    `tolerance` of the dense network's (level 0), and each control's accuracy there. None without a dense level or a
    pruned one."""
    by_level: dict[int, dict[str, list[dict]]] = {}
    for rep in reps:
        for r in rep.folder.results():
            if r.get("test_accuracy") is not None and not r.get("diverged"):
                by_level.setdefault(r["level"], {}).setdefault(r["branch"], []).append(r)

    def mean(recs, key="test_accuracy"):
        return sum(r[key] for r in recs) / len(recs)

    dense = by_level.get(0, {}).get("ticket")
    pruned = sorted(level for level, b in by_level.items() if level > 0 and b.get("ticket"))
    if not dense or not pruned:
        return None
    reference = mean(dense)
    over = f" (mean of {len(reps)} replicates)" if len(reps) > 1 else ""
    within = f"within {100 * tolerance:.2g} points: match_tolerance={tolerance:g}"
    matching = [level for level in pruned if mean(by_level[level]["ticket"]) >= reference - tolerance]
    if not matching:
        first = by_level[pruned[0]]["ticket"]
        return (
            f"answer: no pruned ticket matches the dense network's test accuracy {reference:.4f}{over} {within}; "
            f"the least pruned, level {pruned[0]} at {100 * mean(first, 'weights_remaining'):.2f}% of the weights, "
            f"reaches {mean(first):.4f}"
        )
    level = max(matching)
    ticket = mean(by_level[level]["ticket"])
    controls = [
        f"{name} {mean(recs):.4f} ({100 * (mean(recs) - ticket):+.2f} points)"
        for name, recs in sorted(by_level[level].items())
        if name != "ticket"
    ]
    there = (
        f"; there: {', '.join(controls)}"
        if controls
        else "; no control ran there (pruning.branches, pruning.branch_levels)"
    )
    return (
        f"answer: the sparsest ticket that matches the dense network (test accuracy {reference:.4f}{over}, "
        f"{within}) is level {level}, {100 * mean(by_level[level]['ticket'], 'weights_remaining'):.2f}% of the "
        f"weights remaining, test accuracy {ticket:.4f}{there}"
    )
