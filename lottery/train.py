"""One training run of a (masked) model from step `start` to step `end`.

The loop keeps everything on the device: batches come from `data.Batches` (a function of seed and step, so a resumed
run sees the same data), losses accumulate in device tensors and are read only at evaluation, and the learning rate is
a pure function of the step, so the schedule needs no state of its own and restarts exactly at a rewind step.
"""
from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lottery.core.steps import Steps
from lottery.data import Batches, Data
from lottery.core.signals import Preempted
from lottery.core.divergence import finite_or_none, nonfinite
from lottery.masks import Masker, Masks

log = logging.getLogger(__name__)


def make_optimizer(params, ocfg, device=None) -> torch.optim.Optimizer:
    # CUDA: fused=True, one kernel for the whole update (GPU results have no fp32 baseline to keep).
    # CPU: foreach, one multi-tensor kernel per operation instead of a Python loop over parameters; bit-identical to
    # the default per-tensor loop, and a LeNet-300-100 step is 3% (two threads) to 24% (one thread) faster.
    # (fused=True on the CPU rounds differently, so CPU results would change.)
    kind = {"fused": True} if torch.device(device or "cpu").type == "cuda" else {"foreach": True}
    if ocfg.name == "sgd":
        return torch.optim.SGD(params, lr=ocfg.lr, momentum=ocfg.momentum, nesterov=ocfg.nesterov,
                               weight_decay=ocfg.weight_decay, **kind)
    if ocfg.name == "adam":
        return torch.optim.Adam(params, lr=ocfg.lr, betas=tuple(ocfg.betas), weight_decay=ocfg.weight_decay, **kind)
    if ocfg.name == "adamw":
        return torch.optim.AdamW(params, lr=ocfg.lr, betas=tuple(ocfg.betas), weight_decay=ocfg.weight_decay, **kind)
    raise ValueError(f"unknown optimizer '{ocfg.name}'; accepted: sgd, adam, adamw")


def lr_schedule(tcfg, steps: Steps) -> Callable[[int], float]:
    """Multiplier of the base learning rate for the update made at `step`."""
    milestones, warmup, total = steps.milestones, steps.warmup, steps.total

    def multiplier(step: int) -> float:
        if tcfg.schedule == "step":
            m = tcfg.gamma ** sum(step >= s for s in milestones)
        elif tcfg.schedule == "cosine":
            m = 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        else:
            m = 1.0
        if step < warmup:
            m *= (step + 1) / warmup
        return m

    return multiplier


# Evaluation feeds the model at most this many examples at once, on every device: a 10,000-example Conv-2 forward
# peaks at 7.5 GB of activations (about 8 GB on a GPU for Conv-2/4/6 and VGG on CIFAR-10) instead of 0.8 GB, and is
# no faster. Results do not depend on it: the loss is still summed per `train.eval_batch_size` batch, and chunked
# logits came out bit-identical to unchunked ones on the CPU for LeNet-300-100, Conv-2 and ResNet-20.
EVAL_CHUNK = 1000
# On a CPU, convolutional models go 100 at a time: a 1000-example chunk's activations (262 MB per Conv-2 layer) are
# fresh page-faulted memory on every forward, 100-example ones are reused from the heap. Measured (2026-11-29, 2-core
# CPU, 2 threads, examples/s at 1000 -> 100): Conv-2 512 -> 1,116, Conv-6 240 -> 378, VGG-11 257 -> 374, ResNet-20
# 643 -> 1,050, with bit-identical losses and accuracies; LeNet-300-100 would slow down (139k -> 94k), so MLPs keep 1000.
CPU_CONV_EVAL_CHUNK = 100


def eval_chunk(model: nn.Module, device) -> int:
    """Examples per forward in evaluation (EVAL_CHUNK, CPU_CONV_EVAL_CHUNK)."""
    conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return CPU_CONV_EVAL_CHUNK if torch.device(device).type == "cpu" and conv else EVAL_CHUNK


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, precision: str = "fp32"):
    """(mean loss, accuracy) over a whole split held on the device; one host sync per call."""
    if len(x) == 0:
        return None, None
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    # Each batch goes through the model in chunks (eval_chunk; a small trailing chunk may differ in the last bit).
    chunk = min(batch_size, eval_chunk(model, x.device))
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            out = model(xb) if len(xb) <= chunk else torch.cat([model(xb[j:j + chunk])
                                                                for j in range(0, len(xb), chunk)])
            out = out.float()
            loss += F.cross_entropy(out, y[i:i + batch_size], reduction="sum")
            correct += (out.argmax(1) == y[i:i + batch_size]).sum()
    model.train(was_training)
    loss_sum, n_correct = torch.stack([loss, correct.to(loss.dtype)]).tolist()
    return loss_sum / len(x), n_correct / len(x)


def early_stop(evals: list[dict]) -> dict:
    """The lottery-ticket paper's early-stop iteration: the evaluation with minimum validation loss."""
    scored = [e for e in evals if e.get("val_loss") is not None]
    if not scored:
        return {"early_stop_step": None, "early_stop_test_accuracy": None, "early_stop_val_loss": None}
    best = min(scored, key=lambda e: e["val_loss"])  # ties: the earliest
    return {"early_stop_step": best["step"], "early_stop_test_accuracy": best["test_accuracy"],
            "early_stop_val_loss": best["val_loss"]}


@dataclass
class Hooks:
    """What the loop calls besides training: all optional, all cheap when unused."""
    on_eval: Optional[Callable[[dict], None]] = None  # every evaluation record
    on_log: Optional[Callable[[dict], None]] = None  # mean training loss every `log_every` steps
    log_every: int = 0
    at_step: dict[int, Callable[[], None]] = field(default_factory=dict)  # after k steps (rewind capture, faults)
    checkpoint: Optional[Callable[[dict], None]] = None  # called with the loop's state every `checkpoint_every`
    checkpoint_every: int = 0
    should_stop: Callable[[], bool] = lambda: False  # checked after each step: checkpoint, then raise Preempted


def train(model: nn.Module, masks: Masks, data: Data, cfg, *, start: int, data_seed: int, steps: Optional[Steps] = None,
          end: Optional[int] = None, hooks: Optional[Hooks] = None, desc: str = "train",
          resume: Optional[dict] = None) -> dict:
    """Train `model` in place from step `start` to `end` (default: the end of training) and return its metrics.

    `steps` holds the run's durations resolved once (computed from `cfg` when not given). `resume` is a state handed
    to `hooks.checkpoint` (same arguments otherwise): the loop continues after its step and ends bit-identical to an
    uninterrupted run.
    """
    tcfg = cfg.train
    batches = Batches(data, tcfg.batch_size, seed=data_seed)
    steps = steps or Steps.resolve(cfg, batches.steps_per_epoch)
    end = steps.total if end is None else end
    hooks = hooks or Hooks()
    multiplier = lr_schedule(tcfg, steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.optimizer, data.train_x.device)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    mask_weights = Masker(model, masks)
    forward = torch.compile(model) if tcfg.compile else model
    device = data.train_x.device
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=tcfg.precision == "bf16")
    at_step, log_every = hooks.at_step, hooks.log_every if hooks.on_log else 0

    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    log_sum = torch.zeros((), device=device)
    evals: list[dict] = []
    step = start
    diverged_at: Optional[int] = None  # divergence: read only where the loop already syncs (evaluations, loss logs)
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        step, evals = resume["step"], list(resume["evals"])
        loss_sum += resume["loss_sum"].to(device)
        loss_count = resume["loss_count"]
        log_sum += resume["log_sum"].to(device)

    def run_eval() -> None:
        nonlocal loss_count, diverged_at
        val_loss, val_acc = evaluate(model, data.val_x, data.val_y, tcfg.eval_batch_size, tcfg.precision)
        test_loss, test_acc = evaluate(model, data.test_x, data.test_y, tcfg.eval_batch_size, tcfg.precision)
        record = {"step": step, "train_loss": (loss_sum / loss_count).item() if loss_count else None,
                  "val_loss": val_loss, "val_accuracy": val_acc, "test_loss": test_loss, "test_accuracy": test_acc,
                  "lr": base_lrs[0] * multiplier(max(step - 1, 0))}
        if nonfinite(record["train_loss"], val_loss, test_loss):
            diverged_at = step
            # the accuracy of a network of NaNs is chance, not a measurement of it: only the step and rate stay
            record = {**dict.fromkeys(record), "step": step, "lr": record["lr"], "diverged": True}
        loss_sum.zero_()
        loss_count = 0
        evals.append(record)
        if hooks.on_eval:
            hooks.on_eval(record)

    def state() -> dict:
        return {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "evals": evals,
                "loss_sum": loss_sum.cpu(), "loss_count": loss_count, "log_sum": log_sum.cpu()}

    model.train()
    if resume is None:
        mask_weights()
        if start in at_step:
            at_step[start]()
        run_eval()
    bar = tqdm(total=end - start, initial=step - start, desc=desc, leave=False, dynamic_ncols=True,
               disable=not (tcfg.progress and sys.stderr.isatty()))
    try:
        while step < end and diverged_at is None:
            x, y = batches.get(step)
            m = multiplier(step)
            for g, lr in zip(optimizer.param_groups, base_lrs):
                g["lr"] = lr * m
            with torch.autocast(**autocast):
                loss = F.cross_entropy(forward(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            mask_weights()
            loss = loss.detach().float()
            loss_sum += loss
            loss_count += 1
            step += 1
            bar.update(1)
            if log_every:
                log_sum += loss
                if step % log_every == 0:
                    logged = {"step": step, "train_loss": (log_sum / log_every).item(), "lr": base_lrs[0] * m}
                    hooks.on_log(finite_or_none(logged))
                    log_sum.zero_()
                    if nonfinite(logged["train_loss"]):
                        run_eval()  # record the state it diverged in, then stop the unit
                        break
            if step in at_step:
                at_step[step]()
            if step % steps.eval_every == 0 or step == end:
                run_eval()
                if diverged_at is not None:
                    break
                if evals[-1]["test_accuracy"] is not None:  # an empty test split has no accuracy
                    bar.set_postfix(test_acc=f"{evals[-1]['test_accuracy']:.4f}", refresh=False)
            if hooks.checkpoint is not None and step < end:
                if hooks.should_stop():
                    hooks.checkpoint(state())
                    raise Preempted(f"stopped at step {step}; checkpoint written")
                if hooks.checkpoint_every and step % hooks.checkpoint_every == 0:
                    hooks.checkpoint(state())
    finally:
        bar.close()
    last = evals[-1]
    result = {"steps": end, "start_step": start, "final_step": step, "evals": evals,
              "test_accuracy": last["test_accuracy"], "test_loss": last["test_loss"],
              "val_loss": last["val_loss"], "val_accuracy": last["val_accuracy"], **early_stop(evals),
              "diverged": diverged_at is not None, "diverged_step": diverged_at}
    if diverged_at is not None:  # no final metrics: a diverged network's are chance, not a result
        result["last_finite_step"] = evals[-2]["step"] if len(evals) > 1 else None
    return result
