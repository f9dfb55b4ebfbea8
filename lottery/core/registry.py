"""Registries of named things (models, datasets, initializers, optimizers, criteria, branches) and the one check of
a registered thing's settings.

Every config group that names a registered thing (`model.name`, `dataset.name`, `optimizer.name`, ...) is looked up
here, so an unknown name always fails the same way: one line naming it and the accepted names. A thing's settings are
the keys beside `name` in its config node; they are checked against its settings dataclass (unknown keys, types, and
the values its `__post_init__` refuses) or, without one, against its function's keyword parameters.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lottery.core.ranges import check_fields, check_value


class Registry(dict):
    """{name: entry} for one kind of thing; a name can be registered once."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind  # in messages: "unknown <kind> 'x'; accepted: ..."

    def add(self, name: str, entry: Any) -> Any:
        if name in self:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self[name] = entry
        return entry

    def lookup(self, name: Any, extra: str = "") -> Any:
        """The entry named `name`, or a ValueError naming it and the accepted names."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} '{name}'; accepted: {', '.join(sorted(self))}{extra}")
        return self[name]


def as_dict(node: Any, resolve: bool = False) -> dict:
    """OmegaConf.to_container of a mapping node (a DictConfig), typed as the dict it is."""
    from omegaconf import OmegaConf

    out = OmegaConf.to_container(node, resolve=resolve)
    assert isinstance(out, dict), f"a mapping node, not {type(out).__name__}"
    return out


def plain(node: Any) -> dict:
    """A config node (DictConfig, a typed config's Node, dict or None) as a plain dict, interpolations resolved."""
    from omegaconf import OmegaConf

    if node is None:
        return {}
    if OmegaConf.is_config(node):
        return as_dict(node, resolve=True)
    return {k: plain(v) if isinstance(v, Mapping) else v for k, v in node.items()}  # a typed config's Node: dicts


def check_settings(
    raw: Mapping,
    settings: type | None,
    where: str,
    *,
    of: str = "",
    fn: Callable | None = None,
    skip: Iterable[str] = (),
    defaults: bool = True,
) -> dict:
    """`raw` (a thing's keys, without `name`) checked and typed: against the dataclass `settings`, or else against
    the keyword parameters of `fn` (minus `skip`). `where` names the node in messages (e.g. `pruning.criterion` or
    `branch.lmc`), `of` the thing (e.g. "pruning criterion 'snip'"). Returns plain values, with the dataclass's
    defaults filled in when `defaults`."""
    of_text = f" for {of}" if of else ""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    raw = dict(raw)
    if settings is not None:
        accepted = [f.name for f in dataclasses.fields(settings)]
        unknown = sorted(set(raw) - set(accepted))
        if unknown:
            raise ValueError(f"unknown key {where}.{unknown[0]}{of_text}; accepted: {', '.join(accepted) or 'none'}")
        try:
            values = as_dict(OmegaConf.merge(OmegaConf.structured(settings), raw))
        except OmegaConfBaseException as e:
            first = str(getattr(e, "msg", e)).strip().splitlines()[0]  # OmegaConf adds full_key and type lines
            raise ValueError(f"bad setting{of_text or ' ' + where}: {first}") from None
        check_fields(settings, values, where)  # each field's declared range (lottery.core.ranges), NaN and inf
        settings(**values)  # a settings class checks its values in __post_init__ (raising ValueError)
        return values if defaults else {k: values[k] for k in raw}
    for key, value in raw.items():  # no declared ranges: still never NaN or inf
        check_value(f"{where}.{key}", value, None)
    if fn is None:
        if raw:
            raise ValueError(f"{of or where} takes no settings, got {where}.{min(raw)}")
        return raw
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return raw
    accepted = [
        n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in set(skip)
    ]
    unknown = sorted(set(raw) - set(accepted))
    if unknown:
        raise ValueError(f"unknown key {where}.{unknown[0]}{of_text}; accepted: {', '.join(accepted) or 'none'}")
    return raw
