"""Batched training: many networks of one architecture (replicates, a level's ticket and its controls) in one loop.

Two layouts (`LAYOUTS`), chosen per model and device by lottery.replicas.layout:

stacked: every parameter and buffer gets a leading dimension of size U (one entry per network) and keeps its name, so
network u's state is `{k: v[u]}`. Activations fold the networks into the channel dimension, `[B, U*C, H, W]` and
`[B, U*F]`: a convolution becomes one grouped convolution (groups = U), a Linear one batched matmul, a BatchNorm one
BatchNorm over U*C channels (so each network keeps its own running statistics), and every parameter-free op the models
use (ReLU, pooling, flatten, residual sums) already acts per channel, so the models' own `forward` runs unchanged. This
is what fills a GPU, and it wins for MLPs on a CPU. Batched matmuls and grouped convolutions round differently from
single ones, so losses agree with single runs to float32 round-off, not bit for bit.

interleaved: each network keeps its own model and runs its own forward on its own batch, but all of them share one
step: one backward, one multi-tensor optimizer step over every network's parameters, one data pipeline, one loop,
evaluation and checkpointing. The arithmetic is exactly each single run's, so results equal single runs bit for bit;
what it saves is per-step overhead. It is what a CPU wants for convolutional networks, whose stacked activations
outgrow the caches (measured in lottery.replicas.layout).

Both: each network's update is its own (the loss is the sum of the networks' mean losses, so each gradient is its
network's; SGD, Adam and AdamW act element-wise; masks are applied by overwriting), a NaN in one network stays there,
and checkpoints are written per network in the single-run format, so either layout (or a single run) resumes them.

Why explicit stacked layers and not torch.func (stack_module_state + functional_call + vmap): measured on the 2-core
CPU, 8 LeNet-300-100 networks, batch 60, Adam, one thread, a busy machine: 8 separate models 7,634 samples/s, vmap
7,870, explicit layers 9,064 (and 5,544 / 5,863 / 7,407 in a second interleaved run); with two threads 471 / 752 / 853.
The explicit layers were never slower, and vmap cannot update BatchNorm running statistics in place, so it would need a
functional BatchNorm anyway; the channel fold gives BatchNorm for free.
"""
from __future__ import annotations

import copy
import logging
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lottery.core.steps import Steps
from lottery.data import Split, _augment, draw_epoch, to_device
from lottery.core.divergence import finite_or_none, nonfinite
from lottery.masks import Masker, Masks
from lottery.train import Hooks, early_stop, lr_schedule, make_optimizer
from lottery.core.signals import Preempted
from lottery.train import evaluate as single_evaluate

log = logging.getLogger(__name__)

SUPPORTED = (nn.Linear, nn.Conv2d, nn.BatchNorm2d)


class BatchedLinear(nn.Module):
    def __init__(self, n: int, lin: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, *lin.weight.shape))
        self.bias = nn.Parameter(torch.empty(n, *lin.bias.shape)) if lin.bias is not None else None

    def forward(self, x):
        # In: [B, n*in] (after a flatten) or [B, n, in] (another BatchedLinear's output). Out: [B, n, out], a view of
        # the [n, out, B] that the batched matmul writes: the same fold (reshaping it gives the [B, U*F] layout), the
        # next BatchedLinear reads it back without a copy, and the weight gradient (grad_out @ x^T) comes out in the
        # weight's own layout, so autograd does not copy it (measured: those copies took a quarter of a batched
        # LeNet-300-100 step).
        b = x.shape[0]
        n, o, i = self.weight.shape
        xt = x.reshape(b, n, i).permute(1, 2, 0)  # [n, in, B]
        if x.dim() == 2:
            xt = xt.contiguous()
        yt = (torch.bmm(self.weight, xt) if self.bias is None
              else torch.baddbmm(self.bias.unsqueeze(2), self.weight, xt))
        return yt.permute(2, 0, 1)


class BatchedConv2d(nn.Module):
    def __init__(self, n: int, conv: nn.Conv2d):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"batched training supports Conv2d with numeric zero padding, got padding={conv.padding}, "
                             f"padding_mode={conv.padding_mode}")
        self.n, self.stride, self.padding, self.dilation, self.groups = (n, conv.stride, conv.padding, conv.dilation,
                                                                         conv.groups)
        self.weight = nn.Parameter(torch.empty(n, *conv.weight.shape))
        self.bias = nn.Parameter(torch.empty(n, *conv.bias.shape)) if conv.bias is not None else None

    def forward(self, x):
        bias = None if self.bias is None else self.bias.flatten()
        return F.conv2d(x, self.weight.flatten(0, 1), bias, self.stride, self.padding, self.dilation,
                        self.groups * self.n)


class BatchedBatchNorm2d(nn.Module):
    def __init__(self, n: int, bn: nn.BatchNorm2d):
        super().__init__()
        if not bn.track_running_stats or bn.momentum is None:
            raise ValueError("batched training supports BatchNorm2d with running statistics and a fixed momentum")
        self.eps, self.momentum = bn.eps, bn.momentum
        c = bn.num_features
        self.weight = nn.Parameter(torch.empty(n, c)) if bn.affine else None
        self.bias = nn.Parameter(torch.empty(n, c)) if bn.affine else None
        self.register_buffer("running_mean", torch.empty(n, c))
        self.register_buffer("running_var", torch.empty(n, c))
        self.register_buffer("num_batches_tracked", torch.zeros(n, dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.num_batches_tracked.add_(1)
        flat = lambda t: None if t is None else t.view(-1)  # noqa: E731 - views: the kernel updates the buffers in place
        return F.batch_norm(x, flat(self.running_mean), flat(self.running_var), flat(self.weight), flat(self.bias),
                            self.training, self.momentum, self.eps)


_BATCHED = {nn.Linear: BatchedLinear, nn.Conv2d: BatchedConv2d, nn.BatchNorm2d: BatchedBatchNorm2d}


def unsupported_layer(model: nn.Module) -> Optional[tuple[str, str]]:
    """(name, type) of the first module holding parameters or buffers that `stack` cannot batch, or None."""
    for mod_name, mod in model.named_modules():
        own = [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]
        if own and type(mod) not in _BATCHED:
            return mod_name, type(mod).__name__
    return None


def check_supported(model: nn.Module, name: str) -> None:
    """Stacked training needs every layer with state to be one of SUPPORTED; else one error naming the first that is
    not."""
    bad = unsupported_layer(model)
    if bad:
        raise ValueError(f"replicas: model '{name}' has a {bad[1]} layer ('{bad[0]}') that stacked training does not "
                         f"support (supported layers: Linear, Conv2d, BatchNorm2d); use replica_batching=interleaved "
                         f"(or auto), which trains any model")


def stack(models: list[nn.Module]) -> nn.Module:
    """One module holding all `models` (same architecture), their state stacked along a new first dimension."""
    n = len(models)
    batched = copy.deepcopy(models[0])
    for parent in list(batched.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) in _BATCHED:
                setattr(parent, child_name, _BATCHED[type(child)](n, child))
    states = [m.state_dict() for m in models]
    batched.load_state_dict({k: torch.stack([s[k] for s in states]) for k in states[0]})
    return batched.to(next(iter(states[0].values())).device)


def fold(x: torch.Tensor) -> torch.Tensor:
    """[B, U, C, ...] per-network inputs -> [B, U*C, ...], the layout the batched modules take."""
    return x.flatten(1, 2)


def unfold_logits(out: torch.Tensor, n: int) -> torch.Tensor:
    return out.reshape(out.shape[0], n, -1)


@torch.no_grad()
def check_forward(batched: nn.Module, models: list[nn.Module], x: torch.Tensor) -> None:
    """The batched forward must equal the single forwards (to round-off): a model whose forward mixes channels (and so
    networks) is refused instead of trained wrong."""
    was = [m.training for m in models], batched.training
    batched.eval()
    for m in models:
        m.eval()
    try:
        want = torch.stack([m(x) for m in models], 1)
        got = unfold_logits(batched(fold(x.unsqueeze(1).expand(-1, len(models), *x.shape[1:]))), len(models))
    finally:
        batched.train(was[1])
        for m, w in zip(models, was[0]):
            m.train(w)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=1e-4, equal_nan=True):
        raise ValueError("replicas: this model's forward does not act per channel (its stacked outputs differ from "
                         "the single model's), so it cannot be trained stacked; use replica_batching=interleaved, which "
                         "trains any model")


class Stacked(nn.Module):
    """The networks as one stacked model (`stack`): one batched matmul or grouped convolution per layer for all of
    them. Takes per-network inputs [B, U, ...] and gives per-network logits [B, U, K]."""

    def __init__(self, models: list[nn.Module], sample: torch.Tensor):
        super().__init__()
        self.n = len(models)
        self.net = stack(models)
        check_forward(self.net, models, sample)

    def forward(self, x):
        return unfold_logits(self.net(fold(x)), self.n)

    def backward(self, x, y, autocast: dict) -> torch.Tensor:
        """Forward and backward of every network's mean training loss; returns the losses [U], detached. The sum's
        gradient is each network's own gradient."""
        with torch.autocast(**autocast):
            out = self(x)
            losses = F.cross_entropy(out.flatten(0, 1), y.reshape(-1), reduction="none").view(y.shape).mean(0)
        losses.sum().backward()
        return losses.detach().float()

    def states(self) -> list[dict]:
        """Every network's state_dict (copies), as the single model names it."""
        state = self.net.state_dict()
        return [{k: v[u].clone() for k, v in state.items()} for u in range(self.n)]

    def named_masks(self, masks: list[Masks]) -> Masks:
        """The networks' masks under this module's parameter names (for Masker): here stacked."""
        return {f"net.{k}": torch.stack([m[k] for m in masks]) for k in masks[0]}

    def optimizer_state(self, states: list[dict]) -> dict:
        """The batched optimizer's state from each network's (a single run's) optimizer state."""
        out = copy.deepcopy(states[0])
        for i, st in out["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    st[k] = torch.stack([s["state"][i][k] for s in states])
        return out

    def optimizer_states(self, state: dict) -> list[dict]:
        """Each network's optimizer state, as a single run's optimizer would hold it."""
        return [{"state": {i: {k: (v[u].clone() if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in st.items()}
                           for i, st in state["state"].items()},
                 "param_groups": state["param_groups"]} for u in range(self.n)]


class Interleaved(nn.Module):
    """The networks side by side, each through its own model on its own batch, in one step: one optimizer step
    (multi-tensor over every network's parameters), one data pipeline and loop. Each network computes exactly what its
    single run computes, so results equal single runs bit for bit; what it saves is the per-step overhead, not
    arithmetic. Used where stacking loses (convolutions on a CPU: see lottery.replicas.layout) or cannot batch a layer.
    Evaluation runs each network through lottery.train.evaluate (`evaluate` below)."""

    def __init__(self, models: list[nn.Module], sample: Optional[torch.Tensor] = None):  # sample: as Stacked's
        super().__init__()
        self.n = len(models)
        self.nets = nn.ModuleList(copy.deepcopy(m) for m in models)
        self.per_net = sum(1 for p in models[0].parameters() if p.requires_grad)

    def backward(self, x, y, autocast: dict) -> torch.Tensor:
        # One network at a time, as its single run does (so exactly its arithmetic): only one network's activations are
        # alive at once, so the memory is a single run's however many networks there are.
        losses = []
        for u, net in enumerate(self.nets):
            with torch.autocast(**autocast):
                loss = F.cross_entropy(net(x[:, u]), y[:, u])
            loss.backward()
            losses.append(loss.detach())
        return torch.stack(losses).float()

    def states(self) -> list[dict]:
        return [{k: v.clone() for k, v in net.state_dict().items()} for net in self.nets]

    def named_masks(self, masks: list[Masks]) -> Masks:
        return {f"nets.{u}.{k}": v for u, m in enumerate(masks) for k, v in m.items()}

    def optimizer_state(self, states: list[dict]) -> dict:
        # one parameter group (make_optimizer): network u's parameter i is parameter u * per_net + i
        out = {"state": {}, "param_groups": copy.deepcopy(states[0]["param_groups"])}
        for u, st in enumerate(states):
            out["state"].update({u * self.per_net + i: v for i, v in st["state"].items()})
        out["param_groups"][0]["params"] = list(range(self.n * self.per_net))
        return out

    def optimizer_states(self, state: dict) -> list[dict]:
        p = self.per_net
        groups = copy.deepcopy(state["param_groups"])
        groups[0]["params"] = list(range(p))
        return [{"state": {i - u * p: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
                           for i, st in state["state"].items() if u * p <= i < (u + 1) * p},
                 "param_groups": groups} for u in range(self.n)]


LAYOUTS = {"stacked": Stacked, "interleaved": Interleaved}


_MALLOC_SET = []


def keep_freed_memory() -> None:
    """Let glibc keep freed blocks of up to 32 MB for reuse instead of returning them to the system. Stacked tensors
    are U times larger, past glibc's default mmap threshold, so each step's temporaries (Adam's sqrt, gradients)
    were fresh mappings paid in page faults: measured, 8 batched LeNet-300-100 networks went from 0.8-0.94x to
    1.0x of 8 single runs on this CPU with this setting alone. Process-wide, and numerically a no-op."""
    if _MALLOC_SET:
        return
    _MALLOC_SET.append(True)
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(M_TRIM_THRESHOLD, 256 * 2**20)
        libc.mallopt(M_TOP_PAD, 64 * 2**20)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


@dataclass
class Member:
    """One network of a batched run: what a single `lottery.train.train` call would get."""
    model: nn.Module
    masks: Masks
    split: Split  # its training / validation examples in a shared pool
    data_seed: int
    hooks: Hooks
    resume: Optional[dict] = None  # a checkpoint of a single or batched run at the batch's first step
    desc: str = ""


class _Data:
    """Per-network batches, [B, U, ...]: network u's batch at step t is exactly the one `Batches` gives a
    single run with its split and data seed (same indices, same augmentation draws)."""

    def __init__(self, members: list[Member], batch_size: int):
        self.members, self.n, self.batch_size = members, len(members), batch_size
        self.pools = [m.split.pool for m in members]
        self.shared = all(p is self.pools[0] for p in self.pools)
        keys, self.key_of = {}, []
        for m in members:
            k = (id(m.split), m.data_seed)
            if k not in keys:
                keys[k] = (m.split, m.data_seed)
            self.key_of.append(list(keys).index(k))
        self.sources = list(keys.values())
        self.augment = self.pools[0].augment
        self.pad_value = self.pools[0].pad_value
        self.steps_per_epoch = len(members[0].split.train_idx) // batch_size
        self._epoch, self._draws = None, None

    def _epoch_draws(self, epoch: int) -> list[dict]:
        if epoch != self._epoch:
            device = self.pools[0].x.device
            self._draws = [{k: to_device(v, device) for k, v in
                            draw_epoch(seed, epoch, len(sp.train_idx), self.batch_size, self.augment).items()}
                           for sp, seed in self.sources]
            self._epoch = epoch
        return self._draws

    def _gather(self, idx: torch.Tensor, test: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """idx [B, U] pool rows -> x [B*U, C, H, W] (in [B, U] order), y [B, U]."""
        b = idx.shape[0]
        if self.shared:
            p = self.pools[0]
            src_x, src_y = (p.test_x, p.test_y) if test else (p.x, p.y)
            flat = idx.reshape(-1)
            x, y = src_x.index_select(0, flat), src_y.index_select(0, flat)
        else:
            xs, ys = [], []
            for u, p in enumerate(self.pools):
                src_x, src_y = (p.test_x, p.test_y) if test else (p.x, p.y)
                xs.append(src_x.index_select(0, idx[:, u]))
                ys.append(src_y.index_select(0, idx[:, u]))
            x, y = torch.stack(xs, 1).flatten(0, 1), torch.stack(ys, 1).reshape(-1)
        return x, y.view(b, self.n)

    def train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, i = divmod(step, self.steps_per_epoch)
        draws = self._epoch_draws(epoch)
        b = self.batch_size
        rows = [sp.train_idx[d["perm"][i * b:(i + 1) * b]] for (sp, _), d in zip(self.sources, draws)]
        idx = torch.stack([rows[k] for k in self.key_of], 1)  # [B, U]
        x, y = self._gather(idx)
        if self.augment:  # each network's own flips and offsets, in the [B, U] order of the gathered images
            flip = torch.stack([draws[k]["flip"][i] for k in self.key_of], 1).reshape(-1)
            offsets = torch.stack([draws[k]["offsets"][i] for k in self.key_of], 2).reshape(2, -1)
            x = _augment(x, flip, offsets, self.pad_value)
        return x.view(idx.shape[0], self.n, *x.shape[1:]), y

    def eval_batches(self, which: str, chunk: int):
        """(x, y) chunks over the validation or test split of every network."""
        if which == "val":
            idx = torch.stack([m.split.val_idx for m in self.members], 1)
            test = False
        else:
            n_test = len(self.pools[0].test_y)
            idx = torch.arange(n_test, device=self.pools[0].test_y.device)[:, None].expand(n_test, self.n)
            test = True
        for i in range(0, idx.shape[0], chunk):
            x, y = self._gather(idx[i:i + chunk], test)
            yield x.view(y.shape[0], self.n, *x.shape[1:]), y


def evaluate(batched: nn.Module, data: _Data, which: str, batch_size: int, precision: str = "fp32"):
    """Per network (mean loss, accuracy) over its own split ("val" or "test"), as lists."""
    if isinstance(batched, Interleaved):  # each network exactly as its single run evaluates it
        out = []
        for u, net in enumerate(batched.nets):
            sp = data.members[u].split
            x, y = ((sp.pool.x[sp.val_idx], sp.pool.y[sp.val_idx]) if which == "val"
                    else (sp.pool.test_x, sp.pool.test_y))
            out.append(single_evaluate(net, x, y, batch_size, precision))
        return [o[0] for o in out], [o[1] for o in out]
    return _evaluate_stacked(batched, data, which, batch_size, precision)


@torch.inference_mode()
def _evaluate_stacked(batched: nn.Module, data: _Data, which: str, batch_size: int, precision: str):
    """All networks in one forward per chunk; one host sync per call."""
    n = data.n
    length = len(data.members[0].split.val_idx) if which == "val" else len(data.pools[0].test_y)
    if length == 0:
        return [None] * n, [None] * n
    device = data.pools[0].x.device
    was_training = batched.training
    batched.eval()
    # Rows per forward as a single run's evaluation uses (chunks of 1000 on a CPU), shared by the networks, so the
    # peak memory stays that of one run.
    rows = min(batch_size, 1000) if device.type == "cpu" else batch_size
    loss = torch.zeros(n, device=device)
    correct = torch.zeros(n, device=device, dtype=torch.long)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        for x, y in data.eval_batches(which, max(1, rows // n)):
            out = batched(x).float()
            loss += F.cross_entropy(out.flatten(0, 1), y.reshape(-1), reduction="none").view(y.shape).sum(0)
            correct += (out.argmax(2) == y).sum(0)
    batched.train(was_training)
    sums = torch.stack([loss, correct.to(loss.dtype)]).tolist()
    return [s / length for s in sums[0]], [c / length for c in sums[1]]


def train_batched(members: list[Member], cfg, *, start: int, steps: Steps, end: Optional[int] = None,
                  desc: str = "batched", layout: str = "stacked") -> list[dict]:
    """Train every member from `start` to `end` (default: the end of training) in one batched loop, its networks
    `stacked` or `interleaved` (LAYOUTS); each member's model holds its trained weights afterwards. Returns one result
    per member, as `lottery.train.train` does."""
    tcfg = cfg.train
    end = steps.total if end is None else end
    n = len(members)
    keep_freed_memory()
    resumed = [m.resume is not None for m in members]
    if any(resumed) and not all(resumed):
        raise ValueError("a batched run resumes all its networks or none")
    if any(resumed) and len({m.resume["step"] for m in members}) > 1:
        raise ValueError("a batched run resumes all its networks from the same step")
    for m in members:
        if m.resume is not None:
            m.model.load_state_dict(m.resume["model"])
    if layout not in LAYOUTS:
        raise ValueError(f"unknown batched layout '{layout}'; accepted: {', '.join(LAYOUTS)}")
    data = _Data(members, tcfg.batch_size)
    batched = LAYOUTS[layout]([m.model for m in members], data.pools[0].x[:2])
    multiplier = lr_schedule(tcfg, steps)
    optimizer = make_optimizer([p for p in batched.parameters() if p.requires_grad], cfg.optimizer,
                               data.pools[0].x.device)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    mask_weights = Masker(batched, batched.named_masks([m.masks for m in members]))
    if tcfg.compile:  # in place, so parameter names (masks, checkpoints) stay as they are
        for net in (batched.nets if isinstance(batched, Interleaved) else [batched]):
            net.compile()
    device = data.pools[0].x.device
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=tcfg.precision == "bf16")
    hooks = [m.hooks for m in members]
    logging_on = any(h.on_log for h in hooks)
    log_every = next((h.log_every for h in hooks if h.on_log), 0)
    at_steps = sorted({s for h in hooks for s in h.at_step})
    ckpt_every = hooks[0].checkpoint_every
    can_checkpoint = all(h.checkpoint is not None for h in hooks)

    loss_sum = torch.zeros(n, device=device)
    loss_count = 0
    log_sum = torch.zeros(n, device=device)
    evals: list[list[dict]] = [[] for _ in members]
    step = start
    diverged_at: list[Optional[int]] = [None] * n  # as in lottery.train: a network is done at its first NaN
    if all(resumed):
        optimizer.load_state_dict(batched.optimizer_state([m.resume["optimizer"] for m in members]))
        step = members[0].resume["step"]
        evals = [list(m.resume["evals"]) for m in members]
        diverged_at[:] = [e[-1]["step"] if e and e[-1].get("diverged") else None for e in evals]
        loss_sum += torch.stack([m.resume["loss_sum"].reshape(()) for m in members]).to(device)
        loss_count = members[0].resume["loss_count"]
        log_sum += torch.stack([m.resume["log_sum"].reshape(()) for m in members]).to(device)

    def run_eval() -> None:
        nonlocal loss_count
        val_loss, val_acc = evaluate(batched, data, "val", tcfg.eval_batch_size, tcfg.precision)
        test_loss, test_acc = evaluate(batched, data, "test", tcfg.eval_batch_size, tcfg.precision)
        train_loss = (loss_sum / loss_count).tolist() if loss_count else [None] * n
        lr = base_lrs[0] * multiplier(max(step - 1, 0))
        loss_sum.zero_()
        loss_count = 0
        for u in range(n):
            if diverged_at[u] is not None:  # it goes on in the batch (harmlessly: nothing couples networks), unseen
                continue
            record = {"step": step, "train_loss": train_loss[u], "val_loss": val_loss[u], "val_accuracy": val_acc[u],
                      "test_loss": test_loss[u], "test_accuracy": test_acc[u], "lr": lr}
            if nonfinite(record["train_loss"], val_loss[u], test_loss[u]):
                diverged_at[u] = step
                record = {**dict.fromkeys(record), "step": step, "lr": lr, "diverged": True}
            evals[u].append(record)
            if hooks[u].on_eval:
                hooks[u].on_eval(record)

    def call_at_step(s: int) -> None:
        if not any(s in h.at_step for h in hooks):
            return
        for u, state in enumerate(batched.states()):
            if s in hooks[u].at_step:
                members[u].model.load_state_dict(state)  # the hook sees this network's weights now
                hooks[u].at_step[s]()

    def checkpoint() -> None:
        states, opt_states = batched.states(), batched.optimizer_states(optimizer.state_dict())
        sums, logs = loss_sum.cpu(), log_sum.cpu()
        for u, h in enumerate(hooks):
            h.checkpoint({"step": step, "model": states[u], "optimizer": opt_states[u], "evals": evals[u],
                          "loss_sum": sums[u].clone(), "loss_count": loss_count, "log_sum": logs[u].clone()})

    batched.train()
    if not all(resumed):
        mask_weights()
        call_at_step(start)
        run_eval()
    bar = tqdm(total=end - start, initial=step - start, desc=desc, leave=False, dynamic_ncols=True,
               disable=not (tcfg.progress and sys.stderr.isatty()))
    try:
        while step < end and not all(d is not None for d in diverged_at):
            x, y = data.train_batch(step)
            m = multiplier(step)
            for g, lr in zip(optimizer.param_groups, base_lrs):
                g["lr"] = lr * m
            optimizer.zero_grad(set_to_none=True)
            losses = batched.backward(x, y, autocast)
            optimizer.step()
            mask_weights()
            loss_sum += losses
            loss_count += 1
            step += 1
            bar.update(1)
            if logging_on and log_every:
                log_sum += losses
                if step % log_every == 0:
                    values = (log_sum / log_every).tolist()
                    for u, h in enumerate(hooks):
                        if h.on_log and diverged_at[u] is None:
                            h.on_log(finite_or_none({"step": step, "train_loss": values[u], "lr": base_lrs[0] * m}))
                    log_sum.zero_()
            if step in at_steps:
                call_at_step(step)
            if step % steps.eval_every == 0 or step == end:
                run_eval()
            if can_checkpoint and step < end:
                if hooks[0].should_stop():
                    checkpoint()
                    raise Preempted(f"stopped at step {step}; checkpoint written")
                if ckpt_every and step % ckpt_every == 0:
                    checkpoint()
    finally:
        bar.close()
    for m, state in zip(members, batched.states()):
        m.model.load_state_dict(state)
    results = []
    for u in range(n):
        last = evals[u][-1]
        result = {"steps": end, "start_step": start, "final_step": step, "evals": evals[u],
                  "test_accuracy": last["test_accuracy"], "test_loss": last["test_loss"],
                  "val_loss": last["val_loss"], "val_accuracy": last["val_accuracy"], **early_stop(evals[u]),
                  "diverged": diverged_at[u] is not None, "diverged_step": diverged_at[u]}
        if diverged_at[u] is not None:
            result["last_finite_step"] = evals[u][-2]["step"] if len(evals[u]) > 1 else None
        results.append(result)
    return results
