"""What an export starts from: a ticket (file, packed file, or a run folder's level) and the level's trained weights.

A run folder keeps the trained weights of a level's ticket in `levels/level_<L>/final.pt`; the branches' units keep
theirs only when their analysis needs them, and then with masks of their own, so only the ticket (branch `ticket`)
is exported from a run folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lottery import masks as M
from lottery.core.files import load_torch
from lottery.experiment.ticket import Ticket, check_fits, load_ticket

BRANCHES = ("ticket",)


@dataclass
class Source:
    ticket: Ticket
    trained_state: dict | None  # the level's trained weights (masks applied), None if the source lacks them
    where: str  # for messages and the table: the file or run folder + level

    @property
    def model_name(self) -> str:
        return (self.ticket.config.get("model") or {}).get("name", "?")

    def dataset_node(self) -> dict:
        return dict(self.ticket.config.get("dataset") or {})

    def build(self) -> nn.Module:
        """The ticket's model, uninitialized (every weight is loaded afterwards)."""
        from lottery.data import dataset_settings
        from lottery.models import build_model

        entry, _, own = dataset_settings(self.dataset_node())
        kwargs = dict(self.ticket.config.get("model") or {})
        name = kwargs.pop("name")
        return build_model(name, entry.shape(own), entry.num_classes, **kwargs)

    def input_shape(self) -> tuple[int, int, int]:
        from lottery.data import dataset_settings

        entry, _, own = dataset_settings(self.dataset_node())
        return entry.shape(own)

    def masked(self, which: str = "trained") -> nn.Module:
        """The masked network in eval mode: the trained weights (`trained`) or the rewind weights (`rewind`)."""
        model = self.build()
        state = self.trained_state if which == "trained" else self.ticket.rewind_state
        if state is None:
            raise ValueError(
                f"{self.where} holds no trained weights; export a run folder's level, or a packed ticket "
                f"written with them"
            )
        check_fits(self.ticket, model.state_dict(), self.model_name)
        model.load_state_dict(state)
        M.apply(model, M.from_bool(self.ticket.masks, model))
        return model.eval()

    def dense_like(self) -> nn.Module:
        """A dense network of the same architecture (the rewind weights, unmasked) for the size and speed baseline."""
        model = self.build()
        state = {k: v.clone() for k, v in self.ticket.rewind_state.items()}
        for name in self.ticket.masks:
            state[name] = torch.where(state[name] == 0, torch.full_like(state[name], 1e-3), state[name])
        model.load_state_dict(state)
        return model.eval()


def resolve(path, level: int | None = None, replicate: int | None = None, branch: str = "ticket") -> Source:
    """The Source at `path`: a ticket file (ticket.pt or a packed ticket), or a run folder with `level` (a replicas
    run's parent folder with `replicate`). One-line ValueErrors name the bad value and the accepted ones."""
    path = Path(path).expanduser()
    if branch not in BRANCHES:
        raise ValueError(
            f"--branch {branch!r} cannot be exported: only the level's ticket keeps its masks and trained "
            f"weights in a run folder; accepted: {', '.join(BRANCHES)}"
        )
    if path.is_file():
        if level is not None or replicate is not None:
            raise ValueError(
                f"--level/--replicate select a level of a run folder; {path} is a ticket file (it is one level already)"
            )
        ticket = load_ticket(path)
        trained = getattr(ticket, "trained_state", None)
        final = path.parent / "final.pt"
        if trained is None and path.name == "ticket.pt" and final.is_file():
            trained = load_torch(final)
        return Source(ticket, trained, str(path))
    if not path.is_dir():
        raise FileNotFoundError(f"no ticket file or run folder at {path.resolve()}")
    replicas = path / "replicas.json"
    if replicas.is_file():
        folders = json.loads(replicas.read_text())["folders"]
        seeds = [int(f.rsplit("_", 1)[1]) for f in folders]
        if replicate is None or replicate not in seeds:
            got = "none given" if replicate is None else f"got --replicate {replicate}"
            raise ValueError(
                f"{path} is a replicas run: name one replicate ({got}); accepted: --replicate "
                f"{', '.join(map(str, seeds))}"
            )
        path = path / f"replicate_{replicate}"
    elif replicate is not None:
        raise ValueError(f"--replicate {replicate}: {path} is a single run (no replicas.json); leave --replicate out")
    levels = sorted(int(p.parent.name.split("_")[1]) for p in path.glob("levels/level_*/ticket.pt"))
    if not levels:
        raise FileNotFoundError(
            f"no tickets in {path} (no levels/level_<L>/ticket.pt): not a run folder, or no level finished yet"
        )
    if level is None or level not in levels:
        got = "none given" if level is None else f"got --level {level}"
        raise ValueError(f"name the level to export ({got}); accepted: --level {', '.join(map(str, levels))}")
    level_dir = path / "levels" / f"level_{level}"
    ticket = load_ticket(level_dir / "ticket.pt")
    final = level_dir / "final.pt"
    return Source(ticket, load_torch(final) if final.is_file() else None, f"{path} level {level}")
