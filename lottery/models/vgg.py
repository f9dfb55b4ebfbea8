"""CIFAR VGG with BatchNorm, following open_lth's cifar_vgg (conv biases kept, one Linear head)."""

import torch.nn.functional as F
from torch import nn

from lottery.models.registry import register_model

CFGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


class ConvBN(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class VGG(nn.Module):
    def __init__(self, cfg: list, in_channels: int, num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(ConvBN(c, v))
                c = v
        self.features = nn.Sequential(*layers)
        self.out = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.features(x)
        # open_lth uses AvgPool2d(2) on the 2x2 CIFAR map; adaptive pooling is the same there
        # and also handles the 1x1 map that 28x28 MNIST inputs leave
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.out(x)


def _register(name):
    @register_model(name)
    def build(input_shape, num_classes):
        return VGG(CFGS[name], input_shape[0], num_classes)

    return build


vgg11, vgg16, vgg19 = (_register(n) for n in CFGS)
