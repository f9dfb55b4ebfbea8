"""The compact network of a channel (or neuron) ticket: a physically smaller nn.Module computing the same function.

An output row of a Linear, or an output filter of a Conv, whose mask is all zero is a unit whose pre-activation is a
constant (its bias). If that unit's activation (after its BatchNorm and ReLU) is exactly zero it is taken out with
the next layer's matching inputs (for the first Linear after a flatten: the h x w inputs of a channel) and its
BatchNorm entries. If it is a non-zero constant and the next layer is a Linear, the constant's contribution is
folded into the next layer's bias and the unit is taken out too; before a Conv it is kept, since the Conv's zero
padding makes a constant input's contribution differ at the borders.

Each model family says which layers form a chain (lottery.models: MLP, ConvNet, VGG). ResNet-20 is refused: a
block's output channels are added to its shortcut's, so removing one needs every layer writing to that sum to have
lost it (not the case for a mask built per layer), and the internal channels alone leave most of the network as is.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


class NotCompactable(ValueError):
    """The architecture has no compact form here (one line says why)."""


@dataclass
class Layer:
    path: str  # module path of the Linear or Conv2d
    bn: str | None = None  # its BatchNorm2d, applied before the ReLU
    expand: int = 1  # inputs per unit of the previous layer (h*w for the first Linear after a flatten)


def chain(model: nn.Module) -> list[Layer]:
    """The layers of `model` in order, each feeding the next through (BatchNorm,) ReLU, max-pool or avg-pool."""
    from lottery.models.conv import ConvNet
    from lottery.models.mlp import MLP
    from lottery.models.resnet import ResNet
    from lottery.models.vgg import VGG

    if isinstance(model, MLP):
        return [Layer(f"hidden.{i}") for i in range(len(model.hidden))] + [Layer("out")]
    if isinstance(model, ConvNet):
        layers = [Layer(f"convs.{i}") for i in range(len(model.convs))]
        first_fc, last_conv = model.fcs[0] if len(model.fcs) else model.out, model.convs[-1]
        assert isinstance(first_fc, nn.Linear) and isinstance(last_conv, nn.Conv2d)
        expand = first_fc.in_features // last_conv.out_channels
        fcs = [Layer(f"fcs.{i}") for i in range(len(model.fcs))] + [Layer("out")]
        fcs[0].expand = expand
        return layers + fcs
    if isinstance(model, VGG):
        return [
            Layer(f"features.{i}.conv", bn=f"features.{i}.bn")
            for i, m in enumerate(model.features)
            if not isinstance(m, nn.MaxPool2d)
        ] + [Layer("out")]
    if isinstance(model, ResNet):
        raise NotCompactable(
            "resnet20 has no compact network here: its blocks add their output channels to the "
            "shortcut's, so a channel can only go where every layer writing to that sum lost it; "
            "export the packed ticket instead"
        )
    raise NotCompactable(
        f"{type(model).__name__} has no compact network here (known: mlp, lenet_300_100, deep_mlp, "
        f"conv2/4/6, vgg11/16/19)"
    )


def removed_units(model: nn.Module, masks: dict) -> dict[str, int]:
    """{layer path: number of output units whose weight mask is all zero}, for every layer but the classifier."""
    out = {}
    for layer in chain(model)[:-1]:
        mask = masks.get(f"{layer.path}.weight")
        out[layer.path] = 0 if mask is None else int((mask.flatten(1) == 0).all(1).sum())
    return out


def _constant(model: nn.Module, layer: Layer, rows: torch.Tensor) -> torch.Tensor:
    """The activation (after BatchNorm and ReLU) of units `rows`, whose weights are all zero: a constant each."""
    mod = model.get_submodule(layer.path)
    assert isinstance(mod, (nn.Linear, nn.Conv2d))  # chain() lists only these
    b = mod.bias.detach()[rows] if mod.bias is not None else torch.zeros(len(rows))
    if layer.bn:
        bn = model.get_submodule(layer.bn)
        assert isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None and bn.running_var is not None
        b = (b - bn.running_mean[rows]) / torch.sqrt(bn.running_var[rows] + bn.eps)
        if bn.affine:
            b = b * bn.weight.detach()[rows] + bn.bias.detach()[rows]
    return F.relu(b)


def compact(model: nn.Module, masks: dict) -> tuple[nn.Module, dict[str, tuple[int, int]]]:
    """(compact copy of the masked `model`, {layer path: (units kept, units before)}). `model` holds the masked
    weights (masks applied) and is in eval mode; `masks` is {parameter name: tensor}."""
    layers = chain(model)
    new = copy.deepcopy(model).eval()
    kept_units: dict[str, tuple[int, int]] = {}
    prev_keep: torch.Tensor | None = None  # kept units of the previous layer
    fold: tuple[torch.Tensor, torch.Tensor] | None = None  # (removed units, their constant) of the previous layer
    with torch.no_grad():
        for i, layer in enumerate(layers):
            mod = model.get_submodule(layer.path)
            assert isinstance(mod, (nn.Linear, nn.Conv2d))  # chain() lists only these
            w = mod.weight.detach()
            bias = mod.bias.detach().clone() if mod.bias is not None else None
            if fold is not None:  # removed units of the previous layer with a non-zero constant: into this bias
                assert bias is not None  # a Linear after a layer of constant units has a bias (models here do)
                rows, const = fold
                cols = _expand(rows, layer.expand)
                bias = bias + w[:, cols] @ const.repeat_interleave(layer.expand)
            n_out = w.shape[0]
            keep = torch.arange(n_out)
            fold = None
            if i < len(layers) - 1:
                mask = masks.get(f"{layer.path}.weight")
                dead = (mask.flatten(1) == 0).all(1) if mask is not None else torch.zeros(n_out, dtype=torch.bool)
                if dead.any():
                    rows = dead.nonzero().flatten()
                    const = _constant(model, layer, rows)
                    if isinstance(model.get_submodule(layers[i + 1].path), nn.Linear):
                        if (const != 0).any():
                            fold = (rows[const != 0], const[const != 0])
                    else:  # a Conv's zero padding: only an exactly-zero activation can go
                        dead[rows[const != 0]] = False
                    keep = (~dead).nonzero().flatten()
            w = w[keep]
            if prev_keep is not None:
                w = w[:, _expand(prev_keep, layer.expand)]
            _replace(new, layer.path, _smaller(mod, w, bias[keep] if bias is not None else None))
            if layer.bn:
                bn = model.get_submodule(layer.bn)
                assert isinstance(bn, nn.BatchNorm2d)
                _replace(new, layer.bn, _smaller_bn(bn, keep))
            kept_units[layer.path] = (len(keep), n_out)
            prev_keep = keep
    return new, kept_units


def _expand(units: torch.Tensor, per_unit: int) -> torch.Tensor:
    return (units[:, None] * per_unit + torch.arange(per_unit)).flatten()


def _smaller(mod: nn.Linear | nn.Conv2d, w: torch.Tensor, b: torch.Tensor | None) -> nn.Module:
    out: nn.Linear | nn.Conv2d
    if isinstance(mod, nn.Linear):
        out = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    else:
        # torch types a Conv2d's kernel_size, stride and dilation tuple[int, ...] and its arguments tuple[int, int]:
        # they are the same values (a 2-d convolution's pairs)
        pair = tuple[int, int]
        out = nn.Conv2d(
            w.shape[1],
            w.shape[0],
            cast(pair, mod.kernel_size),
            stride=cast(pair, mod.stride),
            padding=cast("str | tuple[int, int]", mod.padding),
            dilation=cast(pair, mod.dilation),
            bias=b is not None,
        )
    out.weight.data.copy_(w)
    if b is not None:
        assert out.bias is not None  # made with bias=True
        out.bias.data.copy_(b)
    return out.eval()


def _smaller_bn(bn: nn.BatchNorm2d, keep: torch.Tensor) -> nn.BatchNorm2d:
    out = nn.BatchNorm2d(
        len(keep), eps=bn.eps, momentum=bn.momentum, affine=bn.affine, track_running_stats=bn.track_running_stats
    )
    state = {k: (v[keep] if v.dim() else v).clone() for k, v in bn.state_dict().items()}
    out.load_state_dict(state)
    return out.eval()


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def count(model: nn.Module, input_shape) -> dict[str, int]:
    """{weights, nonzero, flops}: weights of the Linear and Conv layers (all of them and the non-zero ones) and the
    multiply-adds of one example through them."""
    flops = []

    def hook(mod, inp, out):
        if isinstance(mod, nn.Linear):
            flops.append(mod.in_features * mod.out_features)
        else:
            k = mod.weight[0].numel()  # in_channels/groups x kh x kw
            flops.append(k * out.shape[1] * out.shape[2] * out.shape[3])

    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
    return {
        "weights": sum(m.weight.numel() for m in layers),
        "nonzero": sum(int(m.weight.count_nonzero()) for m in layers),
        "flops": sum(flops),
    }


def save_exported(model: nn.Module, input_shape, path) -> None:
    """torch.export with a dynamic batch size, saved with torch.export.save (a .pt2 file): loads with
    `torch.export.load(path).module()` in plain PyTorch, without lottery."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    example = torch.zeros(2, *input_shape)
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


def lowest_norm_masks(model: nn.Module, keep: float, biases: bool = True) -> dict[str, torch.Tensor]:
    """Channel masks of `model` by hand, for benchmarks and tests: in every layer but the classifier, the output rows
    (neurons, filters) with the lowest L2 norm pruned so that round(keep x rows) stay; with `biases`, their bias and
    BatchNorm entries too (as a channel-granularity ticket prunes them). {parameter name: float mask}; the caller
    applies them (lottery.masks.apply)."""
    masks = {}
    params = dict(model.named_parameters())
    for layer in chain(model)[:-1]:
        w = params[f"{layer.path}.weight"].detach()
        n_keep = max(1, round(keep * w.shape[0]))
        rows = torch.zeros(w.shape[0], dtype=torch.bool)
        rows[w.flatten(1).norm(dim=1).argsort(descending=True)[:n_keep]] = True
        masks[f"{layer.path}.weight"] = rows.view(-1, *[1] * (w.dim() - 1)).expand_as(w).float().contiguous()
        if biases:
            for name in (f"{layer.path}.bias", *((f"{layer.bn}.weight", f"{layer.bn}.bias") if layer.bn else ())):
                if name in params:
                    masks[name] = rows.float()
    return masks
