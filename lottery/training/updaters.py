"""Mask updaters: everything that changes masks during training, behind one protocol the loop calls.

The loop (lottery.training.loop) trains with fixed masks unless a mask updater is configured (the `dst` config node:
`name` plus the updater's settings). It then calls the updater at fixed points, and names no method:

- `begin(step)`: before the first step of a fresh run (not on resume; the masks are the unit's starting masks);
- `after_backward(step, optimizer, active)`: the gradient of the step's batch is in `.grad`; returning
  `skip=True` takes no optimizer step (RigL updates its masks from that gradient instead);
- `after_step(step, optimizer, active)`: after the optimizer step (SET and gradual pruning change masks here);
- `at_eval(step, records)`: after each evaluation, with the records of the networks evaluated;
- `finished(u)`: whether network `u` is done training (an early-bird ticket was drawn);
- `state_dict(u)` / `load_state_dict(u, state)`: what the checkpoint holds for network `u` (its masks, counters,
  history), so a killed run resumes bit-identically; the loop only stores and hands back the dict;
- `result(u)`: keys added to network `u`'s training result (`mask_changes`, the layer densities from the start and
  after each mask update, from which lottery.experiment.records counts the training cost span by span, and
  `gradient_steps`, the steps that computed a dense weight gradient instead of an update).

`step` is 1-based where a step was taken (after `step` optimizer steps). Every hook that changes masks returns the
indices of the layout's mask tensors it changed (`Layer.entry`); the loop re-applies them. An updater sees each
network's masked tensors as `Layer` views (one network's slice of a stacked tensor, or its own tensor when
interleaved), so the same code serves one network and replicas in either layout.

A new method is one module with a `@register_updater("name")` subclass of `MaskUpdater` (its settings a dataclass
in `Settings`) and one YAML file in conf/dst/. Built-ins: lottery.training.dst (set, rigl), lottery.training.gmp.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lottery.core.registry import Registry, check_settings, plain


@dataclass
class NoSettings:
    pass


@dataclass
class Layer:
    """One masked tensor of one network: views into the layout's parameter and mask (edited in place)."""

    entry: int  # index of the layout's mask tensor: what a hook returns when it changed this mask
    index: int  # position among the network's masked tensors (the same for every network and layout)
    name: str  # the parameter's name in the network (its key in the network's masks)
    param: torch.Tensor
    stacked_mask: torch.Tensor
    slot: int | None  # the network's index into a stacked tensor's first dimension, or None (its own tensor)

    def _view(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.slot is None else t[self.slot]

    @property
    def weight(self) -> torch.Tensor:
        return self._view(self.param.data)

    @property
    def mask(self) -> torch.Tensor:
        return self._view(self.stacked_mask)

    @property
    def grad(self) -> torch.Tensor | None:
        return None if self.param.grad is None else self._view(self.param.grad)

    def optimizer_slots(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        """The optimizer's per-weight state of this tensor (momentum, Adam's moments), as views."""
        state = optimizer.state.get(self.param, {})
        return [self._view(v) for v in state.values() if torch.is_tensor(v) and v.shape == self.param.shape]


@dataclass
class Context:
    """What a training call tells its updater: the training length, where this call starts and ends, each network's
    seed for its mask updates, and each network's masked tensors."""

    total_steps: int
    start: int
    end: int
    seeds: list[int]
    layers: list[list[Layer]]  # per network, in the order of its masks
    # per network, its module: for its structure only (which BatchNorm follows which layer, ...); a stacked layout
    # trains copies of its tensors, so values come from `layers` or `parameters`
    models: list[nn.Module] = field(default_factory=list)
    # network u -> its current parameters as the single model names them (views into what trains; read-only use)
    parameters: Callable[[int], dict[str, torch.Tensor]] | None = None


class MaskUpdater:
    """The base class of every mask updater: the hooks do nothing, the state is the masks and the history of
    densities. Subclasses override the hooks they need and call `record(u, step)` after each mask update."""

    Settings: type = NoSettings
    name: str  # set by register_updater
    # True: the masks a unit is handed are where this updater ends (their counts are its target); the network starts
    # with every weight (the experiment does not zero the pruned ones first) and `begin` sets the masks it starts from
    dense_start = False
    # the pruning.granularity values whose masks the updater keeps (checked before any work)
    granularities: tuple[str, ...] = ("unstructured",)
    granularity_note = "grows and drops single weights"  # why the others are refused

    @classmethod
    def check_fit(cls, settings: dict, total_steps: int) -> None:
        """Refuse (ValueError, one line) settings that cannot take effect in a training of `total_steps` steps: called
        before any work, so a run never trains without the mask updates it asked for."""

    def __init__(self, settings: dict, ctx: Context):
        self.settings, self.ctx = settings, ctx
        self.n = len(ctx.layers)
        self.mask_changes: list[list] = [[[ctx.start, self.densities(u)]] for u in range(self.n)]
        self.gradient_steps: list[list[int]] = [[] for _ in range(self.n)]

    # --- the hooks -------------------------------------------------------------------------------------------------
    def begin(self, step: int) -> list[int]:
        return []

    def after_backward(self, step: int, optimizer: torch.optim.Optimizer, active: list[bool]) -> tuple[list[int], bool]:
        return [], False

    def after_step(self, step: int, optimizer: torch.optim.Optimizer, active: list[bool]) -> list[int]:
        return []

    def at_eval(self, step: int, records: dict[int, dict]) -> list[int]:
        return []

    def finished(self, u: int) -> bool:
        return False

    def counts_final_from(self, u: int) -> int:
        """The step from which network `u` has its final weight counts: the last mask update that changed a layer's
        count (drop-and-grow keeps them; gradual pruning does not). The early stop is chosen among the evaluations
        from there, since an evaluation of a denser network is not one of the ticket's."""
        changes = self.mask_changes[u]
        step = changes[0][0]
        for (_, before), (at, after) in itertools.pairwise(changes):
            if after != before:
                step = at
        return step

    # --- state -----------------------------------------------------------------------------------------------------
    def state_dict(self, u: int) -> dict:
        return {
            "name": self.name,
            "masks": {layer.name: layer.mask.detach().to("cpu", torch.bool) for layer in self.ctx.layers[u]},
            "mask_changes": self.mask_changes[u],
            "gradient_steps": self.gradient_steps[u],
        }

    def load_state_dict(self, u: int, state: dict) -> list[int]:
        """Restore network `u`'s state; returns the mask tensors changed."""
        changed = []
        for layer in self.ctx.layers[u]:
            saved = state["masks"][layer.name]
            layer.mask.copy_(saved.to(device=layer.mask.device, dtype=layer.mask.dtype))
            changed.append(layer.entry)
        self.mask_changes[u] = list(state.get("mask_changes") or self.mask_changes[u])
        self.gradient_steps[u] = list(state.get("gradient_steps") or [])
        return changed

    def result(self, u: int) -> dict:
        return {"mask_changes": self.mask_changes[u], "gradient_steps": self.gradient_steps[u]}

    # --- helpers ---------------------------------------------------------------------------------------------------
    def densities(self, u: int) -> dict[str, float]:
        return {layer.name: int(layer.mask.count_nonzero()) / layer.mask.numel() for layer in self.ctx.layers[u]}

    def record(self, u: int, step: int) -> None:
        """Network `u`'s masks changed at `step`: its training cost from here is at its new densities."""
        self.mask_changes[u].append([step, self.densities(u)])


UPDATERS = Registry("mask updater (dst)")


def register_updater(name: str):
    """`@register_updater("mine")` on a `MaskUpdater` subclass; `dst=mine` (or `dst.name=mine`) selects it."""

    def decorator(cls):
        if not (isinstance(cls, type) and issubclass(cls, MaskUpdater)):
            raise TypeError(f"mask updater '{name}' must be a subclass of lottery.training.updaters.MaskUpdater")
        cls.name = name
        UPDATERS.add(name, cls)
        return cls

    return decorator


def updater_settings(node) -> tuple[type[MaskUpdater] | None, dict]:
    """(the updater class, its checked settings) of a `dst` config node; (None, {}) for `name: none`."""
    raw = plain(node)
    name = raw.pop("name", "none")
    if name in (None, "none"):
        return None, {}
    cls = UPDATERS.lookup(name, extra=", none")
    return cls, check_settings(raw, cls.Settings, "dst", of=f"mask updater '{name}'")


def starts_dense(node) -> bool:
    """Whether the updater of a `dst` config node trains its units from their dense weights (`dense_start`)."""
    cls, _ = updater_settings(node)
    return cls is not None and cls.dense_start


def make_layers(mask_slices: list[tuple], n: int) -> list[list[Layer]]:
    """Per network its `Layer`s from a layout's `mask_slices` ((parameter, mask, [(network, slot, name)]) per
    tensor)."""
    layers: list[list[Layer]] = [[] for _ in range(n)]
    for entry, (param, mask, slices) in enumerate(mask_slices):
        for u, slot, name in slices:
            layers[u].append(Layer(entry, len(layers[u]), name, param, mask, slot))
    return layers


def checkpoint_state(name: str, resume: dict) -> dict:
    """The updater's state in a checkpoint: under `updater` (with the name of the updater that wrote it), or the
    top-level `masks`, `mask_changes`, `gradient_steps` of checkpoints written before updaters (SET and RigL, whose
    state is exactly that). A checkpoint without either is refused: it was written without mask updates."""
    state = resume.get("updater")
    if state is not None:
        if state.get("name") != name:
            raise ValueError(
                f"the checkpoint at step {resume['step']} was written by mask updater "
                f"'{state.get('name')}', this run uses '{name}'; resume with dst={state.get('name')} "
                "or start a new run folder"
            )
        return state
    if "masks" in resume and "mask_changes" in resume:  # written before mask updaters (dst set or rigl)
        if name not in ("set", "rigl"):
            raise ValueError(
                f"the checkpoint at step {resume['step']} was written by dynamic sparse training before "
                f"mask updaters (dst set or rigl), this run uses dst={name}; start a new run folder"
            )
        return {
            "name": name,
            "masks": resume["masks"],
            "mask_changes": resume["mask_changes"],
            "gradient_steps": resume.get("gradient_steps") or [],
        }
    raise ValueError(
        f"the checkpoint at step {resume['step']} holds no mask-updater state (it was written by a run "
        f"without dst), this run uses dst={name}; resume with dst=none or start a new run folder"
    )
