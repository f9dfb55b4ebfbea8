"""The selection by k-th value and the rounds loop with one SynFlow scoring copy keep exactly the weights that the
stable-sort selection and a fresh float64 copy per round kept: the previous code is copied here as the reference."""
import copy
import itertools

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lottery import masks as M
from lottery import pruning
from lottery.config import Config
from lottery.experiment import plan
from lottery.experiment.session import open_session
from lottery.models import build_model
from lottery.pruning.selection import Survivors, lowest

from conftest import tiny_cfg

torch.set_default_dtype(torch.float32)


# --- the reference: the code before the change ----------------------------------------------------------------------

def old_remove_lowest(mask, scores, k):
    flat = mask.reshape(-1)
    alive = flat.nonzero().squeeze(1)
    order = torch.sort(scores.reshape(-1)[alive], stable=True).indices
    new = flat.clone()
    new[alive[order[:k]]] = 0
    return new.view_as(mask)


def old_select_layerwise(scores, masks, remove):
    return {n: old_remove_lowest(m, scores[n].detach(), remove[n]) for n, m in masks.items()}


def old_select_global(scores, masks, remove, criterion="magnitude"):
    names = list(masks)
    alive = [masks[n].reshape(-1).nonzero().squeeze(1) for n in names]
    flat_scores = torch.cat([scores[n].detach().reshape(-1)[a].double().cpu() for n, a in zip(names, alive)])
    owner = torch.cat([torch.full((len(a),), i) for i, a in enumerate(alive)])
    index = torch.cat([a.cpu() for a in alive])
    drop = torch.sort(flat_scores, stable=True).indices[:remove]
    out = {}
    for i, n in enumerate(names):
        flat = masks[n].reshape(-1).clone()
        flat[index[drop[owner[drop] == i]].to(flat.device)] = 0
        if not flat.any():
            raise ValueError(f"layer collapse: '{n}'")
        out[n] = flat.view_as(masks[n])
    return out


def old_synflow(model, masks, *, batches, generator):
    x, _ = next(batches)
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    params = dict(net.named_parameters())
    weights = [params[n] for n in masks]
    flow = net(torch.ones((1, *x.shape[1:]), dtype=torch.float64, device=x.device)).sum()
    assert torch.isfinite(flow)
    if flow == 0:
        return {n: torch.zeros_like(m) for n, m in masks.items()}
    grads = torch.autograd.grad(flow, weights)
    return {n: (g * w).detach().abs() for n, g, w in zip(masks, grads, weights)}


def old_round_target(now, final, r, rounds):
    if r == rounds or now == 0:
        return final
    return max(final, min(now, pruning.round_half_up(now * (final / now) ** (r / rounds))))


def old_synflow_prune(model, masks, batches, keep_fraction, rounds, rescore, scope="global", invert=False,
                      keep=None):
    """The previous `prune` with the synflow criterion (one-shot to `keep_fraction`, or to `keep` weights)."""
    total = {n: m.numel() for n, m in masks.items()}
    start = {n: int(m.count_nonzero()) for n, m in masks.items()}
    for r in range(1, rounds + 1):
        if r > 1:
            model = rescore(masks)
        scores = old_synflow(model, masks, batches=batches, generator=None)
        if invert:
            scores = {n: -s for n, s in scores.items()}
        alive = {n: int(m.count_nonzero()) for n, m in masks.items()}
        if scope == "global":
            target = keep if keep is not None else pruning.round_half_up(keep_fraction * sum(total.values()))
            now = old_round_target(sum(start.values()), target, r, rounds)
            masks = old_select_global(scores, masks, sum(alive.values()) - now, "synflow")
        else:
            target = keep if keep is not None else {n: pruning.round_half_up(keep_fraction * total[n]) for n in masks}
            now = {n: old_round_target(start[n], target[n], r, rounds) for n in masks}
            masks = old_select_layerwise(scores, masks, {n: alive[n] - now[n] for n in masks})
    return masks


# --- selection ------------------------------------------------------------------------------------------------------

def tied_scores(g, shapes, levels):
    """Scores with many ties: `levels` distinct values (and a few zeros and negative zeros), in float32 or float64."""
    out = {}
    for i, shape in enumerate(shapes):
        s = torch.randint(0, levels, shape, generator=g).double() / levels
        s[torch.rand(shape, generator=g) < 0.05] = -0.0
        out[f"t{i}"] = s if i % 2 else s.float()
    return out


@pytest.mark.parametrize("levels", [1, 3, 50, 100_000])
@pytest.mark.parametrize("seed", range(6))
def test_selection_equals_the_stable_sort_on_tied_scores(seed, levels):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 11), (13,), (3, 4, 5), (1,), (40,)]
    scores = tied_scores(g, shapes, levels)
    masks = {n: (torch.rand(s.shape, generator=g) > 0.3).float() for n, s in scores.items()}
    masks["t3"] = torch.ones(1)
    alive = {n: int(m.count_nonzero()) for n, m in masks.items()}
    total = sum(alive.values())
    for frac in (0.0, 0.01, 0.2, 0.5, 0.77, 1.0):
        remove = {n: pruning.round_half_up(frac * a) for n, a in alive.items()}
        new, old = pruning.select_layerwise(scores, masks, remove), old_select_layerwise(scores, masks, remove)
        assert all(torch.equal(new[n], old[n]) and new[n].dtype == old[n].dtype for n in masks), (frac, remove)
        k = pruning.round_half_up(frac * total)
        try:
            old = old_select_global(scores, masks, k)
        except ValueError:
            with pytest.raises(ValueError, match="layer collapse"):
                pruning.select_global(scores, masks, k)
            continue
        new = pruning.select_global(scores, masks, k)
        assert all(torch.equal(new[n], old[n]) for n in masks), (frac, k)
        assert sum(int(m.sum()) for m in new.values()) == total - k


def test_lowest_is_the_first_k_of_a_stable_sort_also_with_infinities_and_nans():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.int64, torch.bfloat16):
        s = torch.randint(0, 5, (200,), generator=g).to(dtype)
        if dtype.is_floating_point:
            s[torch.randint(0, 200, (20,), generator=g)] = float("inf")
            s[torch.randint(0, 200, (20,), generator=g)] = float("nan")
            s[torch.randint(0, 200, (20,), generator=g)] = float("-inf")
        order = torch.sort(s, stable=True).indices
        for k in (0, 1, 2, 37, 100, 150, 170, 199, 200, 250):
            expected = torch.zeros(200, dtype=torch.bool)
            expected[order[:k]] = True
            assert torch.equal(lowest(s, k), expected), (dtype, k)


def test_survivors_over_rounds_equal_selection_from_the_masks_each_round():
    g = torch.Generator().manual_seed(1)
    scores = tied_scores(g, [(30, 20), (50,), (8, 3, 3)], 7)
    masks = {n: torch.ones_like(s, dtype=torch.float32) for n, s in scores.items()}
    left = Survivors(masks)
    for k in (100, 50, 200, 0, 150):
        masks = old_select_global(scores, masks, k)
        left.remove_global(left.gather(scores), k)
        assert all(torch.equal(a, b) for a, b in zip(left.masks().values(), masks.values()))
        assert left.counts() == [int(m.sum()) for m in masks.values()]


def test_no_masked_tensor_selects_nothing():
    assert pruning.select_layerwise({}, {}, {}) == {}
    model = nn.Linear(3, 2)
    cfg = _synflow_pcfg(3)
    cfg.criterion, cfg.scope = {"name": "magnitude"}, "layerwise"
    assert pruning.prune(model, {}, [], cfg, batches=iter(()), generator=None, keep_fraction=0.5) == {}


# --- 100-round SynFlow -----------------------------------------------------------------------------------------------

def _synflow_pcfg(rounds):
    pcfg = OmegaConf.structured(Config).pruning
    pcfg.criterion, pcfg.scope, pcfg.rounds, pcfg.exclude = {"name": "synflow"}, "global", rounds, []
    return pcfg


@pytest.mark.parametrize("name,shape,kwargs,density,rescore", [
    ("lenet_300_100", (1, 12, 12), {}, 0.01, True),
    ("lenet_300_100", (1, 12, 12), {}, 0.01, False),
    ("resnet20", (3, 16, 16), {"width": 4}, 0.05, True),  # 4 weights left in its sparsest tensor
    ("resnet20", (3, 16, 16), {"width": 4}, 0.05, False),
    ("lenet_300_100", (1, 28, 28), {}, 0.01, True),  # the benchmark's two models, full size
    ("resnet20", (3, 32, 32), {}, 0.01, True),
])
@pytest.mark.slow
def test_100_round_synflow_keeps_the_same_weights_as_before(name, shape, kwargs, density, rescore):
    """LeNet-300-100 and ResNet-20, small and full size, pruned in 100 rounds as the driver prunes them (`rescore`
    building a fresh model with the masks applied) or with no `rescore`: the masks of the previous code path, bit
    for bit."""
    torch.manual_seed(0)
    model = build_model(name, shape, 10, **kwargs)
    state = copy.deepcopy(model.state_dict())
    pcfg = _synflow_pcfg(100)
    prunable = M.prunable_tensors(model, pcfg)
    masks = M.ones(model, prunable)

    def scoring_model(current):
        m = build_model(name, shape, 10, **kwargs)
        m.load_state_dict(state)
        M.apply(m, current)
        return m

    batches = itertools.repeat((torch.zeros(2, *shape), torch.zeros(2, dtype=torch.long)))
    old = old_synflow_prune(scoring_model(masks), masks, batches, density, 100, scoring_model)
    new = pruning.prune(scoring_model(masks), masks, prunable, pcfg, batches=batches, generator=torch.Generator(),
                        keep_fraction=density, rescore=scoring_model if rescore else None)
    assert list(new) == list(old)
    for n in old:
        assert torch.equal(new[n], old[n]) and new[n].dtype == old[n].dtype, n
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in new.values()) == pruning.round_half_up(density * total)


def test_synflow_scores_are_bit_for_bit_those_of_a_fresh_float64_copy():
    """The scorer's weights are views of one buffer, zeroed in place round after round: the same float64 scores as
    the previous criterion on the model with the masks applied, including tensors of odd sizes."""
    from lottery.pruning.pai import SynflowRounds, synflow
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 7, 3, bias=False),
                        nn.ReLU(), nn.Flatten(), nn.Linear(7 * 3 * 3, 11), nn.ReLU(), nn.Linear(11, 3))
    masks = {n: torch.ones_like(p) for n, p in net.named_parameters() if p.dim() > 1}
    batches = itertools.repeat((torch.zeros(1, 3, 7, 7), None))
    scorer = SynflowRounds(net, masks, batches=batches)
    left = Survivors(masks)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        old = old_synflow(net, masks, batches=batches, generator=None)
        assert torch.equal(scorer.scores(left.index), left.gather(old))
        assert all(torch.equal(old[n], v) for n, v in synflow(net, masks, batches=batches, generator=None).items())
        removed = left.remove_layerwise(torch.rand(len(left.index), generator=g), [5] * len(masks))
        scorer.remove(removed)
        masks = left.masks()
        M.apply(net, masks)


def _bias_free_mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 20, bias=False), nn.ReLU(), nn.Linear(20, 10, bias=False),
                         nn.ReLU(), nn.Linear(10, 5, bias=False))


@pytest.mark.parametrize("net,scope,invert,density", [
    ("lenet", "layerwise", False, 0.05),
    ("lenet", "global", True, 0.3),
    ("lenet", "layerwise", True, 0.05),
    ("mlp", "layerwise", True, 0.05),  # its flow reaches zero in 5 of the 10 rounds: all scores zero, all tied
])
def test_synflow_rounds_layerwise_and_inverted_keep_the_same_weights_as_before(net, scope, invert, density):
    """The other schedules through the same scorer: layerwise rounds and the invert ablation's lowest scores, from
    masks that already pruned some weights."""
    torch.manual_seed(1)
    model = build_model("lenet_300_100", (1, 6, 6), 10) if net == "lenet" else _bias_free_mlp()
    pcfg = _synflow_pcfg(10)
    pcfg.scope, pcfg.exclude = scope, ["out.weight"] if net == "lenet" else []
    prunable = M.prunable_tensors(model, pcfg)
    g = torch.Generator().manual_seed(0)
    masks = {n: (torch.rand(m.shape, generator=g) > 0.2).float() for n, m in M.ones(model, prunable).items()}
    M.apply(model, masks)
    batches = itertools.repeat((torch.zeros(1, 1, 6, 6), None))
    ref = copy.deepcopy(model)
    old = old_synflow_prune(ref, masks, batches, density, 10, lambda m: M.apply(ref, m) or ref, scope, invert)
    new = pruning.prune(copy.deepcopy(model), masks, prunable, pcfg, batches=batches, generator=None,
                        keep_fraction=density, invert=invert)
    assert all(torch.equal(new[n], old[n]) for n in old)


@pytest.mark.parametrize("pruning_cfg", ["pruning=lth", "pruning=global"])
@pytest.mark.slow
def test_the_drivers_synflow_levels_keep_the_same_weights_as_before(tmp_path, pruning_cfg):
    """`plan.prune_level` of method=synflow (100 rounds from the dense network to each level's count, layerwise or
    global; the driver's `rescore` is no longer called): the masks the previous code path gives with that `rescore`,
    at two levels."""
    cfg = tiny_cfg(pruning_cfg, "method=synflow", "pruning.levels=3", "pruning.rate=0.6")
    with open_session(cfg, tmp_path / "run") as session:
        [r] = session.replicates
    r.set_rewind_state({k: v.clone() for k, v in r.new_model(init_seed=cfg.seed).state_dict().items()})

    def scoring_model(current):
        m = r.new_model()
        m.load_state_dict(r.rewind_state)
        M.apply(m, current)
        return m

    batches = itertools.repeat((torch.zeros(1, *r.split.pool.input_shape), None))
    for level in (1, 2):
        masks = plan.masks_before(r, level)
        keep = pruning.level_survivors(masks, M.prunable_tensors(r.new_model(), cfg.pruning), cfg.pruning, level)
        scope = "global" if isinstance(keep, int) else "layerwise"
        old = old_synflow_prune(scoring_model(masks), masks, batches, None, 100, scoring_model, scope, keep=keep)
        new = plan.prune_level(r, level, masks)
        assert list(new) == list(old) and all(torch.equal(new[n], old[n]) for n in old), level
        assert sum(int(m.sum()) for m in new.values()) == (keep if scope == "global" else sum(keep.values()))
