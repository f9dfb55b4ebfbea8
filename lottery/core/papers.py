"""The `paper:` block of an experiment preset: the published numbers the preset reproduces, where each stands in its
paper, and how it was measured (lottery-report --paper puts a run beside them; docs/reproductions.md).

The block is documentation, not part of the experiment (lottery.config.NON_EXPERIMENT_KEYS): editing it never makes
a finished run a different experiment. It is checked here, before any work, so that a number without its place in
the paper (figure or table, and page) or with a spread the comparison cannot read is refused by name.

    paper:
      source: 'Frankle & Carbin, "The Lottery Ticket Hypothesis", ICLR 2019 (arXiv 1803.03635 v5)'
      changes: what the preset changes from the paper's setup, and why ("none" if nothing)
      none_published: why there is no number to compare with (instead of numbers)
      numbers:
        - claim: one line saying what the number is
          place: Figure 3          # a figure, table, section or appendix of the paper (or its abstract)
          page: 4                  # or 'not verified: <why>' where the source read had no page numbers
          metric: test_accuracy    # METRICS
          branch: ticket           # the run's branch the number is about (ticket, reinit, random_prune, lmc, ...)
          density: 21.1            # percent of the weights remaining, as published
          relative: none           # none | difference (ours - dense) | ratio (ours / dense) | speedup (dense / ours)
          value: 98.3
          spread: {kind: min_max, plus_minus: 0.1}   # SPREADS
          bound: null              # above | below: the paper says "more than" / "less than" value
          runs: 3                  # runs behind the number (or 'not stated')
          iterations: 50000        # training iterations per level behind it (a shorter run is not compared)
          lmc_step: 0              # instability: the step k the two copies start from
          source: ...              # where the number comes from, when not the block's source
          note: ...

Imports nothing of lottery.
"""

from __future__ import annotations

import math
import re
from typing import Any, TypeGuard

# metric: (what the published value is in, factor from our record's value to that unit)
METRICS = {
    "test_accuracy": ("test accuracy at the end of training (%)", 100.0),
    "early_stop_test_accuracy": ("test accuracy at the early-stop iteration (%)", 100.0),
    "early_stop_step": ("early-stop iteration (minimum validation loss)", 1.0),
    "instability_test": ("instability: test error barrier (percentage points)", 1.0),
    "instability_train": ("instability: train error barrier (percentage points)", 1.0),
}
RELATIVE = ("none", "difference", "ratio", "speedup")
# min_max: bars are the minimum and maximum over the runs | std: one standard deviation | unstated: "±" without
# saying what it is | read_off: read off a figure, to the given precision | none: a number in the text without a
# spread (a stated tolerance is then required)
SPREADS = ("min_max", "std", "unstated", "read_off", "none")
BOUNDS = ("above", "below")
BLOCK_KEYS = ("source", "changes", "numbers", "none_published")
NUMBER_KEYS = (
    "claim",
    "place",
    "page",
    "metric",
    "branch",
    "density",
    "relative",
    "value",
    "spread",
    "bound",
    "runs",
    "iterations",
    "lmc_step",
    "source",
    "note",
)
PLACE = re.compile(r"\b(figure|fig\.|table|section|appendix)\s*[A-Za-z]?\d|\babstract\b", re.IGNORECASE)
UNVERIFIED = "not verified"


def _num(value) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _text(value) -> TypeGuard[str]:
    return isinstance(value, str) and bool(value.strip())


def check_block(block: Any, where: str = "paper") -> None:
    """Raise ValueError (one line naming the entry and what is wrong) unless `block` is a well-formed paper block;
    an empty block (a preset that says nothing about a paper) passes."""
    if block is None or block == {}:
        return
    if not isinstance(block, dict):
        raise ValueError(f"{where} must be a mapping with keys {', '.join(BLOCK_KEYS)}, got {type(block).__name__}")
    unknown = sorted(set(block) - set(BLOCK_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(BLOCK_KEYS)}")
    for key in ("source", "changes"):
        if not _text(block.get(key)):
            raise ValueError(f"{where}.{key} is required (a line of text)")
    numbers = block.get("numbers") or []
    if not isinstance(numbers, list):
        raise ValueError(f"{where}.numbers must be a list of numbers, got {type(numbers).__name__}")
    if not numbers and not _text(block.get("none_published")):
        raise ValueError(f"{where}: no numbers; say why with none_published: '<none published at this scale: ...>'")
    for i, number in enumerate(numbers):
        check_number(number, f"{where}.numbers[{i}]")


def check_number(n: Any, where: str) -> None:
    if not isinstance(n, dict):
        raise ValueError(f"{where} must be a mapping, got {type(n).__name__}")
    unknown = sorted(set(n) - set(NUMBER_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(NUMBER_KEYS)}")
    if not _text(n.get("claim")):
        raise ValueError(f"{where}.claim is required (one line saying what the number is)")
    where = f"{where} ({n['claim'][:40]})"
    place = n.get("place")
    if not _text(place) or not PLACE.search(place):
        raise ValueError(
            f"{where}: no place in the paper: place must name its figure, table or section "
            f"(e.g. 'Figure 3'), got {place!r}"
        )
    page = n.get("page")
    if not (
        (isinstance(page, int) and not isinstance(page, bool) and page >= 1)
        or (isinstance(page, str) and page.startswith(UNVERIFIED))
    ):
        raise ValueError(f"{where}: page must be the page number (>= 1) or '{UNVERIFIED}: <why>', got {page!r}")
    if n.get("metric") not in METRICS:
        raise ValueError(f"{where}: unknown metric {n.get('metric')!r}; accepted: {', '.join(METRICS)}")
    if "branch" in n and not _text(n["branch"]):
        raise ValueError(f"{where}: branch must be a branch name (ticket, reinit, random_prune, lmc, ...)")
    density = n.get("density")
    if not _num(density) or not 0 < density <= 100:
        raise ValueError(
            f"{where}: density must be the percent of weights remaining (0 < density <= 100), got {density!r}"
        )
    relative = n.get("relative", "none")
    if relative not in RELATIVE:
        raise ValueError(f"{where}: unknown relative {relative!r}; accepted: {', '.join(RELATIVE)}")
    if not _num(n.get("value")):
        raise ValueError(f"{where}: value must be a number, got {n.get('value')!r}")
    bound = n.get("bound")
    if bound is not None and bound not in BOUNDS:
        raise ValueError(f"{where}: unknown bound {bound!r}; accepted: {', '.join(BOUNDS)} (or leave it out)")
    runs = n.get("runs")
    if not ((isinstance(runs, int) and not isinstance(runs, bool) and runs >= 1) or runs == "not stated"):
        raise ValueError(
            f"{where}: runs must be the number of runs behind the value (>= 1) or 'not stated', got {runs!r}"
        )
    for key in ("iterations", "lmc_step"):
        v = n.get(key)
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            raise ValueError(f"{where}: {key} must be a whole number of iterations, got {v!r}")
    if n["metric"].startswith("instability") and n.get("branch", "ticket") != "lmc":
        raise ValueError(f"{where}: an instability number is about the lmc branch (branch: lmc)")
    _check_spread(n.get("spread"), bound, where)


def _check_spread(spread: Any, bound, where: str) -> None:
    if not isinstance(spread, dict) or spread.get("kind") not in SPREADS:
        raise ValueError(f"{where}: spread must be a mapping with kind one of {', '.join(SPREADS)}, got {spread!r}")
    kind = spread["kind"]
    allowed = {
        "min_max": {"kind", "plus_minus", "low", "high"},
        "std": {"kind", "plus_minus"},
        "unstated": {"kind", "plus_minus"},
        "read_off": {"kind", "precision"},
        "none": {"kind", "tolerance"},
    }
    unknown = sorted(set(spread) - allowed[kind])
    if unknown:
        raise ValueError(
            f"{where}: spread kind {kind} takes {', '.join(sorted(allowed[kind]))}, not {', '.join(unknown)}"
        )
    if kind == "min_max":
        symmetric = _num(spread.get("plus_minus")) and spread["plus_minus"] >= 0
        asymmetric = _num(spread.get("low")) and _num(spread.get("high")) and spread["low"] <= spread["high"]
        if symmetric == asymmetric:
            raise ValueError(
                f"{where}: a min_max spread needs plus_minus (as printed, '98.3 ± 0.1') or low and "
                f"high (the bars' ends), one of them"
            )
    elif kind in ("std", "unstated"):
        if not _num(spread.get("plus_minus")) or spread["plus_minus"] < 0:
            raise ValueError(f"{where}: a {kind} spread needs plus_minus >= 0")
    elif kind == "read_off":
        if not _num(spread.get("precision")) or spread["precision"] <= 0:
            raise ValueError(f"{where}: a read_off spread needs the precision it was read to (> 0)")
    elif bound is None and (not _num(spread.get("tolerance")) or spread["tolerance"] < 0):
        raise ValueError(
            f"{where}: the paper gives no spread: state the tolerance the comparison uses "
            f"(spread: {{kind: none, tolerance: ...}})"
        )


def published_interval(n: dict) -> tuple[float, float]:
    """The interval the published number stands for: its spread (or stated tolerance) around the value; a bound is
    the half-line it claims."""
    value, spread, bound = float(n["value"]), n["spread"], n.get("bound")
    if bound == "above":
        return value, math.inf
    if bound == "below":
        return -math.inf, value
    kind = spread["kind"]
    if kind == "min_max" and "low" in spread:
        return float(spread["low"]), float(spread["high"])
    half = float(spread.get("plus_minus", spread.get("precision", spread.get("tolerance", 0.0))) or 0.0)
    return value - half, value + half
