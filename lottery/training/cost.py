"""Training cost: an estimate of the FLOPs of training, dense and sparse (counted from the masks).

Conventions, those of RigL (Evci et al. 2020, "Rigging the Lottery", Appendix H) and of the counter its code uses
(rigl/sparse_utils.py `get_stats` -> google-research micronet_challenge/counting.py `count_ops`):

- Only the weights of Linear and Conv layers are counted. One multiply-accumulate (MAC) is 2 FLOPs (a multiply and an
  add): a Linear layer costs in_features * out_features MACs per example (per position, for inputs with extra
  dimensions), a convolution (its weight's entries) * (output positions) MACs: C_out * C_in/groups * k_h * k_w * H_out *
  W_out; the output size is measured with forward hooks on one zero example, on a copy of the model on the CPU.
  micronet counts mults + adds of a dot product of length n as n + (n - 1) plus one add for the bias, i.e. the same
  2n per output with a bias and 2n - 1 without; it also counts one operation per ReLU output. Biases, BatchNorm,
  activations, pooling and the loss are left out here: they are linear in the activations, not in the weights, and
  a small fraction of a network's FLOPs.
- Sparse: a layer with density d (kept entries / entries of its weight) costs d times its dense MACs (micronet's
  `vector_length = k*k*c_in*(1 - sparsity)`), i.e. (output positions) * (kept weights), an exact integer here.
  Unmasked layers count dense. This is the theoretical cost of a sparse implementation; PyTorch's dense kernels do
  the dense work whatever the masks.
- A training step on one example costs 3 forward passes (RigL: forward f, backward 2f: the gradient with respect to
  the activations and with respect to the weights, each as costly as the forward pass), sparse ones for a sparse
  network: 3 f_S. A step whose weight gradient is dense (RigL's mask-update steps, which need dense gradients to grow
  connections) costs 2 f_S + f_D. Steps of batch size B cost B times that.

    forward_flops(masks) = f_S = 2 * sum over layers of (output positions)_l * (kept weights)_l
    step_flops(masks, B) = 3 * f_S * B            (dense_weight_grad: (2 * f_S + f_D) * B)
    training_flops(masks, steps, B) = steps * step_flops(masks, B)

  The dense counterpart is the same with every layer dense (f_D). Evaluation passes are not training and not counted.

- Structured (`structured=True`, channel tickets: lottery.pruning.granularity): a removed output channel (its weights'
  mask row all zero; its bias and BatchNorm entries are masked with it, so it outputs exactly zero) also removes the
  inputs it feeds in the next layer: a weight entry counts only when it is kept AND its input channel is alive. The
  layer feeding another is the one called just before it whose output channels match its input channels (a
  convolution feeding a Linear through a flatten feeds in_features / channels consecutive inputs per channel);
  models with shortcuts are not channel-pruned (lottery.experiment.check), so this chain is the network's.

Usage: `info = model_info(model, input_shape)` once (a deep copy of the model on the CPU; the model itself is not
touched), then `step_flops(info, masks, batch_size)` per mask (cheap: one count_nonzero per masked tensor), e.g.
at every mask update of a dynamic sparse run; `TrainingCost` adds steps under changing masks up.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

# masks ({name: 0/1 tensor}) or densities ({name: kept fraction}); None: dense
MasksOrDensities = Mapping[str, torch.Tensor | float] | None

_COUNTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class LayerCost:
    name: str  # the weight's parameter name, the key of its mask, e.g. "hidden.0.weight"
    positions: int  # times each weight entry is used per example (output positions: 1 for a Linear on flat input)
    numel: int  # entries of the weight

    @property
    def macs(self) -> int:
        """Dense forward multiply-accumulates per example."""
        return self.positions * self.numel


@dataclass(frozen=True)
class ModelInfo:
    layers: tuple[LayerCost, ...]
    # per layer: (index of the layer whose output channels are its inputs, inputs per such channel) or None
    feeds: tuple = ()

    @property
    def dense_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)


def model_info(model: nn.Module, input_shape: Sequence[int]) -> ModelInfo:
    """Per-layer costs of `model` on inputs of shape `input_shape` (one example, without the batch dimension, e.g.
    (1, 28, 28)): every Linear and Conv layer's weight name, entries and output positions, measured by forward hooks
    on a deep copy on the CPU (the model, its mode and its statistics are not touched). A module called twice
    in one forward pass counts twice."""
    # One zero example on the CPU: every layer has a CPU kernel (on the meta device some have none, which needed a
    # second path), and one example costs milliseconds even for VGG-16.
    net = copy.deepcopy(model).cpu()
    return _measure(net, torch.zeros((1, *input_shape)))


def _measure(net: nn.Module, x: torch.Tensor) -> ModelInfo:
    positions: dict[str, int] = {}
    order: list[str] = []
    numel: dict[str, int] = {}
    channels_of: dict[str, tuple[int, int, bool]] = {}  # (output channels, inputs along dim 1, is a Linear)
    called: list[str] = []  # every counted call, in order (the layer before a layer is its feeder)
    handles = []
    for mod_name, mod in net.named_modules():
        if not isinstance(mod, _COUNTED):
            continue
        name = f"{mod_name}.weight" if mod_name else "weight"
        numel[name] = mod.weight.numel()
        channels = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
        channels_of[name] = (channels, mod.weight.shape[1], isinstance(mod, nn.Linear))

        def hook(module, inputs, output, name=name, channels=channels):
            called.append(name)
            if name not in positions:
                order.append(name)
            # each weight entry is used once per output position (per example: the batch is 1)
            positions[name] = positions.get(name, 0) + output.numel() // channels

        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            net.eval()(x)
    finally:
        for h in handles:
            h.remove()
    index = {n: i for i, n in enumerate(order)}
    feeds: dict[str, tuple[int, int] | None] = {}
    for before, name in zip([None, *called], called):
        if name in feeds:
            continue
        feeds[name] = None
        if before is not None:
            (c_out, _, from_linear), (_, c_in, to_linear) = channels_of[before], channels_of[name]
            if c_in == c_out or (not from_linear and to_linear and c_in % c_out == 0):  # same, or conv->flatten
                feeds[name] = (index[before], c_in // c_out)
    return ModelInfo(tuple(LayerCost(n, positions[n], numel[n]) for n in order), tuple(feeds[n] for n in order))


def _kept(layer: LayerCost, masks: MasksOrDensities) -> int | float:
    if masks is None or layer.name not in masks:
        return layer.numel
    m = masks[layer.name]
    if isinstance(m, torch.Tensor):
        return int(m.count_nonzero())
    return float(m) * layer.numel


def _alive_outputs(layer: LayerCost, masks) -> torch.Tensor | None:
    """Which output channels of `layer` are not removed (None: all, the layer is not masked)."""
    if masks is None or layer.name not in masks:
        return None
    m = masks[layer.name]
    return (m.reshape(m.shape[0], -1) != 0).any(dim=1)


def _kept_structured(info: ModelInfo, i: int, masks) -> int | float:
    """Kept entries of layer i whose input channel is alive (its feeding layer's channel not removed)."""
    layer = info.layers[i]
    m = masks.get(layer.name) if masks is not None else None
    feed = info.feeds[i] if i < len(info.feeds) else None
    alive = _alive_outputs(info.layers[feed[0]], masks) if feed is not None else None
    if alive is None:
        return _kept(layer, masks)
    assert feed is not None  # alive is None without a feeding layer
    alive_in = alive.repeat_interleave(feed[1])  # flatten: each channel feeds feed[1] consecutive inputs
    if m is None:
        return int(alive_in.sum()) * (layer.numel // alive_in.numel())
    shape = [1, alive_in.numel()] + [1] * (m.dim() - 2)
    return int(((m != 0) & alive_in.to(m.device).view(shape)).sum())


def macs(info: ModelInfo, masks: MasksOrDensities = None, *, structured: bool = False) -> int | float:
    """Forward multiply-accumulates per example: sum of (output positions) * (kept weights) over the layers; dense
    without masks. Masks give an exact integer, densities a float. `structured` (masks only): a removed output
    channel also removes the next layer's inputs it feeds."""
    if structured and masks is not None:
        if any(not isinstance(m, torch.Tensor) for m in masks.values()):
            raise ValueError("a structured count needs the masks, not densities")
        return sum(layer.positions * _kept_structured(info, i, masks) for i, layer in enumerate(info.layers))
    return sum(layer.positions * _kept(layer, masks) for layer in info.layers)


def forward_flops(info: ModelInfo, masks: MasksOrDensities = None, *, structured: bool = False) -> int | float:
    """f: FLOPs of one forward pass of one example, 2 per multiply-accumulate."""
    return 2 * macs(info, masks, structured=structured)


def step_flops(
    info: ModelInfo,
    masks: MasksOrDensities = None,
    batch_size: int = 1,
    *,
    dense_weight_grad: bool = False,
    structured: bool = False,
) -> int | float:
    """FLOPs of one training step of `batch_size` examples at `masks`: 3 f_S per example (forward, gradient of the
    activations, gradient of the weights), or 2 f_S + f_D when the weight gradient is dense (RigL's update steps)."""
    sparse = forward_flops(info, masks, structured=structured)
    weight_grad = forward_flops(info) if dense_weight_grad else sparse
    return (2 * sparse + weight_grad) * batch_size


def training_flops(info: ModelInfo, masks: MasksOrDensities, steps: int, batch_size: int) -> int | float:
    """FLOPs of `steps` training steps of `batch_size` examples at fixed `masks` (None: dense)."""
    return steps * step_flops(info, masks, batch_size)


@dataclass
class TrainingCost:
    """Steps and FLOPs added up under masks that may change (IMP's levels, a dynamic sparse run's mask updates).
    `flops_dense` is what the same steps cost without masks, `flops_sparse` what they cost at the masks they ran at."""

    info: ModelInfo
    batch_size: int
    structured: bool = False  # channel tickets: removed channels also remove the next layer's inputs
    steps: int = 0
    flops_dense: int | float = 0
    flops_sparse: int | float = 0
    _dense_step: int | float = field(default=0, init=False, repr=False)

    def __post_init__(self):
        self._dense_step = step_flops(self.info, None, self.batch_size)

    def add(self, steps: int, masks: MasksOrDensities = None, *, dense_weight_grad_steps: int = 0) -> None:
        """`steps` steps at `masks`, of which `dense_weight_grad_steps` computed a dense weight gradient."""
        if not 0 <= dense_weight_grad_steps <= steps:
            raise ValueError(f"dense_weight_grad_steps must be in [0, steps={steps}], got {dense_weight_grad_steps}")
        sparse = step_flops(self.info, masks, self.batch_size, structured=self.structured)
        update = (
            step_flops(self.info, masks, self.batch_size, dense_weight_grad=True, structured=self.structured)
            if dense_weight_grad_steps
            else 0
        )
        self.steps += steps
        self.flops_dense += steps * self._dense_step
        self.flops_sparse += (steps - dense_weight_grad_steps) * sparse + dense_weight_grad_steps * update

    def record(self) -> dict:
        return {"steps": self.steps, "train_flops_dense": self.flops_dense, "train_flops_sparse": self.flops_sparse}
