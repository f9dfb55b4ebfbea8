"""Data: datasets as normalized tensors resident on the training device, split per replicate, and seeded batches.

- `registry`: the registry `DATASETS`, `register_dataset`, the settings of a `dataset` node;
- `sources`: MNIST, CIFAR-10 (torchvision) and synthetic data (registered here on import);
- `pool`: `Pool` (a whole dataset on the device), `Split` (one replicate's training and validation rows), `load_pool`;
- `batches`: `Batches` (the batch at step t is a function of (seed, t)), augmentation.

Imports core only.
"""

from lottery.data import sources  # noqa: F401  (registers mnist, cifar10, synthetic)
from lottery.data.batches import Batches, augment, draw_augmentation, draw_epoch, to_device
from lottery.data.pool import Pool, Split, black, load_pool, split
from lottery.data.registry import DATASETS, Dataset, dataset_settings, register_dataset

__all__ = [
    "DATASETS",
    "Batches",
    "Dataset",
    "Pool",
    "Split",
    "augment",
    "black",
    "dataset_settings",
    "draw_augmentation",
    "draw_epoch",
    "load_pool",
    "register_dataset",
    "split",
    "to_device",
]
