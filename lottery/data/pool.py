"""A dataset held whole on the training device (`Pool`) and one replicate's split of it (`Split`).

Whole datasets fit in device memory (CIFAR-10 train is ~600 MB as float32), so batches are a single index_select
instead of a DataLoader with per-sample PIL transforms. Replicates share one pool and keep only their split's indices.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lottery.data.registry import dataset_settings


@dataclass
class Pool:
    """The whole training set (before the validation split) and the test set, normalized on the device."""

    x: Tensor
    y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    input_shape: tuple[int, int, int]
    augment: bool
    # What the pad-and-crop augmentation pads with, per channel: black after normalization (torchvision pads the raw
    # image with black before normalizing); None pads with 0 (data without a black, e.g. synthetic).
    pad_value: Tensor | None = None
    # the most frequent class's share of the test set, computed once where a record asks (lottery.experiment.records)
    majority: float | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return self.x.device


@dataclass
class Split:
    """One replicate's view of a pool: which pool rows are its training and its validation examples."""

    pool: Pool
    train_idx: Tensor  # on the pool's device
    val_idx: Tensor
    _val: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    @property
    def n_train(self) -> int:
        return len(self.train_idx)

    def train_rows(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Training examples number `idx` of this split (positions in its training set, not pool rows)."""
        rows = self.train_idx[idx.to(self.train_idx.device)]
        return self.pool.x.index_select(0, rows), self.pool.y.index_select(0, rows)

    def val(self) -> tuple[Tensor, Tensor]:
        """The validation examples (gathered once, then kept)."""
        if self._val is None:
            self._val = (self.pool.x[self.val_idx], self.pool.y[self.val_idx])
        return self._val

    def test(self) -> tuple[Tensor, Tensor]:
        return self.pool.test_x, self.pool.test_y


def _to_device(x: Tensor, stats, device) -> Tensor:
    # Move uint8 (4x less host->device traffic), then convert and normalize in place on the device.
    x = x.to(device)
    if x.dtype != torch.uint8:
        return x.float()
    mean, std = (torch.tensor(s, device=device).view(-1, 1, 1) for s in stats)
    return x.float().mul_(1 / (255 * std)).sub_(mean / std)


def black(stats, device="cpu") -> Tensor:
    """A black pixel (byte 0 in every channel) after normalization: -mean/std per channel, computed exactly as the
    images are."""
    return _to_device(torch.zeros(1, len(stats[0]), 1, 1, dtype=torch.uint8), stats, device).view(-1)


def load_pool(node, *, device="cpu", seed: int = 0) -> Pool:
    """The dataset of a `dataset` config node (a dict or DictConfig: name, root, download, val_size, augment and the
    dataset's own settings), loaded and normalized on `device`. `seed`: the replicate seed, for seeded datasets."""
    entry, common, own = dataset_settings(node)
    offered = {"root": str(common["root"]), "download": common["download"], "seed": seed}
    names = inspect.signature(entry.load).parameters
    kwargs = {**{k: v for k, v in offered.items() if k in names}, **own}
    train_x, train_y, test_x, test_y = entry.load(**kwargs)
    shape = entry.shape(own)
    for what, x, y in (("training", train_x, train_y), ("test", test_x, test_y)):
        if tuple(x.shape[1:]) != shape or len(x) != len(y):
            raise ValueError(
                f"dataset '{entry.name}' gave {what} images of shape {tuple(x.shape)} with {len(y)} "
                f"labels; registered input shape {shape}"
            )
    if x.dtype == torch.uint8 and entry.stats is None:
        raise ValueError(f"dataset '{entry.name}' gave uint8 images but registered no stats to normalize them")
    n_train = len(train_x)
    if not common["val_size"] < n_train:
        raise ValueError(
            f"dataset.val_size must be in [0, {n_train}) for {entry.name} (its training set has "
            f"{n_train} examples), got {common['val_size']}"
        )
    stats = entry.stats if train_x.dtype == torch.uint8 else None
    # Normalization is element-wise, so normalizing the whole set and then selecting rows gives the same bits as
    # selecting first.
    return Pool(
        x=_to_device(train_x, stats, device),
        y=train_y.long().to(device),
        test_x=_to_device(test_x, stats, device),
        test_y=test_y.long().to(device),
        num_classes=entry.num_classes,
        input_shape=shape,
        augment=bool(common["augment"]),
        pad_value=None if stats is None else black(stats, device),
    )


def split(pool: Pool, val_size: int, seed: int) -> Split:
    """The validation split of replicate `seed`: `val_size` examples held out of the training set."""
    n = len(pool.y)
    if not 0 <= val_size < n:
        raise ValueError(f"dataset.val_size must be in [0, {n}), got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(pool.y.device)
    return Split(pool, train_idx=perm[val_size:], val_idx=perm[:val_size])
