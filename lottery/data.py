"""Datasets as normalized tensors resident on the training device, plus seeded, resumable training batches.

Whole datasets fit in device memory (CIFAR-10 train is ~600 MB as float32), so batches are a single index_select
instead of a DataLoader with per-sample PIL transforms. Every random draw uses its own seeded generator, so the
global torch RNG is never touched and the batch at step t depends only on (seed, t).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# torchvision is imported only where it is needed (CIFAR-10, downloads): its import pulls in torch._dynamo and costs
# 1.5-3 s, more than the rest of startup; MNIST already on disk is read directly (_read_idx).

DATASETS = ("mnist", "cifar10", "synthetic")

# Fixed training-set statistics, so normalization does not depend on the validation split.
_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
_SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
_TRAIN_SIZES = {"mnist": 60000, "cifar10": 50000}
_FOLDERS = {"mnist": "MNIST/raw", "cifar10": "cifar-10-batches-py"}
_PAD = 4


@dataclass
class Data:
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    input_shape: tuple[int, int, int]
    augment: bool
    # What the pad-and-crop augmentation pads with, per channel: black after normalization (torchvision pads the raw
    # image with black before normalizing); None pads with 0 (synthetic data has no black).
    pad_value: Optional[Tensor] = None


def _unverified_cifar10():
    from torchvision.datasets import CIFAR10

    class _UnverifiedCIFAR10(CIFAR10):
        """CIFAR-10 that only requires the files to exist: local copies may be re-serialized with other md5 sums."""

        def _check_integrity(self) -> bool:
            names = [f for f, _ in self.train_list + self.test_list] + [self.meta["filename"]]
            return all(os.path.isfile(os.path.join(self.root, self.base_folder, f)) for f in names)

        def _load_meta(self) -> None:
            pass  # class names are unused, and torchvision md5-checks this file too

    return _UnverifiedCIFAR10


def _seed(*parts: int) -> int:
    # torch seeds must fit in 64 bits; keep them non-negative int64 whatever the caller's seed.
    return sum(parts) & (2**63 - 1)


def _not_found(name: str, root: str) -> FileNotFoundError:
    where = os.path.abspath(root)
    return FileNotFoundError(
        f"{name} not found: looked in {where} (expected {os.path.join(where, _FOLDERS[name])}). "
        f"Set dataset.root=/path/to/data to a folder containing {_FOLDERS[name]}, "
        f"or dataset.download=true to download it."
    )


def _download_failed(name: str, root: str, e: Exception) -> FileNotFoundError:
    where = os.path.abspath(root)
    return FileNotFoundError(
        f"{name} is not in {os.path.join(where, _FOLDERS[name])} and downloading it failed "
        f"({type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}). "
        f"If you have the data locally, set dataset.root=/path/to/data to a folder containing {_FOLDERS[name]}."
    )


_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _read_idx(path: str) -> Tensor:
    """An uncompressed unsigned-byte IDX file (MNIST's format), as torchvision reads it."""
    with open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic // 256 != 8:  # 0x08: unsigned byte
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic % 256
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=4 + 4 * ndim).view(*dims)


def _load_mnist(root: str, download: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    raw = os.path.join(root, _FOLDERS["mnist"])
    if all(os.path.isfile(os.path.join(raw, f)) for f in _MNIST_FILES):
        train_x, train_y, test_x, test_y = (_read_idx(os.path.join(raw, f)) for f in _MNIST_FILES)
        return train_x[:, None], train_y.long(), test_x[:, None], test_y.long()
    from torchvision.datasets import MNIST
    try:
        train, test = (MNIST(root, train=t, download=download) for t in (True, False))
    except RuntimeError as e:
        if "not found" in str(e).lower() and not download:
            raise _not_found("mnist", root) from e
        if download:
            raise _download_failed("mnist", root, e) from e
        raise
    except OSError as e:  # URLError and socket errors when there is no network
        if download:
            raise _download_failed("mnist", root, e) from e
        raise
    return train.data[:, None], train.targets, test.data[:, None], test.targets


def _load_cifar10(root: str, download: bool, verify: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from torchvision.datasets import CIFAR10
    _UnverifiedCIFAR10 = _unverified_cifar10()
    names = [f for f, _ in CIFAR10.train_list + CIFAR10.test_list]
    present = all(os.path.isfile(os.path.join(root, CIFAR10.base_folder, f)) for f in names)
    if not download and not present:
        raise _not_found("cifar10", root)
    # Files that are there but fail the md5 check must say so, not trigger a download over them.
    download = download and not present
    try:
        train = (CIFAR10 if verify else _UnverifiedCIFAR10)(root, train=True, download=download)
    except OSError as e:
        if download:
            raise _download_failed("cifar10", root, e) from e
        raise
    except RuntimeError as e:
        if verify and "corrupted" in str(e):
            raise RuntimeError(
                f"CIFAR-10 files in {os.path.abspath(os.path.join(root, CIFAR10.base_folder))} exist but fail "
                f"torchvision's md5 check. If this is a local copy with different checksums (e.g. re-serialized), "
                f"set dataset.verify=false to only check that the files exist."
            ) from e
        raise
    # The train constructor already checked every file (test batch included); don't hash ~180 MB again.
    test = _UnverifiedCIFAR10(root, train=False)

    def hwc_to_chw(d):
        return torch.from_numpy(d).permute(0, 3, 1, 2).contiguous()

    return (hwc_to_chw(train.data), torch.tensor(train.targets, dtype=torch.int64),
            hwc_to_chw(test.data), torch.tensor(test.targets, dtype=torch.int64))


def _make_synthetic(shape: tuple[int, int, int], n_train: int, n_test: int, seed: int, num_classes: int = 10):
    # Each class is a fixed random prototype; samples are prototype + noise, scaled to unit variance, so the data
    # is already "normalized" and a small model separates the classes within a few epochs.
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, *shape, generator=g)

    def draw(n):
        y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
        return 0.6 * prototypes[y] + 0.8 * torch.randn(n, *shape, generator=g), y

    return (*draw(n_train), *draw(n_test))


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


@dataclass
class Pool:
    """The whole training set (before the validation split) and the test set, normalized on the device. Replicas
    share one pool and keep only their split's indices, instead of a copy of the data each."""
    x: Tensor
    y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    input_shape: tuple[int, int, int]
    augment: bool
    pad_value: Optional[Tensor] = None


@dataclass
class Split:
    """One replicate's view of a pool: which pool rows are its training and its validation examples."""
    pool: Pool
    train_idx: Tensor  # on the pool's device
    val_idx: Tensor

    def data(self) -> Data:
        p = self.pool
        return Data(train_x=p.x[self.train_idx], train_y=p.y[self.train_idx], val_x=p.x[self.val_idx],
                    val_y=p.y[self.val_idx], test_x=p.test_x, test_y=p.test_y, num_classes=p.num_classes,
                    input_shape=p.input_shape, augment=p.augment, pad_value=p.pad_value)


def load_pool(name: str, root: str, *, val_size: int = 5000, download: bool = False, verify: bool = True,
              augment: bool = False, device="cpu", synthetic_shape: str = "mnist", synthetic_train: int = 1024,
              synthetic_test: int = 256, synthetic_seed: int = 0) -> Pool:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}'; accepted: {', '.join(DATASETS)}")
    if name == "synthetic":
        if synthetic_shape not in _SHAPES:
            raise ValueError(f"unknown synthetic_shape '{synthetic_shape}'; accepted: {', '.join(_SHAPES)}")
        if synthetic_train <= 0 or synthetic_test <= 0:
            raise ValueError(f"synthetic sizes must be positive, got train={synthetic_train} test={synthetic_test}")
    n_train = synthetic_train if name == "synthetic" else _TRAIN_SIZES[name]
    if not 0 <= val_size < n_train:
        raise ValueError(f"val_size must be in [0, {n_train}) for {name}, got {val_size}")
    if name != "synthetic" and not download and not os.path.isdir(root):
        raise _not_found(name, root)

    if name == "mnist":
        train_x, train_y, test_x, test_y = _load_mnist(root, download)
    elif name == "cifar10":
        train_x, train_y, test_x, test_y = _load_cifar10(root, download, verify)
    else:
        train_x, train_y, test_x, test_y = _make_synthetic(_SHAPES[synthetic_shape], synthetic_train,
                                                          synthetic_test, synthetic_seed)
    assert len(train_x) == n_train, f"{name}: expected {n_train} training samples, found {len(train_x)}"
    stats = _STATS.get(name)
    # Normalization is element-wise, so normalizing the whole set and then selecting rows gives the same bits as
    # selecting first.
    return Pool(x=_to_device(train_x, stats, device), y=train_y.to(device), test_x=_to_device(test_x, stats, device),
                test_y=test_y.to(device), num_classes=10, input_shape=tuple(train_x.shape[1:]), augment=augment,
                pad_value=None if stats is None else black(stats, device))


def split(pool: Pool, val_size: int, seed: int) -> Split:
    """The validation split of replicate `seed`: `val_size` examples held out of the training set."""
    n = len(pool.y)
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, {n}), got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(pool.y.device)
    return Split(pool, train_idx=perm[val_size:], val_idx=perm[:val_size])


def load_data(name: str, root: str, *, val_size: int = 5000, split_seed: int = 0, download: bool = False,
              verify: bool = True, augment: bool = False, device="cpu",
              synthetic_shape: str = "mnist", synthetic_train: int = 1024, synthetic_test: int = 256,
              synthetic_seed: int = 0) -> Data:
    pool = load_pool(name, root, val_size=val_size, download=download, verify=verify, augment=augment, device=device,
                     synthetic_shape=synthetic_shape, synthetic_train=synthetic_train, synthetic_test=synthetic_test,
                     synthetic_seed=synthetic_seed)
    return split(pool, val_size, split_seed).data()


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


def _augment(x: Tensor, flip: Tensor, offsets: Tensor, pad_value: Optional[Tensor] = None) -> Tensor:
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
        padded[:, :, _PAD:_PAD + h, _PAD:_PAD + w] = x
    return padded[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


class Batches:
    """Seeded training batches: the batch at step t depends only on (seed, t), so a resumed run sees the same data.

    The permutation and the augmentation values are drawn on the CPU once per epoch (`draw_epoch`) and copied to the
    data's device, so a seed gives the same batches on a CPU and on any GPU."""

    def __init__(self, data: Data, batch_size: int, seed: int):
        n = len(data.train_y)
        if not 0 < batch_size <= n:
            raise ValueError(f"batch_size must be in [1, {n}] (training set size), got {batch_size}")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.steps_per_epoch = n // batch_size
        self.device = data.train_x.device
        self._epoch, self._draws = None, None

    def get(self, step: int) -> tuple[Tensor, Tensor]:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            drawn = draw_epoch(self.seed, epoch, len(self.data.train_y), self.batch_size, self.data.augment)
            self._draws = {k: to_device(v, self.device) for k, v in drawn.items()}
            self._epoch = epoch
        idx = self._draws["perm"][i * self.batch_size:(i + 1) * self.batch_size]
        x, y = self.data.train_x.index_select(0, idx), self.data.train_y.index_select(0, idx)
        if self.data.augment:
            x = _augment(x, self._draws["flip"][i], self._draws["offsets"][i], self.data.pad_value)
        return x, y
