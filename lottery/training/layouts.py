"""How the networks of one training call compute: the layouts of the training loop (lottery.training.loop).

interleaved (also the single run: N = 1): each network keeps its own model and runs its own forward and backward on
its own batch, one network at a time (so memory is a single run's for any N), and all of them share one step: one
multi-tensor optimizer step over every network's parameters, one loop, evaluation and checkpointing. The arithmetic is
exactly each network's single run, so results equal single runs bit for bit; what N > 1 saves is per-step overhead.

stacked: every parameter and buffer gets a leading dimension of size U (one entry per network) and keeps its name, so
network u's state is `{k: v[u]}`. Activations fold the networks into the channel dimension, `[B, U*C, H, W]` and
`[B, U*F]`: a convolution becomes one grouped convolution (groups = U), a Linear one batched matmul, a BatchNorm one
BatchNorm over U*C channels (so each network keeps its own running statistics), and every parameter-free op the models
use (ReLU, pooling, flatten, residual sums) already acts per channel, so the models' own `forward` runs unchanged. This
is what fills a GPU, and it wins for MLPs on a CPU. Batched matmuls and grouped convolutions round differently from
single ones, so losses agree with single runs to float32 round-off, not bit for bit.

Both: each network's update is its own (the loss is the sum of the networks' mean losses, so each gradient is its
network's; SGD, Adam and AdamW act element-wise; masks are applied by overwriting), a NaN in one network stays there,
and checkpoints are written per network in the single-run format, so either layout resumes the other's.

`choose` picks the layout for replicas (`replica_batching=auto`): stacked, except convolutional models on a CPU and
models with layers stacking cannot batch, which go interleaved. Measured on the 2-core CPU (2026-11-29,
scripts/bench.py --replicas 8, real data, batch 60, Adam, two threads): 8 Conv-2 networks stacked ran at 0.62x the
single-run loop run 8 times, interleaved at 1.03x. The grouped convolutions cost what 8 single ones do, but the
element-wise work (ReLU, pooling, their gradients) over 8x larger activations falls out of the 32 MB cache into freshly
page-faulted memory; interleaved keeps every activation the size of a single run's. 8 LeNet-300-100 networks stacked:
1.82x. On a GPU stacking is what fills the device (scripts/gpu_replicas.py).

Why explicit stacked layers and not torch.func (stack_module_state + functional_call + vmap): measured on the 2-core
CPU, 8 LeNet-300-100 networks, batch 60, Adam, one thread, a busy machine: 8 separate models 7,634 samples/s, vmap
7,870, explicit layers 9,064 (and 5,544 / 5,863 / 7,407 in a second interleaved run); with two threads 471 / 752 / 853.
The explicit layers were never slower, and vmap cannot update BatchNorm running statistics in place, so it would need a
functional BatchNorm anyway; the channel fold gives BatchNorm for free.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from lottery.core.spans import DATA, span
from lottery.data import Batches, augment
from lottery.masks import Masks
from lottery.training.evaluation import batch_sums, conv_on_cpu, eval_chunk, evaluate, metric_names

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
        n, _, i = self.weight.shape
        xt = x.reshape(b, n, i).permute(1, 2, 0)  # [n, in, B]
        if x.dim() == 2:
            xt = xt.contiguous()
        yt = torch.bmm(self.weight, xt) if self.bias is None else torch.baddbmm(self.bias.unsqueeze(2), self.weight, xt)
        return yt.permute(2, 0, 1)


class BatchedConv2d(nn.Module):
    def __init__(self, n: int, conv: nn.Conv2d):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                f"batched training supports Conv2d with numeric zero padding, got padding={conv.padding}, "
                f"padding_mode={conv.padding_mode}"
            )
        self.n, self.stride, self.padding, self.dilation, self.groups = (
            n,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
        )
        self.weight = nn.Parameter(torch.empty(n, *conv.weight.shape))
        self.bias = nn.Parameter(torch.empty(n, *conv.bias.shape)) if conv.bias is not None else None

    def forward(self, x):
        bias = None if self.bias is None else self.bias.flatten()
        return F.conv2d(
            x, self.weight.flatten(0, 1), bias, self.stride, self.padding, self.dilation, self.groups * self.n
        )


class BatchedBatchNorm2d(nn.Module):
    running_mean: torch.Tensor  # the buffers (register_buffer), declared for the type checker
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor

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
        return F.batch_norm(
            x,
            flat(self.running_mean),
            flat(self.running_var),
            flat(self.weight),
            flat(self.bias),
            self.training,
            self.momentum,
            self.eps,
        )


_BATCHED = {nn.Linear: BatchedLinear, nn.Conv2d: BatchedConv2d, nn.BatchNorm2d: BatchedBatchNorm2d}


def unsupported_layer(model: nn.Module) -> tuple[str, str] | None:
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
        raise ValueError(
            f"replicas: model '{name}' has a {bad[1]} layer ('{bad[0]}') that stacked training does not "
            f"support (supported layers: Linear, Conv2d, BatchNorm2d); use replica_batching=interleaved "
            f"(or auto), which trains any model"
        )


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
        raise ValueError(
            "replicas: this model's forward does not act per channel (its stacked outputs differ from "
            "the single model's), so it cannot be trained stacked; use replica_batching=interleaved, "
            "which trains any model"
        )


class Interleaved(nn.Module):
    """The networks side by side, each through its own model (the caller's, not a copy) on its own batch, in one
    step. With one network this is exactly a single run."""

    def __init__(self, models: list[nn.Module], batches: list[Batches]):
        super().__init__()
        self.n = len(models)
        self.nets = nn.ModuleList(models)
        self.batches = batches
        self.per_net = sum(1 for p in models[0].parameters() if p.requires_grad)

    def backward(self, step: int, autocast: dict, active: list[bool]) -> torch.Tensor:
        """Forward and backward of every active network's mean training loss on its batch at `step`; returns the
        losses [N], detached (0 for an inactive network, which computes nothing: its gradients stay None, so the
        optimizer leaves it alone)."""
        losses = []
        for net, batches, on in zip(self.nets, self.batches, active):
            if not on:
                losses.append(torch.zeros((), device=self.device))
                continue
            x, y = batches.get(step)
            with torch.autocast(**autocast):
                loss = F.cross_entropy(net(x), y)
            loss.backward()
            losses.append(loss.detach())
        return losses[0].float().view(1) if self.n == 1 else torch.stack(losses).float()

    @property
    def device(self) -> torch.device:
        return self.batches[0].pool.device

    def evaluate(self, which: str, batch_size: int, precision: str, only: list[int]) -> list[dict | None]:
        """Per network its metrics on its split's `which` ("val" or "test") for the networks in `only` (None for the
        others), each exactly as a single run evaluates it."""
        out: list[dict | None] = [None] * self.n
        for u in only:
            split = self.batches[u].split
            x, y = split.val() if which == "val" else split.test()
            out[u] = evaluate(self.nets[u], x, y, batch_size, precision)
        return out

    def states(self) -> list[dict]:
        return [net.state_dict() for net in self.nets]

    def sync(self, u: int | None = None) -> None:
        """The networks' own models hold their weights already."""

    def network_parameters(self, u: int) -> dict[str, torch.Tensor]:
        """Network `u`'s parameters as the single model names them (they are its own)."""
        return dict(self.nets[u].named_parameters())

    def named_masks(self, masks: list[Masks]) -> Masks:
        return {f"nets.{u}.{k}": v for u, m in enumerate(masks) for k, v in m.items()}

    def mask_slices(self, masker) -> list[tuple]:
        """Per tensor of `masker`: (parameter, mask, [(network, None, its name there)]): each is one network's own."""
        return [
            (p, m, [(int(n.split(".")[1]), None, n.split(".", 2)[2])])
            for n, p, m in zip(masker.names, masker.params, masker.masks)
        ]

    def sync_masks(self, masker, masks: list[Masks]) -> None:
        """The networks' own mask tensors are the ones the masker edits."""

    def compile_in_place(self) -> None:
        for net in self.nets:  # in place, so parameter names (masks, checkpoints) stay as they are
            net.compile()

    def optimizer_state(self, states: list[dict]) -> dict:
        # one parameter group (make_optimizer): network u's parameter i is parameter u * per_net + i
        if self.n == 1:
            return states[0]
        out = {"state": {}, "param_groups": copy.deepcopy(states[0]["param_groups"])}
        for u, st in enumerate(states):
            out["state"].update({u * self.per_net + i: v for i, v in st["state"].items()})
        out["param_groups"][0]["params"] = list(range(self.n * self.per_net))
        return out

    def optimizer_states(self, state: dict) -> list[dict]:
        if self.n == 1:
            return [state]
        p = self.per_net
        groups = copy.deepcopy(state["param_groups"])
        groups[0]["params"] = list(range(p))
        return [
            {
                "state": {
                    i - u * p: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
                    for i, st in state["state"].items()
                    if u * p <= i < (u + 1) * p
                },
                "param_groups": groups,
            }
            for u in range(self.n)
        ]


class Stacked(nn.Module):
    """The networks as one stacked model (`stack`): one batched matmul or grouped convolution per layer for all of
    them, fed with every network's batch gathered at once ([B, U, ...] -> [B, U*C, ...])."""

    def __init__(self, models: list[nn.Module], batches: list[Batches]):
        super().__init__()
        self.n = len(models)
        self.models, self.batches = models, batches
        self.pools = [b.pool for b in batches]
        self.shared = all(p is self.pools[0] for p in self.pools)
        self.net = stack(models)
        check_forward(self.net, models, self.pools[0].x[:2])

    @property
    def device(self) -> torch.device:
        return self.pools[0].device

    def forward(self, x):
        return unfold_logits(self.net(fold(x)), self.n)

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
        """Network u's batch at `step` is exactly its single run's (same rows, same augmentation draws)."""
        idx = torch.stack([b.rows(step) for b in self.batches], 1)  # [B, U]
        x, y = self._gather(idx)
        if self.pools[0].augment:  # each network's own flips and offsets, in the [B, U] order of the gathered images
            draws = [b.draws(step) for b in self.batches]
            flip = torch.stack([f for f, _ in draws], 1).reshape(-1)
            offsets = torch.stack([o for _, o in draws], 2).reshape(2, -1)
            x = augment(x, flip, offsets, self.pools[0].pad_value)
        return x.view(idx.shape[0], self.n, *x.shape[1:]), y

    def backward(self, step: int, autocast: dict, active: list[bool]) -> torch.Tensor:
        """Forward and backward of every network's mean training loss; returns the losses [U], detached. The sum's
        gradient is each network's own gradient. Every network computes (a diverged one harmlessly: nothing couples
        networks)."""
        with span(DATA):  # for torch.profiler (lottery.core.spans)
            x, y = self.train_batch(step)
        with torch.autocast(**autocast):
            out = self(x)
            losses = F.cross_entropy(out.flatten(0, 1), y.reshape(-1), reduction="none").view(y.shape).mean(0)
        losses.sum().backward()
        return losses.detach().float()

    def _eval_batches(self, which: str, chunk: int):
        if which == "val":
            idx = torch.stack([b.split.val_idx for b in self.batches], 1)
            test = False
        else:
            n_test = len(self.pools[0].test_y)
            idx = torch.arange(n_test, device=self.device)[:, None].expand(n_test, self.n)
            test = True
        for i in range(0, idx.shape[0], chunk):
            x, y = self._gather(idx[i : i + chunk], test)
            yield x.view(y.shape[0], self.n, *x.shape[1:]), y

    @torch.inference_mode()
    def evaluate(self, which: str, batch_size: int, precision: str, only: list[int]) -> list[dict | None]:
        """All networks in one forward per chunk, one host sync per call (every network is evaluated; `only` says
        whose metrics are wanted, and the others' are None)."""
        n = self.n
        length = len(self.batches[0].split.val_idx) if which == "val" else len(self.pools[0].test_y)
        if length == 0:
            return [dict.fromkeys(metric_names()) if u in only else None for u in range(n)]
        was_training = self.training
        self.eval()
        # Rows per forward as a single run's evaluation feeds (eval_chunk), shared by the networks, so the peak memory
        # stays that of one run.
        rows = min(batch_size, eval_chunk(self.models[0], self.device))
        sums: dict[str, torch.Tensor] = {}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            for x, y in self._eval_batches(which, max(1, rows // n)):
                for k, v in batch_sums(self(x).float(), y).items():
                    sums[k] = sums[k] + v if k in sums else v
        self.train(was_training)
        values = torch.stack([v.to(torch.float32) for v in sums.values()]).tolist()
        return [{k: vals[u] / length for k, vals in zip(sums, values)} if u in only else None for u in range(n)]

    def states(self) -> list[dict]:
        """Every network's state_dict (copies), as the single model names it."""
        state = self.net.state_dict()
        return [{k: v[u].clone() for k, v in state.items()} for u in range(self.n)]

    def network_parameters(self, u: int) -> dict[str, torch.Tensor]:
        """Network `u`'s parameters as the single model names them: views into the stacked tensors."""
        return {k: p[u] for k, p in self.net.named_parameters()}

    def sync(self, u: int | None = None) -> None:
        """Copy the stacked weights into the networks' own models (network `u`, or all)."""
        state = self.net.state_dict()
        for i in range(self.n) if u is None else [u]:
            self.models[i].load_state_dict({k: v[i] for k, v in state.items()})

    def named_masks(self, masks: list[Masks]) -> Masks:
        """The networks' masks under this module's parameter names (for Masker): here stacked."""
        return {f"net.{k}": torch.stack([m[k] for m in masks]) for k in masks[0]}

    def mask_slices(self, masker) -> list[tuple]:
        """Per tensor of `masker`: (parameter, stacked mask, [(network u, index u, its name) for every u])."""
        return [
            (p, m, [(u, u, n.split(".", 1)[1]) for u in range(self.n)])
            for n, p, m in zip(masker.names, masker.params, masker.masks)
        ]

    def sync_masks(self, masker, masks: list[Masks]) -> None:
        """Copy the stacked masks (changed by mask updates) into each network's own mask tensors."""
        for name, stacked in zip(masker.names, masker.masks):
            k = name.split(".", 1)[1]
            for u, m in enumerate(masks):
                m[k].copy_(stacked[u].to(m[k].dtype))

    def compile_in_place(self) -> None:
        self.net.compile()

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
        return [
            {
                "state": {
                    i: {k: (v[u].clone() if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in st.items()}
                    for i, st in state["state"].items()
                },
                "param_groups": state["param_groups"],
            }
            for u in range(self.n)
        ]


LAYOUTS: dict[str, type[Interleaved | Stacked]] = {"interleaved": Interleaved, "stacked": Stacked}
BATCHING = ("auto", "stacked", "interleaved", "sequential")


def choose(mode: str, model: nn.Module, device) -> str:
    """`replica_batching` resolved for `model` on `device`: stacked | interleaved | sequential. auto = stacked, except
    convolutional models on a CPU and models with layers `stack` cannot batch, which go interleaved (see above)."""
    if mode == "auto":
        return "interleaved" if conv_on_cpu(model, device) or unsupported_layer(model) else "stacked"
    return mode


_MALLOC_SET: list[bool] = []


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
