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

The file holds only tensors and plain containers (dicts, lists, strings, numbers, None), and `load_ticket` reads it
with `torch.load(weights_only=True)` (so do checkpoints, `init.pt`, `rewind.pt`, `final.pt`): loading a ticket someone
sent you cannot run code. A truncated or corrupt file, or one holding other Python objects, is refused with a
`ValueError` naming the file; so is a ticket whose weights do not fit the model it is loaded into (another model,
width or dataset), naming both models and the first layer shapes that differ.

`load_ticket` also reads a packed ticket (lottery.experiment.packed, written by `lottery-export`): masks bit-packed
and only the kept values stored; it loads back to the same Ticket (bitwise in fp32), with the level's trained weights
as `ticket.trained_state` where the packed file holds them.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from lottery import masks as M
from lottery.core.files import Damaged, load_torch, save_torch, verify
from lottery.core.registry import as_dict
from lottery.experiment import packed

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
    metrics: dict | None = None


def save_ticket(path: Path, ticket: Ticket) -> None:
    save_torch(
        {"format": FORMAT, "version": VERSION, **{f.name: getattr(ticket, f.name) for f in fields(Ticket)}}, path
    )


def load_ticket(path) -> Ticket:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ticket file at {path.resolve()}; tickets live in <run>/levels/level_<L>/ticket.pt")
    verify(path)  # bytes that differ from those recorded when it was written: Damaged, naming the remedy
    try:
        data = load_torch(path)
    except Damaged as damaged:  # unreadable: say it as a ticket someone sent, with what torch said
        e = damaged.__cause__ or damaged
        raise ValueError(
            f"ticket file {path} is unreadable (truncated or corrupt, {path.stat().st_size} bytes: "
            f"{_first_line(e)}); copy it again from its run folder"
        ) from None
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:
            raise ValueError(
                f"ticket file {path} holds Python objects other than tensors and plain containers "
                f"({found.group(1)}); lottery did not write it, and loads files with weights_only=True "
                f"so that a file cannot run code"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        raise ValueError(
            f"ticket file {path} is unreadable (corrupt: "
            f"{detail.group(1).strip() if detail else _first_line(e)}); copy it again from its run "
            f"folder"
        ) from None
    except Exception as e:  # noqa: BLE001 - garbage makes the unpickler fail in any way (IndexError, EOFError, ...)
        raise ValueError(
            f"ticket file {path} is unreadable (truncated or corrupt, {path.stat().st_size} bytes: "
            f"{_first_line(e)}); copy it again from its run folder"
        ) from None
    if packed.is_packed(data):
        return _from_packed(data, path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a lottery ticket file (no format: {FORMAT!r} key); tickets are the "
            f"levels/level_<L>/ticket.pt files of a run"
        )
    if data.get("version", VERSION + 1) > VERSION:
        raise ValueError(f"{path} has ticket format version {data.get('version')}; this lottery reads up to {VERSION}")
    missing = [f.name for f in fields(Ticket) if f.default is not None and f.name not in data]
    if missing:
        raise ValueError(f"ticket file {path} lacks {', '.join(missing)}; it is damaged or not a lottery ticket")
    step = data["rewind_step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(
            f"ticket file {path} has rewind_step={step!r}; accepted: an integer >= 0 (the step its "
            f"weights come from); it is damaged or not written by lottery"
        )
    if not isinstance(data["masks"], dict) or not data["masks"]:
        raise ValueError(f"ticket file {path} holds no masks; it is damaged or not a lottery ticket")
    ticket = Ticket(**{f.name: data[f.name] for f in fields(Ticket) if f.name in data})
    ticket.source = str(path)  # type: ignore[attr-defined]  # for messages; not a field, so never saved
    return ticket


def _from_packed(data: dict, path: Path) -> Ticket:
    """A packed ticket (lottery.experiment.packed) as a Ticket, its trained weights (if it holds them) as the
    attribute `trained_state`."""
    masks, rewind, trained = packed.unpack(data, str(path))
    missing = [k for k in ("level", "rewind_step", "config", "weights_remaining", "params_remaining") if k not in data]
    if missing:
        raise ValueError(f"packed ticket file {path} lacks {', '.join(missing)}; it is damaged")
    ticket = Ticket(
        level=data["level"],
        masks=masks,
        rewind_step=data["rewind_step"],
        rewind_state=rewind,
        config=data["config"],
        weights_remaining=data["weights_remaining"],
        params_remaining=data["params_remaining"],
        metrics=data.get("metrics"),
    )
    ticket.source = str(path)  # type: ignore[attr-defined]  # for messages; not a field, so never saved
    ticket.trained_state = trained  # type: ignore[attr-defined]  # not a field: a ticket file does not hold it
    return ticket


def _first_line(e: BaseException) -> str:
    """The first sentence of an error message (torch's go on for a paragraph)."""
    text = str(e).strip()
    return text.splitlines()[0].split(". ")[0][:200] if text else type(e).__name__


def _shape(t) -> str:
    return "x".join(map(str, t.shape)) if t.dim() else "scalar"


def _data_desc(dataset) -> str | None:
    """`mnist`, `cifar10`, `synthetic 3x32x32`: the dataset and, where it varies with its settings, its input shape."""
    from lottery.data import DATASETS, dataset_settings

    if not dataset or not dataset.get("name"):
        return None
    entry = DATASETS.get(dataset["name"])
    if entry is None or not callable(entry.input_shape):
        return dataset["name"]
    try:
        _, _, own = dataset_settings({k: v for k, v in dataset.items() if k != "verify"})
    except ValueError:
        return dataset["name"]
    return f"{dataset['name']} {'x'.join(map(str, entry.shape(own)))}"


def _made_for(ticket: Ticket) -> str:
    cfg = ticket.config or {}
    model = (cfg.get("model") or {}).get("name", "an unknown model")
    data = _data_desc(cfg.get("dataset"))
    return f"{model}" + (f" on {data}" if data else "")


def check_fits(ticket: Ticket, state: dict, model_name: str, where: str | None = None) -> None:
    """Raise a one-line ValueError unless the ticket's weights have exactly the tensors and shapes of `state` (the
    state_dict of the model it is about to be loaded into, on any device, `meta` included)."""
    theirs = ticket.rewind_state
    differ = {
        n
        for n in set(theirs) | set(state)
        if n not in theirs or n not in state or tuple(theirs[n].shape) != tuple(state[n].shape)
    }
    differ |= {n for n, m in ticket.masks.items() if n not in state or tuple(m.shape) != tuple(state[n].shape)}
    if not differ:
        return

    def layers(tensors: dict) -> str:
        names = [n for n in tensors if n in differ]
        shown = [n for n in names if tensors[n].dim() >= 2] or names  # weight matrices and kernels say it best
        text = ", ".join(f"{n} {_shape(tensors[n])}" for n in shown[:3])
        rest = len(names) - len(shown[:3])
        return (text + (f" and {rest} more tensors" if rest else "")) or "none of these tensors"

    source = getattr(ticket, "source", None) or "the ticket"
    here = f"{model_name}{f' on {where}' if where else ''}"
    raise ValueError(
        f"ticket {source} was made for model {_made_for(ticket)} with layers {layers(theirs)}, not for "
        f"{here} with layers {layers(state)}; drop the model/dataset overrides, or use a ticket made for "
        f"{model_name}"
    )


def check_fits_config(ticket: Ticket, cfg) -> None:
    """`check_fits` against the model `cfg` describes, built on the `meta` device (no memory, no data loaded), so a
    mismatched ticket is refused before anything is written. `cfg` is a checked config (lottery.experiment.check)."""
    from omegaconf import OmegaConf

    from lottery.data import dataset_settings
    from lottery.models import build_model

    entry, _, own = dataset_settings(cfg.dataset)
    kwargs = as_dict(cfg.model, resolve=True)
    name = kwargs.pop("name")
    source = getattr(ticket, "source", None) or "the ticket"
    made_on = ((ticket.config or {}).get("dataset") or {}).get("name")
    if made_on and made_on != entry.name:
        raise ValueError(
            f"ticket {source} was made on dataset {made_on}, not {entry.name}; a ticket is retrained on "
            f"its own dataset: drop the dataset override (dataset={entry.name})"
        )
    with torch.device("meta"):
        model = build_model(name, entry.shape(own), entry.num_classes, **kwargs)
    state = model.state_dict()
    check_fits(ticket, state, name, _data_desc(OmegaConf.to_container(cfg.dataset, resolve=True)))
    expected = [p.name for p in M.prunable_tensors(model, cfg.pruning)]
    missing = [n for n in expected if n not in ticket.masks]
    if missing:
        raise ValueError(
            f"ticket {source} has masks for {len(expected) - len(missing)} of the {len(expected)} pruned "
            f"tensors of {name} (none for {', '.join(missing)}); it is damaged or was cut: copy it "
            f"again from its run folder"
        )


def load_into(model: nn.Module, ticket: Ticket, model_name: str | None = None) -> M.Masks:
    """Load the ticket's rewind weights into `model` and return its masks on the model's device (masks applied)."""
    check_fits(ticket, model.state_dict(), model_name or type(model).__name__)
    model.load_state_dict(ticket.rewind_state)
    masks = M.from_bool(ticket.masks, model)
    M.apply(model, masks)
    return masks


# Config nodes of registered things with settings of their own: a ticket's node replaces the composed one whole.
_OWN_NODES = ("dataset", "optimizer", "pruning.criterion")


def retrain_config(cfg, ticket_config: dict, overridden: list[str]):
    """The config of `lottery-retrain`: the ticket's own run config, with the keys the user overrode on the command
    line (`overridden`) taken from `cfg`. Keys a ticket written by an older version holds that its dataset or
    optimizer no longer takes (settings of another optimizer, say) are dropped."""
    from omegaconf import DictConfig, OmegaConf

    base = OmegaConf.create(as_dict(cfg))
    OmegaConf.set_struct(base, False)  # the ticket's nodes may hold keys the composed config's do not
    merged = OmegaConf.merge(base, ticket_config)
    assert isinstance(merged, DictConfig)  # a mapping merged into a mapping
    base = merged
    for node in _OWN_NODES:
        value = OmegaConf.select(OmegaConf.create(ticket_config), node)
        if value is not None:
            OmegaConf.update(base, node, _known_keys(node, as_dict(value)), merge=False)
    for key in overridden:
        OmegaConf.update(base, key, OmegaConf.select(cfg, key), merge=False)
    return base


def _known_keys(node: str, values: dict) -> dict:
    import dataclasses

    from lottery.data import DATASETS
    from lottery.data.registry import COMMON as DATA_COMMON
    from lottery.training.optimizers import COMMON as OPT_COMMON, OPTIMIZERS

    registry, common = {"dataset": (DATASETS, DATA_COMMON), "optimizer": (OPTIMIZERS, OPT_COMMON)}.get(node, (None, ()))
    entry = registry.get(values.get("name")) if registry is not None else None
    if entry is None:
        return values
    own = [f.name for f in dataclasses.fields(entry.settings)] if entry.settings else []
    return {k: v for k, v in values.items() if k in common or k in own}
