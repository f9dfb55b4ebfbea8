"""The dataset registry: each dataset is a loader of (train_x, train_y, test_x, test_y) plus what the framework needs
to know before loading it (input shape, number of classes, normalization statistics) and its own settings.

Every dataset node in the config has the common keys `name`, `root` (where its files live), `download`, `val_size`
(examples held out of the training set for the early-stop step) and `augment` (flip + pad-and-crop, for images);
anything else is the dataset's own setting, declared by a dataclass and checked before any work. A user's dataset is
one `@register_dataset` function in their module, loaded with `imports=[my_module]`:

    @dataclass
    class NoisySettings:
        noise: float = 0.1                     # dataset.noise

    @register_dataset("noisy_mnist", input_shape=(1, 28, 28), num_classes=10, settings=NoisySettings)
    def noisy_mnist(noise, root, seed):  # root, download, seed: only if the function names them
        ...
        return train_x, train_y, test_x, test_y  # uint8 images [N, C, H, W] (normalized with `stats`) or floats

A loader that names `root` reads files there (its existence is checked before any work); one that names `seed` gets
the replicate seed (each replicate then has its own data, as synthetic data does).

uint8 images are normalized with the registered `stats` (mean, std per channel, of the training set); float tensors
are used as they are.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from lottery.core.registry import Registry, check_settings, plain

COMMON = ("name", "root", "download", "val_size", "augment")
_COMMON_DEFAULTS = {"root": "data", "download": True, "val_size": 5000, "augment": False}

Shape = tuple[int, int, int]


@dataclass(frozen=True)
class Dataset:
    name: str
    load: Callable
    input_shape: Shape | Callable[[dict], Shape]  # fixed, or from the dataset's settings
    num_classes: int
    settings: type | None = None
    stats: tuple | None = None  # ((mean per channel), (std per channel)) for uint8 images
    seeded: bool = False  # the loader takes the replicate seed: each replicate has its own data
    reads_files: bool = True  # the loader takes `root`

    def shape(self, settings: dict) -> Shape:
        c, h, w = self.input_shape(settings) if callable(self.input_shape) else self.input_shape
        return c, h, w


DATASETS = Registry("dataset")


def register_dataset(
    name: str, *, input_shape, num_classes: int, settings: type | None = None, stats: tuple | None = None
):
    """`@register_dataset("name", input_shape=(C, H, W), num_classes=K, settings=Dataclass, stats=(mean, std))`.
    The function takes the dataclass's fields and whichever of `root`, `download` and `seed` it names."""

    def decorator(fn):
        params = inspect.signature(fn).parameters
        DATASETS.add(
            name, Dataset(name, fn, input_shape, num_classes, settings, stats, "seed" in params, "root" in params)
        )
        return fn

    return decorator


def dataset_settings(node) -> tuple[Dataset, dict, dict]:
    """(the registered dataset, its common settings, its own settings) of a `dataset` config node, checked: an unknown
    name, an unknown key, a wrong type or a value the settings class refuses raises one ValueError naming it."""
    raw = plain(node)
    entry = DATASETS.lookup(raw.pop("name", None))
    common = {k: raw.pop(k, _COMMON_DEFAULTS[k]) for k in COMMON[1:]}
    own = check_settings(raw, entry.settings, "dataset", of=f"dataset '{entry.name}'")
    if isinstance(common["val_size"], bool) or not isinstance(common["val_size"], int) or common["val_size"] < 0:
        raise ValueError(f"dataset.val_size must be an integer >= 0, got {common['val_size']!r}")
    return entry, common, own
