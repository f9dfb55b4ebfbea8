"""The model registry: every builder is fn(input_shape, num_classes, **kwargs) -> nn.Module.

Rules shared by all models (pruning and init code rely on them): only plain nn.Linear, nn.Conv2d and nn.BatchNorm2d
hold parameters, activations are ReLU, and the classifier is the last nn.Linear in named_modules() order.
"""

from collections.abc import Callable

from torch import nn

from lottery.core.registry import Registry

MODELS = Registry("model")


def register_model(name: str):
    """`@register_model("name")` on fn(input_shape, num_classes, **fields) -> nn.Module: `input_shape` (C, H, W) and
    `num_classes` come from the dataset's registration, `fields` are the model config's non-null fields (`hidden`,
    `depth`, `width`) that fn names. `model=<name>` (with a conf/model/ option) or `model.name=<name>` selects it."""

    def decorator(fn: Callable[..., nn.Module]):
        MODELS.add(name, fn)
        return fn

    return decorator


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int, **kwargs) -> nn.Module:
    builder = MODELS.lookup(name)
    # one flat config serves every model, so fields a model does not use arrive as None
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return builder(tuple(input_shape), num_classes, **kwargs)
