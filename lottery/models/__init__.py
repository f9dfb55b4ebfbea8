"""Models: the registry (`registry`: `MODELS`, `register_model`, `build_model`) and the built-in networks, registered
here on import: MLPs (LeNet-300-100, deep MLPs), Conv-2/4/6, VGG, ResNet-20.

Imports core only.
"""

from lottery.models import conv, mlp, resnet, vgg  # noqa: F401  (register the built-in models)
from lottery.models.registry import MODELS, build_model, register_model

__all__ = ["MODELS", "build_model", "register_model"]
