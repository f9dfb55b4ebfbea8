"""Fully connected ReLU networks: generic mlp, LeNet-300-100, and the deep MLP of the init study."""

import itertools
import math

import torch.nn.functional as F
from torch import nn

from lottery.models.registry import register_model


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: list[int], num_classes: int):
        super().__init__()
        widths = [in_features, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.out = nn.Linear(widths[-1], num_classes)  # defined last: the classifier is the last nn.Linear

    def forward(self, x):
        x = x.flatten(1)
        for fc in self.hidden:
            x = F.relu(fc(x))
        return self.out(x)


@register_model("mlp")
def mlp(input_shape, num_classes, hidden):
    return MLP(math.prod(input_shape), list(hidden), num_classes)


@register_model("lenet_300_100")
def lenet_300_100(input_shape, num_classes, hidden=None):
    # the name fixes the architecture; a different `hidden` is a config mistake, not an override
    if hidden is not None and list(hidden) != [300, 100]:
        raise ValueError(f"lenet_300_100 has hidden=[300, 100], got hidden={list(hidden)}; use model=mlp")
    return MLP(math.prod(input_shape), [300, 100], num_classes)


@register_model("deep_mlp")
def deep_mlp(input_shape, num_classes, depth=50, width=100, hidden=None):
    hidden = list(hidden) if hidden is not None else [width] * depth
    return MLP(math.prod(input_shape), hidden, num_classes)
