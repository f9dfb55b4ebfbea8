"""The ticket file: everything needed to retrain a level's subnetwork in isolation.

`levels/level_<L>/ticket.pt` is a `torch.save`d dict (load it with `load_ticket`):

| key | contents |
|---|---|
| `format` | `"lottery-ticket"`; `version`: 1 |
| `level` | pruning level L (0 = dense) |
| `masks` | {parameter name: bool tensor}, True = kept |
| `rewind_step` | step of the rewind point the weights come from (0 = initialization) |
| `rewind_state` | full `state_dict` at the rewind point (weights, biases, BatchNorm statistics), masks applied |
| `config` | the run's resolved config (model, dataset, init, optimizer, train, pruning, seed, ...) as plain dicts |
| `weights_remaining`, `params_remaining` | fractions of prunable weights / of all parameters that survive |
| `metrics` | the level's ticket results once trained (same keys as a `summary.json` record), else None |
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from lottery import masks as M
from lottery.checkpoint import load_torch, save_torch

FORMAT = "lottery-ticket"
VERSION = 1


@dataclass
class Ticket:
    level: int
    masks: dict[str, torch.Tensor]
    rewind_step: int
    rewind_state: dict[str, torch.Tensor]
    config: dict
    weights_remaining: float
    params_remaining: float
    metrics: Optional[dict] = None


def save_ticket(path: Path, ticket: Ticket) -> None:
    save_torch({"format": FORMAT, "version": VERSION, **ticket.__dict__}, path)


def load_ticket(path) -> Ticket:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ticket file at {path.resolve()}; tickets live in <run>/levels/level_<L>/ticket.pt")
    data = load_torch(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lottery ticket file")
    if data["version"] > VERSION:
        raise ValueError(f"{path} has ticket format version {data['version']}; this lottery reads up to {VERSION}")
    fields = {k: data[k] for k in Ticket.__dataclass_fields__ if k in data}
    return Ticket(**fields)


def load_into(model: nn.Module, ticket: Ticket) -> M.Masks:
    """Load the ticket's rewind weights into `model` and return its masks on the model's device (masks applied)."""
    model.load_state_dict(ticket.rewind_state)
    masks = M.from_bool(ticket.masks, model)
    M.apply(model, masks)
    return masks
