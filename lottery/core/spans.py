"""Named spans of the time a run spends, for torch.profiler: where a benchmark or a user wants the split of a step
(data, forward and backward, masking) or of a run (evaluation), `torch.profiler.profile()` around the run shows
these names (`key_averages()`, a Chrome trace) next to PyTorch's own operators, with no code of the run replaced.

    lottery.step   one training step of the loop: its batch, forward, backward, optimizer step and masking
    lottery.data   a training batch gathered (and augmented) from the pool: part of lottery.step
    lottery.mask   pruned weights set to zero (lottery.masks.Masker): part of lottery.step
    lottery.eval   a split evaluated by the training loop (validation or test, every network of the call)

The optimizer's step has PyTorch's own span (`Optimizer.step#Adam.step`). A span costs nothing to speak of when no
profiler runs (a check of one flag); `torch.profiler.record_function` itself costs about 15 us on the 2-core
development machine even then, a few percent of a LeNet-300-100 step, so it is entered only under a profiler.
Spans change no arithmetic: results are bit-identical with and without a profiler (tests/test_spans.py).
"""

from __future__ import annotations

import contextlib

import torch

STEP, DATA, MASK, EVAL = "lottery.step", "lottery.data", "lottery.mask", "lottery.eval"


def span(name: str) -> contextlib.AbstractContextManager:
    """`torch.profiler.record_function(name)` while a profiler runs in this process; else nothing."""
    if torch.autograd._profiler_enabled():  # the flag record_function itself reads (torch has no public one)
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()
