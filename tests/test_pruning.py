"""Masks and pruning strategies: exact counts, what is prunable, determinism, and the known pitfalls."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from torch import nn

from lottery import masks as M
from lottery import pruning
from lottery.models import build_model

from conftest import make_cfg


def pcfg(**kw):
    base = OmegaConf.to_container(make_cfg("pruning=lth").pruning)
    base.update(kw)
    return OmegaConf.create(base)


def lenet():
    torch.manual_seed(0)
    return build_model("lenet_300_100", (1, 28, 28), 10)


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def prune(model, masks, prunable, cfg, **kw):
    """One step of the schedule with the configured criterion (magnitude by default), no data needed."""
    return pruning.prune(model, masks, prunable, cfg, batches=iter(()), generator=torch.Generator().manual_seed(0),
                         **kw)


def layerwise(w, masks, rates):
    """Magnitude selection per tensor at the given rates (the counts the schedule would ask for)."""
    remove = {n: pruning.round_half_up(rates[n] * int(m.count_nonzero())) for n, m in masks.items()}
    return pruning.select_layerwise({n: t.abs() for n, t in w.items()}, masks, remove)


def global_(w, masks, rate):
    alive = sum(int(m.count_nonzero()) for m in masks.values())
    return pruning.select_global({n: t.abs() for n, t in w.items()}, masks, pruning.round_half_up(rate * alive))


def test_lenet_paper_fractions_exact():
    """Frankle & Carbin 2019, Figure 3 legend: 100, 51.3, 21.1, 7.0, 3.6, 1.9 % at levels 0, 3, 7, 12, 15, 18."""
    model = lenet()
    cfg = pcfg()
    prunable = M.prunable_tensors(model, cfg)
    masks = M.ones(model, prunable)
    w = weights(model)
    fractions = []
    for level in range(19):
        remaining, total = M.count(masks)
        fractions.append(round(100 * remaining / total, 1))
        masks = prune(model, masks, prunable, cfg)
    assert [fractions[i] for i in (0, 3, 7, 12, 15, 18)] == [100.0, 51.3, 21.1, 7.0, 3.6, 1.9]
    # plan_counts (used for pruning.target) agrees with actual pruning
    assert total == 266200


def test_layerwise_removes_exact_rounded_count_per_tensor():
    model = lenet()
    cfg = pcfg()
    prunable = M.prunable_tensors(model, cfg)
    masks = M.ones(model, prunable)
    w = weights(model)
    rates = pruning.layer_rates(prunable, cfg)
    assert rates == {"hidden.0.weight": 0.2, "hidden.1.weight": 0.2, "out.weight": 0.1}
    for _ in range(5):
        before = {n: int(m.count_nonzero()) for n, m in masks.items()}
        masks = prune(model, masks, prunable, cfg)
        for n, m in masks.items():
            assert int(m.count_nonzero()) == before[n] - pruning.round_half_up(rates[n] * before[n])


def test_counts_match_plan_counts():
    model = lenet()
    cfg = pcfg(levels=6)
    prunable = M.prunable_tensors(model, cfg)
    masks = M.ones(model, prunable)
    plan = pruning.plan_counts(masks, prunable, pcfg(target=0.3))
    w = weights(model)
    actual = []
    for _ in range(len(plan)):
        actual.append(M.count(masks)[0])
        masks = prune(model, masks, prunable, cfg)
    assert actual == plan
    assert plan[-1] <= 0.3 * plan[0] < plan[-2]


def test_smallest_magnitudes_go_first_and_negative_weights_count_by_magnitude():
    """Pitfall 1: ranking by |w|, not by w: large negative weights survive."""
    w = {"a": torch.tensor([[-5.0, 0.1, -0.2, 3.0, -0.05, 0.3]])}
    masks = {"a": torch.ones(1, 6)}
    out = layerwise(w, masks, {"a": 0.5})
    assert out["a"].tolist() == [[1, 0, 0, 1, 0, 1]]


def test_ties_broken_by_index_deterministically():
    w = {"a": torch.ones(10)}
    out = layerwise(w, {"a": torch.ones(10)}, {"a": 0.3})
    assert out["a"].tolist() == [0, 0, 0] + [1] * 7


def test_pruned_weights_never_come_back_even_if_raw_value_is_large():
    """Pitfall 3: only surviving entries are ranked; a pruned entry with a large raw value stays pruned."""
    w = {"a": torch.tensor([100.0, 1.0, 2.0, 3.0, 4.0])}
    masks = {"a": torch.tensor([0.0, 1, 1, 1, 1])}
    out = layerwise(w, masks, {"a": 0.25})
    assert out["a"].tolist() == [0, 0, 1, 1, 1]
    out = global_(w, masks, 0.25)
    assert out["a"].tolist() == [0, 0, 1, 1, 1]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.05, 0.9), st.sampled_from(["layerwise", "global"]))
def test_masks_only_shrink_and_counts_exact(seed, rate, scope):
    g = torch.Generator().manual_seed(seed)
    w = {"a": torch.randn(7, 11, generator=g), "b": torch.randn(13, generator=g)}
    masks = {"a": (torch.rand(7, 11, generator=g) > 0.3).float(), "b": torch.ones(13)}
    alive = sum(int(m.count_nonzero()) for m in masks.values())
    try:
        out = (global_(w, masks, rate) if scope == "global"
               else layerwise(w, masks, {"a": rate, "b": rate}))
    except ValueError as e:
        assert "would remove every weight" in str(e)
        return
    for n in masks:
        assert torch.all(out[n] <= masks[n])
    if scope == "global":
        assert sum(int(m.count_nonzero()) for m in out.values()) == alive - pruning.round_half_up(rate * alive)


def test_global_uses_one_threshold_and_refuses_to_empty_a_layer():
    w = {"small": torch.full((4,), 0.01), "big": torch.arange(1.0, 17.0)}
    masks = {n: torch.ones_like(t) for n, t in w.items()}
    with pytest.raises(ValueError, match="would remove every weight of 'small' \\(layer collapse\\)"):
        global_(w, masks, 0.25)  # 5 of 20 go: all 4 small ones and the smallest big one
    w2 = {"small": torch.tensor([0.01, 50.0]), "big": torch.arange(1.0, 17.0)}
    out = global_(w2, {n: torch.ones_like(t) for n, t in w2.items()}, 0.25)
    assert out["small"].tolist() == [0, 1]
    assert out["big"].tolist() == [0, 0, 0, 0] + [1] * 12


def test_default_policy_prunes_weights_not_biases_or_batchnorm_and_marks_output():
    """Pitfall 6."""
    model = build_model("resnet20", (3, 32, 32), 10)
    prunable = M.prunable_tensors(model, pcfg())
    names = [p.name for p in prunable]
    assert all(n.endswith("weight") for n in names)
    assert not any(".bn" in n or n.startswith("bn") for n in names)
    assert [p.kind for p in prunable if p.name == "out.weight"] == ["output"]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len([p for p in prunable if p.kind == "conv"]) == len(convs)
    with_bias = M.prunable_tensors(model, pcfg(prune_batchnorm=True))
    assert any("bn" in p.name and p.kind == "batchnorm" for p in with_bias)
    excluded = M.prunable_tensors(model, pcfg(exclude=["*shortcut*", "out.weight"]))
    assert not any("shortcut" in p.name or p.name == "out.weight" for p in excluded)
    assert any("shortcut" in n for n in names)


def test_layer_rate_overrides_by_name():
    model = lenet()
    cfg = pcfg(layer_rates={"hidden.1": 0.5})
    rates = pruning.layer_rates(M.prunable_tensors(model, cfg), cfg)
    assert rates["hidden.1.weight"] == 0.5 and rates["hidden.0.weight"] == 0.2


def test_one_shot_keep_fraction():
    model = lenet()
    cfg = pcfg()
    prunable = M.prunable_tensors(model, cfg)
    masks = prune(model, M.ones(model, prunable), prunable, cfg, keep_fraction=0.2)
    assert {n: int(m.count_nonzero()) for n, m in masks.items()} == {
        "hidden.0.weight": 47040, "hidden.1.weight": 6000, "out.weight": 200}


def test_controls_keep_per_layer_counts_and_change_positions():
    """Pitfall 9: a control must change what it claims (positions) and nothing else (counts)."""
    model = lenet()
    cfg = pcfg()
    prunable = M.prunable_tensors(model, cfg)
    masks = prune(model, M.ones(model, prunable), prunable, cfg)
    masks = prune(model, masks, prunable, cfg)
    for control in (pruning.random_like, pruning.shuffle):
        out = control(masks, torch.Generator().manual_seed(1))
        again = control(masks, torch.Generator().manual_seed(1))
        for n in masks:
            assert int(out[n].count_nonzero()) == int(masks[n].count_nonzero())
            assert not torch.equal(out[n], masks[n])
            assert torch.equal(out[n], again[n])


def test_params_remaining_counts_unprunable_parameters():
    model = lenet()
    prunable = M.prunable_tensors(model, pcfg())
    masks = M.ones(model, prunable)
    masks["hidden.0.weight"].zero_()
    total = sum(p.numel() for p in model.parameters())
    assert M.params_remaining(model, masks) == (total - 235200) / total
    assert M.count(masks) == (31000, 266200)


def test_apply_and_masker_zero_exactly_and_survive_deepcopy():
    """Pitfall 8: masks are plain tensors; a deepcopy of the model is an ordinary model."""
    model = lenet()
    prunable = M.prunable_tensors(model, pcfg())
    masks = prune(model, M.ones(model, prunable), prunable, pcfg())
    M.apply(model, masks)
    clone = copy.deepcopy(model)
    for n, p in clone.named_parameters():
        if n in masks:
            assert torch.all(p[masks[n] == 0] == 0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    M.Masker(model, masks)()
    for n, p in model.named_parameters():
        if n in masks:
            assert torch.all(p[masks[n] == 0] == 0) and torch.all(p[masks[n] == 1] != 0)
