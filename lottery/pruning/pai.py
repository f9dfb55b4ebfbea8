"""Pruning-at-initialization criteria: magnitude at init, SNIP, GraSP, SynFlow (registered in lottery.pruning.CRITERIA).

Each criterion scores the model it is handed (the weights the schedule chose, with the current masks applied, so
pruned weights are zero and score zero) and returns one score per entry of every masked tensor; higher is kept. They
work on a deep copy of the model, so the caller's weights, gradients and BatchNorm statistics are left as they were,
and the same criteria work at initialization, iteratively (`pruning.rounds`) and after training.

Following the papers' code:
- SNIP (Lee, Ajanthan & Torr 2019): |g * theta|, g the gradient of the training loss summed over `num_batches`
  batches (not `batches`: that name is the iterator of training batches every criterion is handed), with BatchNorm
  in inference mode by default (`batchnorm: eval`), as both the authors' and Synaptic-Flow's code score (see `snip`).
- GraSP (Wang, Zhang & Grosse 2020; github alecwangcq/GraSP, pruner/GraSP.py): the authors compute
  S = -theta * (H g) and remove the largest S, i.e. keep the largest theta * (H g); this module returns
  theta * (H g) (kept high). g and H come from `samples_per_class` examples per class with the logits divided by the
  temperature T = 200, taken in two halves (the examples sorted by class, as the authors' code does). `abs=true` is
  Frankle et al. 2021's |GraSP| (keep the largest |theta * H g|).
- SynFlow (Tanaka et al. 2020; github ganguli-lab/Synaptic-Flow, Pruners/pruners.py): data-free; every parameter
  and buffer made absolute, BatchNorm in eval mode, an all-ones input, R = sum of the outputs,
  score |theta * dR/dtheta|; computed in float64 (products over many layers under- or overflow in float32).
  Its iterative schedule is `pruning.rounds` (100 in the paper's experiments; `method=synflow` sets it); the rounds
  score one float64 copy whose pruned weights are zeroed in place (`SynflowRounds`), not a fresh copy per round.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lottery.core.ranges import at_least, one_of, positive, setting
from lottery.masks import Masks
from lottery.pruning.criteria import Batches, Scores, magnitude, register_criterion


def _weights(net: nn.Module, masks: Masks) -> list[torch.Tensor]:
    params = dict(net.named_parameters())
    return [params[n] for n in masks]


# --- magnitude at initialization -------------------------------------------------------------------------------------

register_criterion("magnitude_init", label="magnitude", when="at_init")(magnitude)


# --- SNIP ------------------------------------------------------------------------------------------------------------

SNIP_BATCHNORM = ("eval", "train")


@dataclass
class SnipSettings:
    # training batches (of train.batch_size) whose loss gradients are summed; the paper: one
    num_batches: int = setting(1, at_least(1))
    # eval: BatchNorm normalizes with its running statistics (the authors' and Synaptic-Flow's mode) | train: with the
    # scoring batch's own statistics
    batchnorm: str = setting("eval", one_of(*SNIP_BATCHNORM))


@register_criterion("snip", settings=SnipSettings, label="SNIP")
def snip(model: nn.Module, masks: Masks, *, batches: Batches, generator: torch.Generator, **settings) -> Scores:
    """|g * theta| on a copy of `model` whose BatchNorm layers are in `batchnorm` mode (the caller's model, its mode
    and its running statistics are left as they were in both modes).

    The default, eval, is the mode both reference implementations score in:
    - the authors' code (github namhoonlee/snip-public): snip/prune.py line 10 runs the pruning step with
      `model.is_train: False`, which snip/model.py (lines 64-65, `net.forward_pass(w_mask, ..., self.is_train)`)
      passes to `tf.layers.batch_normalization(training=is_train)` (snip/network.py, lines 228-234);
    - Synaptic-Flow (github ganguli-lab/Synaptic-Flow): prune.py `prune_loop`, lines 9-12, calls `model.train()`
      then `model.eval()` unless `train_mode`, whose flag `--prune-train-mode` defaults to False (main.py line 73);
      Pruners/pruners.py `SNIP.score` (lines 108-131) then takes |dL/dmask| = |g * theta| on that model.
    `batchnorm: train` normalizes with each scoring batch's statistics instead (this module's only mode before): on
    ResNet-20 / CIFAR-10 at initialization, global pruning to 5% keeps masks whose kept weights agree with eval
    mode's on only 22-29% (two seeds, experiment=pai_resnet20_cifar10). The modes agree on networks without
    BatchNorm."""
    s = SnipSettings(**settings)
    net = copy.deepcopy(model).train(s.batchnorm == "train")
    weights = _weights(net, masks)
    grads = [torch.zeros_like(w) for w in weights]
    for _ in range(s.num_batches):
        x, y = next(batches)
        for acc, g in zip(grads, torch.autograd.grad(F.cross_entropy(net(x), y), weights)):
            acc += g
    return {n: (g * w).detach().abs() for n, g, w in zip(masks, grads, weights)}


# --- GraSP -----------------------------------------------------------------------------------------------------------


@dataclass
class GraspSettings:
    # examples of each class for g and Hg (the authors' CIFAR configs: 10)
    samples_per_class: int = setting(10, at_least(1))
    temperature: float = setting(200.0, positive())  # logits divided by T before the loss (the authors' code: 200)
    abs: bool = False  # false: the authors' ranking (keep the largest theta*Hg); true: Frankle et al. 2021's |GraSP|


def grasp_check(settings: dict, data) -> None:
    """Before any work: the replicate's training split holds `samples_per_class` examples of every class (GraSP
    takes them from the first batches of one epoch; more than there are would have to reuse examples)."""
    y = data.pool.y[data.train_idx]
    counts = torch.bincount(y, minlength=data.pool.num_classes).tolist()
    short = {c: n for c, n in enumerate(counts) if n < settings["samples_per_class"]}
    if short:
        c, n = min(short.items(), key=lambda kv: kv[1])
        raise ValueError(
            f"grasp: pruning.criterion.samples_per_class={settings['samples_per_class']}, but the "
            f"training split has only {n} examples of class {c} ({len(short)} classes have fewer); "
            f"accepted: at most {min(counts)}"
        )


def per_class(batches: Batches, num_classes: int, samples_per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `samples_per_class` examples of each class met in `batches`, sorted by class (GraSP_fetch_data)."""
    xs: list[list[torch.Tensor]] = [[] for _ in range(num_classes)]
    ys: list[list[torch.Tensor]] = [[] for _ in range(num_classes)]
    need = num_classes * samples_per_class
    for _ in range(100_000):
        x, y = next(batches)
        for i, c in enumerate(y.tolist()):
            if len(xs[c]) < samples_per_class:
                xs[c].append(x[i])
                ys[c].append(y[i])
                need -= 1
        if need == 0:
            return torch.stack([v for c in xs for v in c]), torch.stack([v for c in ys for v in c])
    missing = [c for c in range(num_classes) if len(xs[c]) < samples_per_class]
    raise ValueError(
        f"grasp: the training set has fewer than {samples_per_class} examples of classes {missing[:5]}; "
        f"lower pruning.criterion.samples_per_class"
    )


@register_criterion("grasp", settings=GraspSettings, label="GraSP", check=grasp_check)
def grasp(model: nn.Module, masks: Masks, *, batches: Batches, generator: torch.Generator, **settings) -> Scores:
    s = GraspSettings(**settings)
    net = copy.deepcopy(model).train()  # the authors' copy is in training mode (their .eval() is commented out)
    weights = _weights(net, masks)
    first = next(batches)
    num_classes = net(first[0][:1]).shape[1]
    x, y = per_class(_chain(first, batches), num_classes, s.samples_per_class)
    half = len(x) // 2
    halves = [(x[:half], y[:half]), (x[half:], y[half:])]

    def loss(xb, yb):
        return F.cross_entropy(net(xb) / s.temperature, yb)

    # g: the gradient of the masked network (pruned coordinates are not parameters of it), no graph
    g = [torch.zeros_like(w) for w in weights]
    for xb, yb in halves:
        for acc, gi in zip(g, torch.autograd.grad(loss(xb, yb), weights)):
            acc += gi
    g = [gi * masks[n].to(gi.dtype) for gi, n in zip(g, masks)]
    # Hg: the gradient of <g, grad L> with the graph of grad L kept (create_graph=True)
    hg = [torch.zeros_like(w) for w in weights]
    for xb, yb in halves:
        grad = torch.autograd.grad(loss(xb, yb), weights, create_graph=True)
        z = sum((gi * gr).sum() for gi, gr in zip(g, grad))
        assert isinstance(z, torch.Tensor)  # a sum over the (non-empty) weights
        for acc, h in zip(hg, torch.autograd.grad(z, weights)):
            acc += h
    out = {n: (w * h).detach() for n, w, h in zip(masks, weights, hg)}
    return {n: v.abs() for n, v in out.items()} if s.abs else out


def _chain(first, rest):
    yield first
    yield from rest


# --- SynFlow ---------------------------------------------------------------------------------------------------------


class SynflowRounds:
    """SynFlow's scores round after round on one float64 copy of the model, for the schedule's rounds (one copy and
    conversion per pruning step, not one per round). Entries are flat indices over the masked tensors (tensor order,
    then index, as `Survivors`): `scores(index)` scores them, `remove(index)` zeroes the weights of entries pruned.

    The copy's masked weights are views of one buffer, each at a 64-byte aligned offset as a tensor of its own is (the
    same BLAS code paths, so the same float64 bits as scoring a fresh copy of the masked model)."""

    def __init__(self, model: nn.Module, masks: Masks, *, batches: Batches, generator: torch.Generator | None = None):
        x, _ = next(batches)  # only its shape: the score is data-free
        self.net = copy.deepcopy(model).double().eval().requires_grad_(False)  # gradients of the masked weights only
        with torch.no_grad():
            for t in self.net.state_dict().values():
                if t.is_floating_point():
                    t.abs_()
        self.weights = _weights(self.net, masks)
        self.sizes = sizes = [w.numel() for w in self.weights]
        self.abs = torch.cat([w.detach().reshape(-1) for w in self.weights])  # |theta| as handed in, flat
        self.products = torch.empty_like(self.abs)  # theta * dR/dtheta, flat, reused round after round
        flat = [0, *itertools.accumulate(sizes)]  # where each tensor starts in the flat order, and the end
        padded = [0, *itertools.accumulate(-(-n // 8) * 8 for n in sizes)]  # ... in the buffer: 8 float64 = 64 bytes
        self.buffer = torch.zeros(padded[-1], dtype=torch.float64, device=self.abs.device)
        for w, a in zip(self.weights, padded):
            self.buffer[a : a + w.numel()] = w.detach().reshape(-1)
            w.data = self.buffer[a : a + w.numel()].view_as(w)
            w.requires_grad_(True)
        self.ends = torch.tensor(flat[1:], device=self.abs.device)
        self.shift = torch.tensor([p - f for p, f in zip(padded, flat[:-1])], device=self.abs.device)
        self.ones = torch.ones((1, *x.shape[1:]), dtype=torch.float64, device=x.device)

    def remove(self, index: torch.Tensor) -> None:
        """Zero the weights of the entries at flat `index`."""
        tensor = torch.searchsorted(self.ends, index, right=True)
        self.buffer.index_fill_(0, index + self.shift[tensor], 0)

    def scores(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """|theta * dR/dtheta| of the entries at flat `index` (all of them by default), float64."""
        flow = self.net(self.ones).sum()
        if not torch.isfinite(flow):
            raise ValueError(
                f"synflow: the synaptic flow R = {flow.item():.3g} overflowed float64 (the network is too "
                "deep or wide for its initialization scale)"
            )
        if flow == 0:  # no input-output path left (the invert ablation gets there): no weight carries any flow
            return torch.zeros(
                len(self.abs) if index is None else len(index), dtype=torch.float64, device=self.abs.device
            )
        grads = torch.autograd.grad(flow, self.weights)
        for g, w, out in zip(grads, self.abs.split(self.sizes), self.products.split(self.sizes)):
            torch.mul(g.reshape(-1), w, out=out)
        return self.products.abs() if index is None else self.products.index_select(0, index).abs_()


@register_criterion("synflow", label="SynFlow")
def synflow(model: nn.Module, masks: Masks, *, batches: Batches, generator: torch.Generator) -> Scores:
    flat = SynflowRounds(model, masks, batches=batches).scores()
    return {n: v.view_as(m) for (n, m), v in zip(masks.items(), flat.split([m.numel() for m in masks.values()]))}


synflow.rounds = SynflowRounds  # lottery.pruning.schedule.prune's rounds keep one scorer (see its docstring)
