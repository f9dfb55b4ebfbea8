"""CIFAR ResNet-20 (He et al. 2016, Section 4.2) with 1x1 projection shortcuts where shapes change."""

import torch.nn.functional as F
from torch import nn

from lottery.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        # no conv biases: the BatchNorm right after each conv makes them redundant
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        if stride != 1 or c_in != c_out:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    stage1: nn.Sequential  # set by name in __init__ (setattr), declared for the type checker
    stage2: nn.Sequential
    stage3: nn.Sequential

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, blocks_per_stage: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        c = width
        for i, c_out in enumerate([width, 2 * width, 4 * width]):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(c, c_out, stride)] + [BasicBlock(c_out, c_out, 1) for _ in range(blocks_per_stage - 1)]
            setattr(self, f"stage{i + 1}", nn.Sequential(*blocks))
            c = c_out
        self.out = nn.Linear(c, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = self.stage3(self.stage2(self.stage1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.out(x)


@register_model("resnet20")
def resnet20(input_shape, num_classes, width=16):
    return ResNet(input_shape[0], num_classes, width=width)
