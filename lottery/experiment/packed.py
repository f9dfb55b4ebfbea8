"""The packed ticket: a ticket in about (weights)/8 + 4 x (kept values) bytes, for sending and keeping.

A ticket file (lottery.experiment.ticket) holds its masks as one bool byte per weight and its rewind weights dense, so
it is larger than the dense network. The packed form holds

| key | contents |
|---|---|
| `format` | `"lottery-packed-ticket"`; `version`: 1 |
| `level`, `rewind_step`, `seed`, `config`, `metrics` | as in a ticket (`seed`: the run's) |
| `weights_remaining`, `params_remaining` | as in a ticket |
| `dtype` | `"float32"` (bitwise the ticket's weights) or `"float16"` (within half precision) |
| `layout` | per state_dict tensor, in order: [name, shape, kind(, dtype)] (see below) |
| `bits` | every mask flattened, concatenated in `layout` order, packed 8 per byte (numpy.packbits, big-endian) |
| `rewind` | kept values of the `masked` tensors, all values of the `dense` ones: one flat tensor in `layout` order |
| `trained` | the same for the level's trained weights (final.pt), or None |
| `others` | the `other` tensors of the rewind state as one flat int64 tensor in `layout` order |
| `trained_others` | the same of the trained state, or None |

Kinds: `masked` (a tensor with a mask: only its kept values stored), `dense` (every value stored: biases, BatchNorm),
`other` (a non-float buffer, BatchNorm's num_batches_tracked: its dtype is the layout entry's fourth item).

One flat tensor per state rather than one per layer keeps the file's per-tensor overhead (torch.save's zip entries)
to a constant: the header is a few KB whatever the depth. Pruned weights are exactly +0.0 in a ticket (masks.apply
clears their bits), so filling them back with zeros restores the fp32 ticket bitwise. `load_ticket` reads both
forms, so `lottery-retrain ticket=packed.pt` works like a ticket file.
"""

from __future__ import annotations

import numpy as np
import torch

FORMAT = "lottery-packed-ticket"
VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def pack(ticket, trained_state: dict | None = None, dtype: str = "float32") -> dict:
    """The packed form (plain data for save_torch) of `ticket` and, if given, the level's trained `trained_state`."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown packed dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
    state = ticket.rewind_state
    layout, bits = [], []
    for name, t in state.items():
        if not torch.is_floating_point(t):
            layout.append([name, list(t.shape), "other", str(t.dtype).removeprefix("torch.")])
            continue
        elif name in ticket.masks:
            kind = "masked"
            bits.append(ticket.masks[name].detach().to("cpu", torch.bool).flatten())
        else:
            kind = "dense"
        layout.append([name, list(t.shape), kind])
    packed_bits = np.packbits(torch.cat(bits).numpy()) if bits else np.zeros(0, np.uint8)
    out = {
        "format": FORMAT,
        "version": VERSION,
        "level": ticket.level,
        "rewind_step": ticket.rewind_step,
        "seed": (ticket.config or {}).get("seed"),
        "config": ticket.config,
        "weights_remaining": ticket.weights_remaining,
        "params_remaining": ticket.params_remaining,
        "metrics": ticket.metrics,
        "dtype": dtype,
        "layout": layout,
        "bits": torch.from_numpy(packed_bits),
        "rewind": _values(state, ticket.masks, layout, DTYPES[dtype]),
        "others": _others(state, layout),
        "trained": None,
        "trained_others": None,
    }
    if trained_state is not None:
        missing = sorted(set(state) ^ set(trained_state))
        if missing:
            raise ValueError(f"the trained weights do not match the ticket's tensors (differ in {missing[:3]})")
        out["trained"] = _values(trained_state, ticket.masks, layout, DTYPES[dtype])
        out["trained_others"] = _others(trained_state, layout)
    return out


def _others(state: dict, layout: list) -> torch.Tensor:
    parts = [state[e[0]].detach().cpu().flatten().to(torch.int64) for e in layout if e[2] == "other"]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def _values(state: dict, masks: dict, layout: list, dtype: torch.dtype) -> torch.Tensor:
    parts = []
    for name, _, kind, *_ in layout:
        t = state[name].detach().to("cpu")
        if kind == "masked":
            parts.append(t.flatten()[masks[name].detach().to("cpu", torch.bool).flatten()])
        elif kind == "dense":
            parts.append(t.flatten())
    return torch.cat(parts).to(dtype) if parts else torch.zeros(0, dtype=dtype)


def is_packed(data) -> bool:
    return isinstance(data, dict) and data.get("format") == FORMAT


def unpack(data: dict, source: str = "the packed ticket") -> tuple[dict, dict, dict | None]:
    """(masks {name: bool}, rewind state, trained state or None), every float tensor in fp32."""
    if data.get("version", VERSION + 1) > VERSION:
        raise ValueError(
            f"{source} has packed ticket format version {data.get('version')}; this lottery reads up to {VERSION}"
        )
    try:
        layout = [(str(e[0]), tuple(int(s) for s in e[1]), str(e[2]), *e[3:]) for e in data["layout"]]
        n_bits = sum(_numel(e[1]) for e in layout if e[2] == "masked")
        flat = torch.from_numpy(np.unpackbits(data["bits"].numpy(), count=n_bits).astype(bool))
        masks, at = {}, 0
        for name, shape, kind, *_ in layout:
            if kind == "masked":
                masks[name] = flat[at : at + _numel(shape)].reshape(shape)
                at += _numel(shape)
        rewind = _state(data["rewind"], data["others"], layout, masks)
        trained = (
            _state(data["trained"], data["trained_others"], layout, masks) if data.get("trained") is not None else None
        )
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{source} is a damaged packed ticket ({type(e).__name__}: {str(e)[:120]})") from None
    return masks, rewind, trained


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _state(values: torch.Tensor, others: torch.Tensor, layout: list, masks: dict) -> dict:
    values = values.to(torch.float32)
    state, at, at_other = {}, 0, 0
    for name, shape, kind, *dtype in layout:
        if kind == "other":
            n = _numel(shape)
            to = getattr(torch, str(dtype[0]), None)
            if not isinstance(to, torch.dtype):
                raise ValueError(f"unknown dtype {dtype[0]!r} of {name}")
            state[name] = others[at_other : at_other + n].reshape(shape).to(to).clone()
            at_other += n
        elif kind == "masked":
            keep = masks[name]
            n = int(keep.sum())
            t = torch.zeros(shape, dtype=torch.float32)
            t[keep] = values[at : at + n]
            state[name] = t
            at += n
        else:
            n = _numel(shape)
            state[name] = values[at : at + n].reshape(shape).clone()
            at += n
    if at != values.numel():
        raise ValueError(f"{values.numel()} stored values for {at} kept entries")
    return state


def size_bound(data: dict, header: int = 16384) -> int:
    """The bytes a packed file may take: one bit per masked weight, its stored values at their width, the non-float
    buffers, and `header` bytes for the zip entries, the layout and the config."""
    width = torch.finfo(DTYPES[data["dtype"]]).bits // 8
    n_values = data["rewind"].numel() + (data["trained"].numel() if data.get("trained") is not None else 0)
    n_bits = sum(_numel(e[1]) for e in data["layout"] if e[2] == "masked")
    others = sum(t.numel() * t.element_size() for t in (data["others"], data.get("trained_others")) if t is not None)
    return (n_bits + 7) // 8 + width * n_values + others + header
