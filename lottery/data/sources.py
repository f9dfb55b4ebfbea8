"""The built-in datasets: MNIST and CIFAR-10 through torchvision, and small seeded synthetic data for tests.

torchvision is imported only where it is needed (CIFAR-10, downloads): its models and ops cost a start-up 0.2 s, and it
pulls in torch._dynamo (1.3 s) before the first optimizer would; MNIST already on disk is read directly (`_read_idx`).
A torchvision that cannot be imported is one line there (lottery.core.commandline.require_torchvision).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from lottery.core.commandline import require_torchvision
from lottery.core.ranges import at_least, setting
from lottery.data.registry import register_dataset

_FOLDERS = {"mnist": "MNIST/raw", "cifar10": "cifar-10-batches-py"}
# Fixed training-set statistics, so normalization does not depend on the validation split.
MNIST_STATS = ((0.1307,), (0.3081,))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
SYNTHETIC_SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


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


_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _read_idx(path: str) -> Tensor:
    """An uncompressed unsigned-byte IDX file (MNIST's format), as torchvision reads it."""
    with open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic // 256 != 8:  # 0x08: unsigned byte
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic % 256
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=4 + 4 * ndim).view(*dims)


def _load_mnist(root: str, download: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    raw = os.path.join(root, _FOLDERS["mnist"])
    if all(os.path.isfile(os.path.join(raw, f)) for f in _MNIST_FILES):
        train_x, train_y, test_x, test_y = (_read_idx(os.path.join(raw, f)) for f in _MNIST_FILES)
        return train_x[:, None], train_y.long(), test_x[:, None], test_y.long()
    require_torchvision()
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


@register_dataset("mnist", input_shape=(1, 28, 28), num_classes=10, stats=MNIST_STATS)
def mnist(root: str, download: bool):
    """MNIST: 60k training and 10k test images, 1x28x28."""
    if not download and not os.path.isdir(root):
        raise _not_found("mnist", root)
    return _load_mnist(root, download)


def _unverified_cifar10():
    require_torchvision()
    from torchvision.datasets import CIFAR10

    class _UnverifiedCIFAR10(CIFAR10):
        """CIFAR-10 that only requires the files to exist: local copies may be re-serialized with other md5 sums."""

        def _check_integrity(self) -> bool:
            names = [f for f, _ in self.train_list + self.test_list] + [self.meta["filename"]]
            return all(os.path.isfile(os.path.join(self.root, self.base_folder, f)) for f in names)

        def _load_meta(self) -> None:
            pass  # class names are unused, and torchvision md5-checks this file too

    return _UnverifiedCIFAR10


def _load_cifar10(root: str, download: bool, verify: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    require_torchvision()
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

    return (
        hwc_to_chw(train.data),
        torch.tensor(train.targets, dtype=torch.int64),
        hwc_to_chw(test.data),
        torch.tensor(test.targets, dtype=torch.int64),
    )


@dataclass
class Cifar10Settings:
    verify: bool = True  # check torchvision's md5 sums; false accepts a re-serialized local copy


@register_dataset("cifar10", input_shape=(3, 32, 32), num_classes=10, settings=Cifar10Settings, stats=CIFAR10_STATS)
def cifar10(root: str, download: bool, verify: bool):
    """CIFAR-10: 50k training and 10k test images, 3x32x32."""
    if not download and not os.path.isdir(root):
        raise _not_found("cifar10", root)
    return _load_cifar10(root, download, verify)


def _make_synthetic(shape: tuple[int, int, int], n_train: int, n_test: int, seed: int, num_classes: int = 10):
    # Each class is a fixed random prototype; samples are prototype + noise, scaled to unit variance, so the data
    # is already "normalized" and a small model separates the classes within a few epochs.
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, *shape, generator=g)

    def draw(n):
        y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
        return 0.6 * prototypes[y] + 0.8 * torch.randn(n, *shape, generator=g), y

    return (*draw(n_train), *draw(n_test))


@dataclass
class SyntheticSettings:
    synthetic_shape: str = "mnist"  # mnist (1x28x28) | cifar10 (3x32x32)
    synthetic_train: int = setting(1024, at_least(1))  # training examples (the validation split is taken out of these)
    synthetic_test: int = setting(256, at_least(1))  # test examples

    def __post_init__(self):
        if self.synthetic_shape not in SYNTHETIC_SHAPES:
            raise ValueError(
                f"unknown dataset.synthetic_shape '{self.synthetic_shape}'; accepted: {', '.join(SYNTHETIC_SHAPES)}"
            )
        if self.synthetic_train <= 0 or self.synthetic_test <= 0:
            raise ValueError(
                f"dataset.synthetic_train and dataset.synthetic_test must be positive, got "
                f"{self.synthetic_train} and {self.synthetic_test}"
            )


@register_dataset(
    "synthetic",
    input_shape=lambda s: SYNTHETIC_SHAPES[s["synthetic_shape"]],
    num_classes=10,
    settings=SyntheticSettings,
)
def synthetic(synthetic_shape: str, synthetic_train: int, synthetic_test: int, seed: int):
    """Class prototypes plus noise, drawn from the replicate seed (no files)."""
    return _make_synthetic(SYNTHETIC_SHAPES[synthetic_shape], synthetic_train, synthetic_test, seed)
