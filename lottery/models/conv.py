"""Conv-2/4/6 of Frankle & Carbin (ICLR 2019), Figure 2: VGG-like, 3x3 same convs, no BatchNorm."""

import itertools

import torch.nn.functional as F
from torch import nn

from lottery.models.registry import register_model


class ConvNet(nn.Module):
    def __init__(self, input_shape, stages: list[int], num_classes: int, fc: tuple[int, ...] = (256, 256)):
        super().__init__()
        c, h, w = input_shape
        self.convs = nn.ModuleList()
        for width in stages:  # each stage: two convs then a 2x2 max-pool
            self.convs.append(nn.Conv2d(c, width, 3, padding=1))
            self.convs.append(nn.Conv2d(width, width, 3, padding=1))
            c, h, w = width, h // 2, w // 2
        widths = [c * h * w, *fc]
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.out = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if i % 2 == 1:
                x = F.max_pool2d(x, 2)
        x = x.flatten(1)
        for fc in self.fcs:
            x = F.relu(fc(x))
        return self.out(x)


@register_model("conv2")
def conv2(input_shape, num_classes):
    return ConvNet(input_shape, [64], num_classes)


@register_model("conv4")
def conv4(input_shape, num_classes):
    return ConvNet(input_shape, [64, 128], num_classes)


@register_model("conv6")
def conv6(input_shape, num_classes):
    return ConvNet(input_shape, [64, 128, 256], num_classes)
