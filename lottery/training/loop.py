"""The training loop: one or many networks (a single unit, replicates, a level's ticket and its controls) from step
`start` to step `end`, with the same code for the schedule, evaluation, divergence, checkpoints and results.

How the networks compute is the layout's (lottery.training.layouts): `interleaved` (each network its own model and
batch; with one network, the single run) or `stacked` (one batched model). Everything else is here and the same for
both: batches are a function of (seed, step) (lottery.data.Batches), so a resumed run sees the same data; losses
accumulate in device tensors and are read only at evaluations and loss logs; the learning rate is a pure function of
the step, so the schedule needs no state and restarts exactly at a rewind step; pruned weights are overwritten with
zero after every optimizer step (lottery.masks.Masker, the one place masks touch weights during training).

Masks that change during training are a mask updater's (lottery.training.updaters): the loop calls it at fixed points
(before the first step, after the backward pass, after the optimizer step, after each evaluation), re-applies the
masks it says it changed, stops a network it says is finished, and stores its state in the checkpoint; what it does
is its own. Without one (static sparsity) none of this runs.

A network whose loss turns NaN or infinite is done at that evaluation (or training-loss log): its record says
`diverged` (lottery.core.divergence); the others train on, unaffected (nothing couples the networks).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from lottery.config import TrainConfig
from lottery.core.divergence import finite_or_none, nonfinite
from lottery.core.registry import plain
from lottery.core.signals import Preempted
from lottery.core.spans import EVAL, STEP, span
from lottery.core.steps import Steps
from lottery.core.threads import evaluation_threads as threads_for_evaluation
from lottery.data import Batches
from lottery.masks import Masker, Masks
from lottery.training.evaluation import early_stop
from lottery.training.layouts import LAYOUTS, keep_freed_memory
from lottery.training.optimizers import make_optimizer
from lottery.training.schedule import lr_schedule
from lottery.training.updaters import Context, MaskUpdater, checkpoint_state, make_layers

log = logging.getLogger(__name__)


@dataclass
class Hooks:
    """What the loop calls for a network besides training it: all optional, all cheap when unused."""

    on_eval: Callable[[dict], None] | None = None  # every evaluation record
    on_log: Callable[[dict], None] | None = None  # mean training loss every `log_every` steps
    log_every: int = 0
    at_step: dict[int, Callable[[], None]] = field(default_factory=dict)  # after k steps (rewind capture, callbacks)
    checkpoint: Callable[[dict], None] | None = None  # called with the network's state every `checkpoint_every`
    checkpoint_every: int = 0
    should_stop: Callable[[], bool] = lambda: False  # checked after each step: checkpoint, then raise Preempted


@dataclass(frozen=True)
class Training:
    """What the loop reads of a run's config, typed: the `train` settings (lottery.config.TrainConfig: schedule,
    evaluation batch size, precision, compile, progress bar) and the optimizer's node as plain values (`name`, `lr`,
    `weight_decay` and the optimizer's own settings, checked again by make_optimizer). Nothing else of the config
    reaches the loop."""

    train: TrainConfig
    optimizer: dict

    @classmethod
    def of(cls, cfg) -> Training:
        """From a run's config: the typed one (lottery.config.typed, as the experiment holds it) or any config with
        `train` and `optimizer` nodes (a DictConfig, a test's or a script's)."""
        t = cfg.train
        return cls(t if isinstance(t, TrainConfig) else TrainConfig(**plain(t)), plain(cfg.optimizer))


@dataclass
class Network:
    """One network of a training call: its model (weights and masks applied), its batches (split and data seed),
    its hooks, the checkpoint it resumes from (the state a `hooks.checkpoint` call received), if any, and the seed of
    its mask updates (a mask updater's random choices)."""

    model: nn.Module
    masks: Masks
    batches: Batches
    hooks: Hooks = field(default_factory=Hooks)
    resume: dict | None = None
    seed: int = 0


def train(
    networks: list[Network],
    run,
    *,
    start: int,
    steps: Steps,
    end: int | None = None,
    layout: str = "interleaved",
    desc: str = "train",
    lr: Callable[[int], float] | None = None,
    updater: tuple | None = None,
    on_step: Callable[[int, int, int], None] | None = None,
    evaluation_threads: int | None = None,
) -> list[dict]:
    """Train every network in place from step `start` to `end` (default: the end of training) and return one result
    per network: its evaluations, final and early-stop metrics, and whether it diverged. Resumed networks continue
    after their checkpoint's step and end bit-identical to an uninterrupted run.

    `lr`: the multiplier of the base learning rate at each step (default: the schedule of `train.*`; fine-tuning
    holds the final one). `updater`: (a MaskUpdater class, its settings) of lottery.training.updaters: the masks
    change during training (each network's masks are edited in place, and its result adds the updater's keys).
    `on_step(networks, step, end)`: called after every step (the whole run's progress). `run`: the `Training` (what
    the experiment passes), or a config to take it from (`Training.of`). `evaluation_threads`: the thread count
    evaluations get (lottery.core.threads.Threads.evaluation; None: the training count)."""
    run = run if isinstance(run, Training) else Training.of(run)
    tcfg = run.train
    end = steps.total if end is None else end
    n = len(networks)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout '{layout}'; accepted: {', '.join(LAYOUTS)}")
    resumed = [nw.resume is not None for nw in networks]
    if any(resumed) and not all(resumed):
        raise ValueError("a batch of networks resumes all its networks or none")
    resumes = [nw.resume for nw in networks if nw.resume is not None]
    if any(resumed) and len({r["step"] for r in resumes}) > 1:
        raise ValueError("a batch of networks resumes all its networks from the same step")
    for nw in networks:
        if nw.resume is not None:
            nw.model.load_state_dict(nw.resume["model"])
    if n > 1:
        keep_freed_memory()
    net = LAYOUTS[layout]([nw.model for nw in networks], [nw.batches for nw in networks])
    device = net.device
    multiplier = lr or lr_schedule(tcfg, steps)
    optimizer = make_optimizer([p for p in net.parameters() if p.requires_grad], run.optimizer, device)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    mask_weights = Masker(net, net.named_masks([nw.masks for nw in networks]))
    stopped_at: list[int | None] = [None] * n  # the step the updater ended a network's training at
    frozen: dict[int, dict] = {}  # a stopped network's state there (a stacked layout computes every network on)
    mask_updater: MaskUpdater | None = None  # the updater, made from `updater` (its class and settings)
    if updater is not None:
        kind, settings = updater
        layers = make_layers(net.mask_slices(mask_weights), n)
        mask_updater = kind(
            settings,
            Context(
                steps.total,
                start,
                end,
                [nw.seed for nw in networks],
                layers,
                [nw.model for nw in networks],
                net.network_parameters,
            ),
        )
    if tcfg.compile:
        net.compile_in_place()
    autocast = {"device_type": device.type, "dtype": torch.bfloat16, "enabled": tcfg.precision == "bf16"}
    hooks = [nw.hooks for nw in networks]
    log_every = next((h.log_every for h in hooks if h.on_log), 0)
    at_steps = {s for h in hooks for s in h.at_step}
    can_checkpoint = all(h.checkpoint is not None for h in hooks)
    ckpt_every = hooks[0].checkpoint_every

    loss_sum = torch.zeros(n, device=device)
    loss_count = [0] * n
    log_sum = torch.zeros(n, device=device)
    evals: list[list[dict]] = [[] for _ in networks]
    step = start
    diverged_at: list[int | None] = [None] * n
    if all(resumed):
        optimizer.load_state_dict(net.optimizer_state([r["optimizer"] for r in resumes]))
        step = resumes[0]["step"]
        evals = [list(r["evals"]) for r in resumes]
        diverged_at = [e[-1]["step"] if e and e[-1].get("diverged") else None for e in evals]
        if mask_updater is not None:
            for u, r in enumerate(resumes):
                for i in mask_updater.load_state_dict(u, checkpoint_state(mask_updater.name, r)):
                    mask_weights.refresh(i)
            net.sync_masks(mask_weights, [nw.masks for nw in networks])
            for u, r in enumerate(resumes):
                if mask_updater.finished(u):  # stopped before the checkpoint: at its last evaluation
                    stopped_at[u], frozen[u] = evals[u][-1]["step"], r["model"]
        loss_sum += torch.stack([r["loss_sum"].reshape(()) for r in resumes]).to(device)
        loss_count = [r["loss_count"] for r in resumes]
        log_sum += torch.stack([r["log_sum"].reshape(()) for r in resumes]).to(device)

    def active() -> list[int]:
        return [u for u in range(n) if diverged_at[u] is None and stopped_at[u] is None]

    def apply(changed: list[int]) -> None:
        """The updater changed these mask tensors: apply them from now on, and to each network's own masks."""
        for i in changed:
            mask_weights.refresh(i)
        mask_weights()
        if changed:
            net.sync_masks(mask_weights, [nw.masks for nw in networks])

    def stop_finished() -> None:
        """Networks the updater says are done end here; their last record is at this step."""
        assert mask_updater is not None  # called only with an updater
        done = [u for u in active() if mask_updater.finished(u)]
        for u in done:
            stopped_at[u] = step
            net.sync(u)
            frozen[u] = {k: v.detach().clone() for k, v in networks[u].model.state_dict().items()}
        late = [u for u in done if evals[u][-1]["step"] != step]
        if late:
            run_eval(late)

    def run_eval(which: list[int]) -> None:
        """Evaluate the networks in `which` (an evaluation step: every active one; a loss log that saw a non-finite
        loss: those whose loss it was) and append their records."""
        with threads_for_evaluation(evaluation_threads), span(EVAL):
            val = net.evaluate("val", tcfg.eval_batch_size, tcfg.precision, which)
            test = net.evaluate("test", tcfg.eval_batch_size, tcfg.precision, which)
        counts = torch.tensor([max(c, 1) for c in loss_count], dtype=loss_sum.dtype, device=device)
        train_loss = (loss_sum / counts).tolist()
        lr = base_lrs[0] * multiplier(max(step - 1, 0))
        for u in which:
            val_u, test_u = val[u], test[u]
            assert val_u is not None and test_u is not None  # evaluated: u is in `which`
            record = {
                "step": step,
                "train_loss": train_loss[u] if loss_count[u] else None,
                **{f"val_{k}": v for k, v in val_u.items()},
                **{f"test_{k}": v for k, v in test_u.items()},
                "lr": lr,
            }
            if nonfinite(record["train_loss"], record["val_loss"], record["test_loss"]):
                diverged_at[u] = step
                # the accuracy of a network of NaNs is chance, not a measurement of it: only the step and rate stay
                record = {**dict.fromkeys(record), "step": step, "lr": lr, "diverged": True}
            loss_sum[u] = 0
            loss_count[u] = 0
            evals[u].append(record)
            if (on_eval := hooks[u].on_eval) is not None:
                on_eval(record)

    def call_at_step(s: int) -> None:
        for u, h in enumerate(hooks):
            if s in h.at_step:
                net.sync(u)  # the hook sees this network's weights now
                h.at_step[s]()

    def checkpoint() -> None:
        states, opt_states = net.states(), net.optimizer_states(optimizer.state_dict())
        for u, state in frozen.items():
            states[u] = state
        sums, logs = loss_sum.cpu(), log_sum.cpu()
        for u, h in enumerate(hooks):
            state = {
                "step": step,
                "model": states[u],
                "optimizer": opt_states[u],
                "evals": evals[u],
                "loss_sum": sums[u].clone(),
                "loss_count": loss_count[u],
                "log_sum": logs[u].clone(),
            }
            if mask_updater is not None:
                state["updater"] = mask_updater.state_dict(u)
            assert h.checkpoint is not None  # checkpoint() is called only when every network has one
            h.checkpoint(state)

    net.train()
    if not all(resumed):
        if mask_updater is not None:
            apply(mask_updater.begin(start))
        mask_weights()
        if start in at_steps:
            call_at_step(start)
        run_eval(active())
    bar = tqdm(
        total=end - start,
        initial=step - start,
        desc=desc,
        leave=False,
        dynamic_ncols=True,
        disable=not (tcfg.progress and sys.stderr.isatty()),
    )
    try:
        while step < end and active():
            m = multiplier(step)
            for g, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):
                g["lr"] = base_lr * m
            with span(STEP):  # for torch.profiler (lottery.core.spans)
                optimizer.zero_grad(set_to_none=True)
                on = [d is None and s is None for d, s in zip(diverged_at, stopped_at)]
                losses = net.backward(step, autocast, on)
                if mask_updater is None:
                    optimizer.step()
                    mask_weights()
                else:
                    changed, skip = mask_updater.after_backward(step + 1, optimizer, on)  # skip: it took the gradient
                    if not skip:
                        optimizer.step()
                    apply(changed + mask_updater.after_step(step + 1, optimizer, on))
            loss_sum += losses
            for u in range(n):
                loss_count[u] += 1
            step += 1
            bar.update(1)
            if on_step is not None:
                on_step(n, step, end)
            if log_every:
                log_sum += losses
                if step % log_every == 0:
                    values = (log_sum / log_every).tolist()
                    log_sum.zero_()
                    for u in active():
                        if (on_log := hooks[u].on_log) is not None:
                            on_log(finite_or_none({"step": step, "train_loss": values[u], "lr": base_lrs[0] * m}))
                    bad = [u for u in active() if nonfinite(values[u])]
                    if bad:
                        run_eval(bad)  # record the state each diverged in; those networks are done
            if step in at_steps:
                call_at_step(step)
            if step % steps.eval_every == 0 or step == end:
                run_eval(active())
                last = next((evals[u][-1] for u in active()), None)
                if n == 1 and last is not None and last["test_accuracy"] is not None:
                    bar.set_postfix(test_acc=f"{last['test_accuracy']:.4f}", refresh=False)
                if mask_updater is not None:
                    apply(mask_updater.at_eval(step, {u: evals[u][-1] for u in active()}))
            if mask_updater is not None:
                stop_finished()
            if can_checkpoint and step < end and active():
                if hooks[0].should_stop():
                    checkpoint()
                    raise Preempted(f"stopped at step {step}; checkpoint written")
                if ckpt_every and step % ckpt_every == 0:
                    checkpoint()
    finally:
        bar.close()
    net.sync()
    for u, state in frozen.items():
        networks[u].model.load_state_dict(state)
    results = []
    for u in range(n):
        last = evals[u][-1]
        since = mask_updater.counts_final_from(u) if mask_updater is not None else None
        final = diverged_at[u] if diverged_at[u] is not None else stopped_at[u] if stopped_at[u] is not None else step
        result = {
            "steps": end,
            "start_step": start,
            "final_step": final,
            "evals": evals[u],
            **{k: v for k, v in last.items() if k.startswith(("test_", "val_"))},
            **early_stop([e for e in evals[u] if since is None or e["step"] >= since]),
            "diverged": diverged_at[u] is not None,
            "diverged_step": diverged_at[u],
        }
        if diverged_at[u] is not None:  # no final metrics: a diverged network's are chance, not a result
            result["last_finite_step"] = evals[u][-2]["step"] if len(evals[u]) > 1 else None
        if mask_updater is not None:
            result.update(mask_updater.result(u))
        results.append(result)
    return results
