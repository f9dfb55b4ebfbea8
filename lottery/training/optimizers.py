"""The optimizer registry. An optimizer is a registered function from (parameters, learning rate, weight decay, the
device, its own settings) to a `torch.optim.Optimizer` with one parameter group; the training loop sets each group's
`lr` before every step (the schedule is a function of the step), so any optimizer with `param_groups` works.

Every optimizer node in the config has the common keys `name`, `lr` and `weight_decay`; anything else is the
optimizer's own setting (SGD: `momentum`, `nesterov`; Adam and AdamW: `betas`), declared by a dataclass and checked
before any work. A user's optimizer is one `@register_optimizer` function in their module (`imports=[my_module]`).

Built-ins on CUDA use fused=True (one kernel for the whole update; GPU results have no fp32 baseline to keep); on the
CPU foreach=True, one multi-tensor kernel per operation instead of a Python loop over parameters: bit-identical to the
default per-tensor loop, and a LeNet-300-100 step is 3% (two threads) to 24% (one thread) faster (fused=True on the
CPU rounds differently, so CPU results would change).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lottery.core.ranges import check_fields, fraction, non_negative, positive, setting
from lottery.core.registry import Registry, check_settings, plain

COMMON = ("name", "lr", "weight_decay")
# A learning rate above this is a typo (1e308): every preset and paper uses < 1, and a step of 1e308 x a gradient
# overflows float32 at once. Up to it a run may diverge, which is a result (lottery.core.divergence: exit 3), not an
# error of the command (tests/test_divergence.py diverges on purpose with lr=1e6).
LR_MAX = 1e6


@dataclass
class CommonSettings:
    """The keys every optimizer node has besides `name`, with their ranges."""

    lr: float = setting(1e-3, positive(LR_MAX))
    weight_decay: float = setting(0.0, non_negative())


@dataclass(frozen=True)
class Optimizer:
    name: str
    fn: Callable[..., torch.optim.Optimizer]  # fn(params, *, lr, weight_decay, device, **settings)
    settings: type | None = None


OPTIMIZERS = Registry("optimizer")


def register_optimizer(name: str, settings: type | None = None):
    """`@register_optimizer("lion", settings=LionSettings)` on fn(params, *, lr, weight_decay, device, **settings)."""

    def decorator(fn):
        OPTIMIZERS.add(name, Optimizer(name, fn, settings))
        return fn

    return decorator


def optimizer_settings(node) -> tuple[Optimizer, dict]:
    """(the registered optimizer, all its settings: lr, weight_decay and its own), checked: one ValueError naming an
    unknown name or key, a wrong type, or a value out of range."""
    raw = plain(node)
    entry = OPTIMIZERS.lookup(raw.pop("name", None))
    lr, weight_decay = raw.pop("lr", 1e-3), raw.pop("weight_decay", 0.0)
    for key, value in (("lr", lr), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"optimizer.{key} must be a number, got {value!r}")
    check_fields(CommonSettings, {"lr": lr, "weight_decay": weight_decay}, "optimizer")
    own = check_settings(
        raw,
        entry.settings,
        "optimizer",
        of=f"optimizer '{entry.name}'",
        fn=entry.fn,
        skip=("params", "lr", "weight_decay", "device"),
    )
    return entry, {"lr": float(lr), "weight_decay": float(weight_decay), **own}


def make_optimizer(params, node, device=None) -> torch.optim.Optimizer:
    """The optimizer of the `optimizer` config node over `params`, for a run on `device` (default: the CPU)."""
    entry, settings = optimizer_settings(node)
    return entry.fn(list(params), device=torch.device(device or "cpu"), **settings)


def _kind(device: torch.device) -> dict:
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


@dataclass
class SgdSettings:
    momentum: float = setting(0.0, fraction())  # heavy-ball momentum, in [0, 1)
    nesterov: bool = False  # Nesterov momentum

    def __post_init__(self):
        if self.momentum < 0:
            raise ValueError(f"optimizer.momentum must be >= 0, got {self.momentum}")
        if self.nesterov and self.momentum <= 0:
            raise ValueError("optimizer.nesterov=true needs optimizer.momentum > 0")


@dataclass
class AdamSettings:
    betas: list[float] = setting(lambda: [0.9, 0.999], fraction())  # moment decay rates, each in [0, 1)

    def __post_init__(self):
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optimizer.betas must be two numbers in [0, 1), got {list(self.betas)}")


@register_optimizer("sgd", settings=SgdSettings)
def sgd(params, *, lr, weight_decay, device, momentum, nesterov):
    return torch.optim.SGD(
        params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, **_kind(device)
    )


@register_optimizer("adam", settings=AdamSettings)
def adam(params, *, lr, weight_decay, device, betas):
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **_kind(device))


@register_optimizer("adamw", settings=AdamSettings)
def adamw(params, *, lr, weight_decay, device, betas):
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **_kind(device))
