"""What a config key accepts, said once, beside the key: metadata on the schema's dataclass fields.

`lottery.config`'s dataclasses (and a registered thing's settings dataclass: an optimizer's, a criterion's, a
branch's) declare each key's range or allowed values with `setting(default, rule)`; `check_fields` walks a dataclass
and a plain value of it and refuses the first value outside its rule with one line naming the key, the value and what
is accepted. Every number is checked finite whether or not its field has a rule (NaN and inf are never a setting), so
a key added without a rule still cannot take NaN; tests/test_config_ranges.py fails for a numeric key of the schema
without a rule.

Imports nothing of lottery: the schema (lottery.config) and the registries (lottery.core.registry) both use it.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

RULE = "lottery_rule"  # the key of a field's metadata that holds its Rule


@dataclass(frozen=True)
class Rule:
    """A number's range (`lo`/`hi`, each end open or closed; `integer`), or the allowed values (`choices`)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    choices: tuple | None = None

    def accepted(self) -> str:
        """What the rule accepts, as the end of "<key> must be ...": ">= 1", "in [0, 1)", "> 0"."""
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        return "a finite number"

    def admits(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        if not _is_number(value) or not math.isfinite(value):
            return False
        if self.integer and not float(value).is_integer():
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))


FINITE = Rule()


def _num(x: float) -> str:
    if isinstance(x, int) or (float(x).is_integer() and abs(x) < 1e15):
        return str(int(x))
    return f"{x:g}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- the vocabulary of the schema --------------------------------------------------------------------------------


def between(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    integer: bool = False,
) -> Rule:
    return Rule(lo, hi, lo_open, hi_open, integer)


def positive(hi: float | None = None) -> Rule:
    """> 0 (and <= hi)."""
    return Rule(0, hi, lo_open=True)


def non_negative() -> Rule:
    return Rule(0)


def fraction() -> Rule:
    """[0, 1): a rate of pruning, momentum, a moment's decay."""
    return Rule(0, 1, hi_open=True)


def at_least(n: int) -> Rule:
    return Rule(n, integer=True)


def one_of(*choices) -> Rule:
    return Rule(choices=tuple(choices))


def setting(default: Any, rule: Rule, **kwargs) -> Any:
    """A dataclass field with its rule: `gamma: float = setting(0.1, positive())`. A callable default (list, dict) is
    a default factory. The rule of a list or dict field applies to each of its items or values."""
    metadata = {RULE: rule}
    if callable(default):
        return dataclasses.field(default_factory=default, metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def rule_of(f: dataclasses.Field) -> Rule | None:
    return f.metadata.get(RULE)


# --- the check ---------------------------------------------------------------------------------------------------


def out_of_range(key: str, value: Any, rule: Rule) -> str:
    """The one line of a refused value, in the words of the checks before it: "unknown <key> '<value>'; accepted:
    ..." for a choice, "<key> must be <range>, got <value>" for a number."""
    if rule.choices is not None:
        return f"unknown {key} '{value}'; accepted: {', '.join(map(str, rule.choices))}"
    return f"{key} must be {rule.accepted()}, got {value}"


def check_value(key: str, value: Any, rule: Rule | None) -> None:
    """Raise ValueError (one line) when `value` of `key` breaks `rule` (or, for a number, is not finite). A list's
    items and a dict's values are checked one by one; None (an unset optional key) passes."""
    if value is None:
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if rule is not None or _is_number(item):
                try:
                    check_value(key, item, rule)
                except ValueError:
                    raise ValueError(
                        f"{key} entries must be {(rule or FINITE).accepted()}, got {item} (entry {i} of {list(value)})"
                    ) from None
        return
    if isinstance(value, Mapping):
        for k, item in value.items():
            check_value(f"{key}.{k}", item, rule)
        return
    if rule is None:
        if _is_number(value) and not math.isfinite(value):
            raise ValueError(out_of_range(key, value, FINITE))
        return
    if rule.choices is None and not _is_number(value):
        return  # a type OmegaConf checks (or a duration string); the range is for numbers
    if not rule.admits(value):
        raise ValueError(out_of_range(key, value, rule))


def check_fields(cls: type, values: Mapping, where: str = "") -> None:
    """Every field of the dataclass `cls` present in `values` checked against its rule; nested dataclass fields are
    walked. `where` prefixes the keys in messages (e.g. "optimizer")."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        key = f"{where}.{f.name}" if where else f.name
        value = values[f.name]
        hint = hints.get(f.name)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            check_fields(hint, value, key)
        else:
            check_value(key, value, rule_of(f))


def numeric_fields(cls: type, where: str = "") -> list[tuple[str, type, Rule | None]]:
    """(key, type, rule) of every int or float field below `cls` (lists and dicts of numbers too): what the schema
    test walks."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{where}.{f.name}" if where else f.name
        hint = hints.get(f.name)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            out += numeric_fields(hint, key)
            continue
        base = _numeric(hint)
        if base is not None:
            out.append((key, base, rule_of(f)))
    return out


def _numeric(hint) -> type | None:
    """int or float for int, float, Optional/List/Dict of them; else None."""
    if hint in (int, float):
        return hint
    for arg in typing.get_args(hint):
        if arg is type(None):
            continue
        found = _numeric(arg)
        if found is not None:
            return found
    return None
