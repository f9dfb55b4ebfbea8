"""Seeded, resumable training batches: the batch at step t depends only on (seed, t), drawn on the CPU once per epoch
(so a seed gives the same batches on a CPU and on any GPU), gathered from the pool with one index_select, and
augmented on the device. Every random draw uses its own seeded generator: the global torch RNG is never touched."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lottery.core.spans import DATA, span
from lottery.data.pool import Split

_PAD = 4


def _seed(*parts: int) -> int:
    # torch seeds must fit in 64 bits; keep them non-negative int64 whatever the caller's seed.
    return sum(parts) & (2**63 - 1)


def draw_augmentation(seed: int, step: int, n: int) -> tuple[Tensor, Tensor]:
    """The augmentation of the batch at `step`: (flip (n,) bool, offsets (2, n) int64 = dy, dx in [0, 2 * pad]).

    Drawn on the CPU from a generator seeded with (seed, step), so the values are the same whatever device trains."""
    # A separate stream (offset 2**40) so augmentation draws never alias a permutation seed.
    g = torch.Generator().manual_seed(_seed(seed * 1_000_003, step, 2**40))
    flip = torch.rand(n, generator=g) < 0.5
    offsets = torch.randint(0, 2 * _PAD + 1, (2, n), generator=g)
    return flip, offsets


def draw_epoch(seed: int, epoch: int, n: int, batch_size: int, augment: bool) -> dict[str, Tensor]:
    """Everything random about one epoch of training batches, drawn on the CPU with CPU generators.

    `perm` is the order of the n training examples; with `augment`, `flip` (steps, batch_size) and `offsets`
    (steps, 2, batch_size) hold each step's flips and crop offsets. The values depend only on (seed, epoch, n,
    batch_size), never on the device the data lives on: CUDA's randperm depends on the GPU's number of SMs, so
    drawing on the device would give another data order on another GPU model (and on the CPU)."""
    g = torch.Generator().manual_seed(_seed(seed * 1_000_003, epoch))
    out = {"perm": torch.randperm(n, generator=g)}
    if augment:
        steps = n // batch_size
        draws = [draw_augmentation(seed, epoch * steps + i, batch_size) for i in range(steps)]
        out["flip"] = torch.stack([f for f, _ in draws])
        out["offsets"] = torch.stack([o for _, o in draws])
    return out


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """Copy a CPU tensor to `device` without making the host wait: on CUDA through pinned memory, asynchronously."""
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def augment(x: Tensor, flip: Tensor, offsets: Tensor, pad_value: Tensor | None = None) -> Tensor:
    # Flip + pad-and-crop as one gather: since the constant padding is symmetric, cropping a flipped padded image
    # equals reading the unflipped padded image with reversed column indices (and an equally uniform offset).
    n, c, h, w = x.shape
    dev = x.device
    dy, dx = offsets
    cols = torch.arange(w, device=dev)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - cols, cols)
    rows = dy[:, None] + torch.arange(h, device=dev)
    if pad_value is None:
        padded = F.pad(x, (_PAD, _PAD, _PAD, _PAD))
    else:  # per-channel constant: written around an exact copy of the image (no arithmetic on its pixels)
        padded = pad_value.view(1, c, 1, 1).expand(n, c, h + 2 * _PAD, w + 2 * _PAD).clone()
        padded[:, :, _PAD : _PAD + h, _PAD : _PAD + w] = x
    return padded[
        torch.arange(n, device=dev)[:, None, None, None],
        torch.arange(c, device=dev)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


class Batches:
    """The training batches of one network: its split's training examples in the order of `seed`.

    `get(step)` gives (x, y); `rows(step)` the pool rows and `draws(step)` the augmentation of the same batch, for a
    caller that gathers several networks' batches at once (lottery.training.layouts.Stacked)."""

    def __init__(self, split: Split, batch_size: int, seed: int):
        n = split.n_train
        if not 0 < batch_size <= n:
            raise ValueError(f"train.batch_size must be in [1, {n}] (the training set size), got {batch_size}")
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.pool = split.pool
        self.steps_per_epoch = n // batch_size
        self._epoch: int | None = None
        self._draws: dict = {}

    def _epoch_draws(self, epoch: int) -> dict:
        if epoch != self._epoch:
            drawn = draw_epoch(self.seed, epoch, self.split.n_train, self.batch_size, self.pool.augment)
            draws = {k: to_device(v, self.pool.device) for k, v in drawn.items()}
            draws["rows"] = self.split.train_idx[draws.pop("perm")]  # the epoch's order as pool rows
            self._draws, self._epoch = draws, epoch
        return self._draws

    def rows(self, step: int) -> Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        return self._epoch_draws(epoch)["rows"][i * self.batch_size : (i + 1) * self.batch_size]

    def draws(self, step: int) -> tuple[Tensor, Tensor]:
        """(flip, offsets) of the batch at `step` (augmenting pools only)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        d = self._epoch_draws(epoch)
        return d["flip"][i], d["offsets"][i]

    def get(self, step: int) -> tuple[Tensor, Tensor]:
        with span(DATA):  # for torch.profiler (lottery.core.spans)
            idx = self.rows(step)
            x, y = self.pool.x.index_select(0, idx), self.pool.y.index_select(0, idx)
            if self.pool.augment:
                x = augment(x, *self.draws(step), self.pool.pad_value)
            return x, y

    def __iter__(self):
        """Endless: the batches of steps 0, 1, 2, ... (what a pruning criterion reads)."""
        step = 0
        while True:
            yield self.get(step)
            step += 1
