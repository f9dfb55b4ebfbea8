"""Density distributions: per-tensor densities (and exact integer survivor counts) from one global density.

`uniform` gives every tensor the global density; `er` and `erk` are Erdős–Rényi and its kernel version as defined by
the RigL paper (Evci et al. 2020) and code (github google-research/rigl, rigl/sparse_utils.py,
`get_sparsities_erdos_renyi`): tensor l gets density eps * p_l with

    erk: p_l = (sum of the dimensions of l) / (product of its dimensions), optionally ** power (RigL's
         `erk_power_scale`, 1 by default): (n_out + n_in + k_h + k_w) / (n_out * n_in * k_h * k_w) for a conv;
    er:  p_l = (n_in + n_out) / (n_in * n_out) over the two channel dimensions only, kernel dimensions ignored (RigL's
         'erdos_renyi', `n_in, n_out = shape_list[-2:]` of a TF kernel, which are the first two of a PyTorch weight);

and eps chosen so the densities average to the global one, weighted by tensor size. RigL's iterative capping: while
some eps * p_l exceeds 1, the tensor(s) with the largest p_l become dense (density 1) and eps is solved again for the
rest, whose counts absorb the weights the dense ones cannot take (`distribution`).

Counts: `allocate` turns the densities into integer survivors per tensor whose sum is exactly the total asked for
(largest remainders, ties to the earlier tensor; never more than a tensor's `upper` bound), and `survivor_counts`
uses total = round_half_up(density * all weights), the same total as global pruning to that density.

Where this differs from RigL's code, on purpose:
- eps is solved on real numbers, eps * sum_l p_l N_l = density * N - (weights of the dense tensors). RigL solves it on
  per-layer integer counts (n_zeros = floor(sparsity * N_l) in each term), so its densities differ from these by
  less than (number of layers) / N in the global count; the exact total here comes from `allocate` instead.
- RigL's training scripts keep the first layer unmasked by default (imagenet_train_eval.py `first_layer_sparsity=0.`,
  cifar_resnet/resnet_train_eval.py `prune_first_layer=False`) and the last layer sparse; their distribution
  function itself (`get_sparsities` with an empty `custom_sparsity_map`) distributes over every mask it is handed,
  as this module does. Here which tensors are pruned at all is `pruning.exclude`'s one job, the same for every scope:
  RigL's default is `pruning.exclude=[<first layer>.weight]` (e.g. `[convs.0.weight]`, `[conv.weight]` for ResNet-20),
  which removes the tensor from the distribution and from the count, exactly as RigL's unmasked layer.
- 1-dimensional tensors (biases and BatchNorm parameters, with pruning.prune_biases / prune_batchnorm) are not in
  RigL (it masks kernels only); here both er and erk give them p = n / n = 1, so they are almost always dense.

Why the distributions are values of `pruning.scope` (layerwise | global | uniform | er | erk) rather than a separate
`pruning.distribution` key: the scope is what decides how many weights each tensor keeps — per-tensor rates
(layerwise), the scores across tensors (global), or a formula of the tensor shapes (uniform, er, erk) — and these are
mutually exclusive: a distribution with global selection or with per-tensor rates would have no meaning, so one key
leaves no invalid combination to refuse. With a distribution, the per-level schedule is global pruning's (each level
removes pruning.rate of all surviving weights, or one shot to pruning.target) and only the split between tensors
comes from the distribution; selection within each tensor is then layerwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from lottery.pruning.selection import round_half_up

DISTRIBUTIONS = ("uniform", "er", "erk")

Shapes = Mapping[str, Sequence[int]]


def raw_probability(name: str, shape: Sequence[int], power: float = 1.0) -> float:
    """RigL's unscaled Erdős–Rényi probability p_l of one tensor (the density is eps * p_l); 1 for `uniform`."""
    shape = [int(s) for s in shape]
    if name not in DISTRIBUTIONS:
        raise ValueError(f"unknown density distribution '{name}'; accepted: {', '.join(DISTRIBUTIONS)}")
    if name == "uniform":
        return 1.0
    if len(shape) < 2:  # biases, BatchNorm: not in RigL; n / n
        return 1.0
    if name == "erk":
        return (sum(shape) / math.prod(shape)) ** power
    n_out, n_in = shape[0], shape[1]  # er
    return (n_in + n_out) / (n_in * n_out)


def distribution(name: str, shapes: Shapes, density: float, *, power: float = 1.0) -> dict[str, float]:
    """{tensor: density} of the distribution `name` (uniform | er | erk) over the tensors `shapes` ({name: shape},
    the masked tensors only), averaging `density` weighted by size: sum_l d_l N_l = density * sum_l N_l. Tensors
    whose Erdős–Rényi density would exceed 1 are dense (1.0), the others rescaled (RigL's capping). `power` is
    RigL's `erk_power_scale` (erk only)."""
    if not 0 <= density <= 1:
        raise ValueError(f"a density is a fraction in [0, 1], got {density}")
    if not shapes:
        return {}
    numel = {n: math.prod(int(s) for s in shape) for n, shape in shapes.items()}
    raw = {n: raw_probability(name, shape, power) for n, shape in shapes.items()}
    total = sum(numel.values())
    dense: set[str] = set()
    while True:
        rest = [n for n in shapes if n not in dense]
        if not rest:  # density 1 (or within rounding of it): everything dense
            return {n: 1.0 for n in shapes}
        rhs = density * total - sum(numel[n] for n in dense)
        eps = rhs / sum(raw[n] * numel[n] for n in rest)
        top = max(raw[n] for n in rest)
        if eps * top > 1:
            dense.update(n for n in rest if raw[n] == top)  # RigL: every tensor with the largest p becomes dense
        else:
            break
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


def allocate(
    name: str, shapes: Shapes, total: int, *, upper: Mapping[str, int] | None = None, power: float = 1.0
) -> dict[str, int]:
    """Integer survivors per tensor, summing to exactly `total`: the distribution at density total / (all weights),
    each tensor's real-valued count rounded down, the remainder handed out one by one to the largest fractional
    parts (ties to the earlier tensor in `shapes`). No tensor gets more than its size or its `upper` bound (the
    survivors it has now: a pruning step only removes); a count the bound cuts is made up by the next-largest
    remainders."""
    numel = {n: math.prod(int(s) for s in shape) for n, shape in shapes.items()}
    cap = {n: min(numel[n], int(upper[n])) if upper is not None else numel[n] for n in shapes}
    size = sum(numel.values())
    total = int(total)
    if not 0 <= total <= sum(cap.values()):
        raise ValueError(f"cannot keep {total} weights in tensors that hold {sum(cap.values())} (of {size})")
    if not shapes:
        return {}
    dens = distribution(name, shapes, total / size, power=power)
    want = {n: dens[n] * numel[n] for n in shapes}
    out = {n: min(cap[n], math.floor(want[n])) for n in shapes}
    order = {n: i for i, n in enumerate(shapes)}
    left = total - sum(out.values())
    while left != 0:  # usually one pass: `left` < number of tensors
        step = 1 if left > 0 else -1
        if step > 0:
            room = [n for n in shapes if out[n] < cap[n]]
            room.sort(key=lambda n: (-(want[n] - out[n]), order[n]))
        else:  # the real counts summed above total (float error): take back from the smallest remainders
            room = [n for n in shapes if out[n] > 0]
            room.sort(key=lambda n: (want[n] - out[n], order[n]))
        for n in room[: abs(left)]:
            out[n] += step
        left = total - sum(out.values())
    return out


def survivor_counts(name: str, shapes: Shapes, density: float, *, power: float = 1.0) -> dict[str, int]:
    """Integer survivors per tensor at global `density`: `allocate` with total = round_half_up(density * all
    weights), the count global pruning to that density keeps."""
    if not 0 <= density <= 1:
        raise ValueError(f"a density is a fraction in [0, 1], got {density}")
    size = sum(math.prod(int(s) for s in shape) for shape in shapes.values())
    return allocate(name, shapes, round_half_up(density * size), power=power)
