"""The training loop's spans for torch.profiler (lottery.core.spans): there under a profiler, nothing without one, and
the same results either way."""
from __future__ import annotations

import contextlib

import torch
from omegaconf import OmegaConf

from lottery.config import Config
from lottery.core import spans
from lottery.core.steps import Steps
from lottery.data import Batches, load_pool, split
from lottery.models import build_model
from lottery.training import Network, train

SYNTHETIC = {"name": "synthetic", "val_size": 64, "synthetic_train": 512, "synthetic_test": 64}


def _run(profiled: bool, layout: str = "interleaved"):
    pool = load_pool(SYNTHETIC, seed=0)
    cfg = OmegaConf.structured(Config)
    cfg.optimizer = {"name": "adam", "lr": 1e-2}
    cfg.train.batch_size, cfg.train.duration, cfg.train.eval_every, cfg.train.progress = 32, "6it", "3it", False
    networks = []
    for s in range(2 if layout == "stacked" else 1):
        torch.manual_seed(s)
        model = build_model("mlp", pool.input_shape, pool.num_classes, hidden=[32])
        g = torch.Generator().manual_seed(s)
        masks = {n: (torch.rand(p.shape, generator=g) < 0.2).float()
                 for n, p in model.named_parameters() if n.endswith("weight")}
        networks.append(Network(model, masks, Batches(split(pool, 64, s), cfg.train.batch_size, seed=s)))
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profiled else None
    with prof or contextlib.nullcontext():
        results = train(networks, cfg, start=0, steps=Steps.resolve(cfg, 448 // 32), layout=layout)
    states = [{k: v.clone() for k, v in nw.model.state_dict().items()} for nw in networks]
    return results, states, prof


def test_spans_appear_under_a_profiler_and_change_no_result():
    for layout in ("interleaved", "stacked"):
        plain, plain_states, _ = _run(False, layout)
        results, states, prof = _run(True, layout)
        assert results == plain, layout
        for a, b in zip(states, plain_states):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), layout  # bit-identical
        counts = {e.key: e.count for e in prof.key_averages() if e.key.startswith("lottery.")}
        assert counts[spans.STEP] == 6 and counts[spans.DATA] == 6, (layout, counts)
        assert counts[spans.MASK] >= 6 and counts[spans.EVAL] == 3, (layout, counts)  # evaluations at 0, 3, 6


def test_no_span_without_a_profiler():
    assert isinstance(spans.span(spans.STEP), contextlib.nullcontext)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        assert not isinstance(spans.span(spans.STEP), contextlib.nullcontext)
