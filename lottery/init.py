"""Weight initializers, seeded by their own generator so that init never disturbs the global RNG.

An initializer is fn(weight, *, generator, **kwargs) and fills `weight` in place, registered in `INITIALIZERS`.
`initialize` visits model.modules() in order with one generator, so a seed fixes every weight bit for bit.

Imports core only.
"""

import inspect
import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from lottery.core.registry import Registry

INITIALIZERS = Registry("initializer")

# the cfg fields an initializer may consume; each gets only those its signature names
INIT_KWARGS = ("variance", "mode", "nonlinearity", "gain")
WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def register_initializer(name: str):
    """`@register_initializer("name")` on fn(weight, generator=..., [variance, mode, nonlinearity, gain]) filling
    `weight` in place from the seeded `generator`; it gets only the init config's fields its signature names (all of
    them with **kwargs). `init.name=<name>` selects it, for lottery-train and `lottery-init-study compare=[...]`."""

    def decorator(fn):
        INITIALIZERS.add(name, fn)
        return fn

    return decorator


def _gain(nonlinearity: str) -> float:
    # 0 is the negative slope torch's kaiming_* use, so leaky_relu here means slope 0 as there
    return nn.init.calculate_gain(nonlinearity, 0)  # type: ignore[arg-type]  # a name from the config: torch refuses others


@register_initializer("kaiming_normal")
def kaiming_normal(weight, *, generator, mode="fan_in", nonlinearity="relu"):
    nn.init.kaiming_normal_(weight, a=0, mode=mode, nonlinearity=nonlinearity, generator=generator)


@register_initializer("kaiming_uniform")
def kaiming_uniform(weight, *, generator, mode="fan_in", nonlinearity="relu"):
    nn.init.kaiming_uniform_(weight, a=0, mode=mode, nonlinearity=nonlinearity, generator=generator)


@register_initializer("xavier_normal")
def xavier_normal(weight, *, generator, gain=1.0):
    nn.init.xavier_normal_(weight, gain=gain, generator=generator)


@register_initializer("xavier_uniform")
def xavier_uniform(weight, *, generator, gain=1.0):
    nn.init.xavier_uniform_(weight, gain=gain, generator=generator)


@register_initializer("lecun_normal")
def lecun_normal(weight, *, generator):
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
    nn.init.normal_(weight, 0.0, math.sqrt(1.0 / fan_in), generator=generator)


@register_initializer("orthogonal")
def orthogonal(weight, *, generator, gain=1.0):
    nn.init.orthogonal_(weight, gain=gain, generator=generator)


@register_initializer("normal")
def normal(weight, *, generator, variance=None):
    if variance is None:
        raise ValueError("init 'normal' needs init.variance=<float>, e.g. init.variance=0.02")
    if variance <= 0:
        raise ValueError(f"init 'normal' needs init.variance > 0, got init.variance={variance}")
    nn.init.normal_(weight, 0.0, math.sqrt(variance), generator=generator)


@register_initializer("pytorch_default")
def pytorch_default(weight, *, generator):
    # the weight half of nn.Linear/nn.Conv*.reset_parameters; `initialize` calls reset_parameters
    # itself so the result is exactly PyTorch's, this entry serves callers that only have a tensor
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)


def weight_variance(name: str, fan_in: int, fan_out: int, **kwargs) -> float:
    """Variance of one weight entry under initializer `name` (kwargs as in the config)."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    mode, nonlinearity, gain = kwargs.get("mode", "fan_in"), kwargs.get("nonlinearity", "relu"), kwargs.get("gain", 1.0)
    if name in ("kaiming_normal", "kaiming_uniform"):
        return _gain(nonlinearity) ** 2 / (fan_in if mode == "fan_in" else fan_out)
    if name in ("xavier_normal", "xavier_uniform"):
        return gain**2 * 2.0 / (fan_in + fan_out)
    if name == "lecun_normal":
        return 1.0 / fan_in
    if name == "normal":
        if kwargs.get("variance") is None:
            raise ValueError("init 'normal' needs init.variance=<float>, e.g. init.variance=0.02")
        return float(kwargs["variance"])
    if name == "pytorch_default":
        return 1.0 / (3 * fan_in)  # U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    raise ValueError(f"no closed-form weight variance for initializer '{name}'")


def _get(cfg, key, default=None):
    # DictConfig and dict are Mappings; dataclasses and namespaces go through getattr
    value = cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)
    return default if value is None else value


def _accepted(fn, kwargs: dict) -> dict:
    """The subset of kwargs that fn's signature takes (all of them if it has **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: pass nothing extra
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return kwargs
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in kwargs.items() if k in names}


def _resolve(cfg) -> Callable:
    target = _get(cfg, "_target_")
    if target:
        import importlib  # checked before the run (lottery.experiment.check.check_target): it imports and is callable

        module, _, attr = str(target).rpartition(".")
        return getattr(importlib.import_module(module), attr)
    name = _get(cfg, "name")
    if name not in INITIALIZERS:
        raise ValueError(
            f"unknown initializer '{name}'; accepted: {sorted(INITIALIZERS)}, or set init._target_ to a callable"
        )
    return INITIALIZERS[name]


def _seed_default_rng(seed: int, device: torch.device):
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def _init_batchnorm(m: nn.modules.batchnorm._BatchNorm, how: str, generator) -> None:
    """BatchNorm scales 1 (PyTorch) or U(0, 1) (open_lth's `batchnorm_init='uniform'`), shifts 0, fresh statistics."""
    m.reset_parameters()
    if how == "uniform" and m.affine:
        with torch.no_grad():
            m.weight.uniform_(0.0, 1.0, generator=generator)


def initialize(model: nn.Module, cfg, seed: int) -> None:
    bias = _get(cfg, "bias", "zero")
    if bias not in ("zero", "default"):
        raise ValueError(f"init.bias must be 'zero' or 'default', got '{bias}'")
    batchnorm = _get(cfg, "batchnorm", "ones")
    if batchnorm not in ("ones", "uniform"):
        raise ValueError(f"unknown init.batchnorm '{batchnorm}'; accepted: ones, uniform")
    fn = _resolve(cfg)
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")

    if _get(cfg, "name") == "pytorch_default" and not _get(cfg, "_target_"):
        # reset_parameters draws from the global RNG; fork it so the caller's stream is untouched
        devices = (
            [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        )
        with torch.random.fork_rng(devices=devices):
            _seed_default_rng(seed, device)
            for m in model.modules():
                if isinstance(m, WEIGHTED):
                    m.reset_parameters()
                    if bias == "zero" and m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                    _init_batchnorm(m, batchnorm, None)  # None: the forked global RNG seeded above
        return

    g = torch.Generator(device=device).manual_seed(seed)
    extra = {k: _get(cfg, k) for k in INIT_KWARGS if _get(cfg, k) is not None}
    extra["generator"] = g
    extra = _accepted(fn, extra)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, WEIGHTED):
                fn(m.weight, **extra)
                if m.bias is not None:
                    if bias == "zero":
                        m.bias.zero_()
                    else:  # PyTorch's own bias default, but drawn from our generator
                        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(m.weight)
                        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                        m.bias.uniform_(-bound, bound, generator=g)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                # ones: draws nothing, so the other layers' weights are those of a model without BatchNorm init
                _init_batchnorm(m, batchnorm, g)
