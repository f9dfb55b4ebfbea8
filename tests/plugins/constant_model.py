"""A model that predicts one class whatever the input (its weights get no gradient; only the output bias learns the
class frequencies), for the at-chance tests. Test-only: loaded with `imports=[constant_model]`."""
from __future__ import annotations

import math

from torch import nn

from lottery.models import register_model


class ConstantPrediction(nn.Module):
    def __init__(self, input_shape, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1)) * 0 + self.fc.bias


@register_model("constant_prediction")
def constant_prediction(input_shape, num_classes, **_unused):
    return ConstantPrediction(input_shape, num_classes)
