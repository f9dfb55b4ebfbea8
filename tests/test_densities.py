"""Density distributions (uniform, ER, ERK as in RigL): the densities against closed forms written out here and a
line-by-line port of RigL's `get_sparsities_erdos_renyi`, RigL's capping, exact global counts, and the schedule at
those counts (one-shot, IMP levels, from_dense) through `lottery.pruning.schedule.prune` and a whole run."""
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from lottery import masks as M
from lottery import pruning
from lottery.experiment.check import checked
from lottery.models import build_model
from lottery.pruning.densities import allocate, distribution, survivor_counts

from conftest import make_cfg, tiny_cfg

# PyTorch shapes: conv (out, in, kh, kw), linear (out, in)
SHAPES = {"conv0": (8, 3, 3, 3), "conv1": (16, 8, 3, 3), "conv2": (16, 16, 3, 3), "fc": (10, 256)}


def rigl_sparsities(shapes, default_sparsity, include_kernel):
    """RigL's rigl/sparse_utils.py::get_sparsities_erdos_renyi (empty custom_sparsity_map, erk_power_scale 1), ported
    line by line on TF shapes ((kh, kw, in, out) kernels, (in, out) dense): {name: sparsity}."""
    tf_shapes = {n: (list(s[2:]) + [s[1], s[0]]) if len(s) == 4 else [s[1], s[0]] for n, s in shapes.items()}
    dense_layers = set()
    while True:
        divisor, rhs, raw = 0, 0, {}
        for name, shape_list in tf_shapes.items():
            n_param = math.prod(shape_list)
            n_zeros = int(math.floor(default_sparsity * n_param))
            if name in dense_layers:
                rhs -= n_zeros
            else:
                rhs += n_param - n_zeros
                if include_kernel:
                    raw[name] = sum(shape_list) / math.prod(shape_list)
                else:
                    n_in, n_out = shape_list[-2:]
                    raw[name] = (n_in + n_out) / (n_in * n_out)
                divisor += raw[name] * n_param
        eps = rhs / divisor
        max_prob = max(raw.values())
        if max_prob * eps > 1:
            dense_layers.update(n for n, p in raw.items() if p == max_prob)
        else:
            break
    return {n: 0.0 if n in dense_layers else 1 - eps * raw[n] for n in tf_shapes}


def numel(shapes):
    return {n: math.prod(s) for n, s in shapes.items()}


def test_erk_and_er_equal_the_closed_form_and_rigls_code():
    N = numel(SHAPES)
    total = sum(N.values())
    d = 0.3
    # ERK: p = sum of dims / product of dims, written out by hand
    p = {"conv0": Fraction(8 + 3 + 3 + 3, 216), "conv1": Fraction(16 + 8 + 3 + 3, 1152),
         "conv2": Fraction(16 + 16 + 3 + 3, 2304), "fc": Fraction(10 + 256, 2560)}
    eps = Fraction(3, 10) * total / sum(p[n] * N[n] for n in N)
    assert all(eps * p[n] < 1 for n in N)  # no capping at this density
    erk = distribution("erk", SHAPES, d)
    for n in N:
        assert erk[n] == pytest.approx(float(eps * p[n]), rel=1e-12), n
    # ER: (n_in + n_out) / (n_in * n_out) over the channel dimensions only, the kernel ignored
    p = {"conv0": Fraction(8 + 3, 24), "conv1": Fraction(16 + 8, 128), "conv2": Fraction(32, 256),
         "fc": Fraction(266, 2560)}
    eps = Fraction(3, 10) * total / sum(p[n] * N[n] for n in N)
    er = distribution("er", SHAPES, d)
    for n in N:
        assert er[n] == pytest.approx(float(eps * p[n]), rel=1e-12), n
    # RigL's own computation (integer zeros per layer in its equation): the same within (layers / weights)
    for name, kernel in (("erk", True), ("er", False)):
        ours = distribution(name, SHAPES, d)
        theirs = rigl_sparsities(SHAPES, 1 - d, kernel)
        for n in N:
            assert abs(ours[n] - (1 - theirs[n])) < len(N) / N[n], (name, n)


@pytest.mark.parametrize("density", [0.02, 0.1, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("name", ["er", "erk"])
def test_capping_matches_rigls_code_at_every_density(name, density):
    ours = distribution(name, SHAPES, density)
    theirs = rigl_sparsities(SHAPES, 1 - density, name == "erk")
    N = numel(SHAPES)
    assert {n for n, v in ours.items() if v == 1.0} == {n for n, s in theirs.items() if s == 0.0}
    for n in N:
        assert ours[n] == pytest.approx(1 - theirs[n], abs=len(N) / N[n])
    assert sum(ours[n] * N[n] for n in N) == pytest.approx(density * sum(N.values()), rel=1e-12)


def test_a_layer_whose_density_would_exceed_one_is_dense_and_the_others_absorb_the_rest():
    shapes = {"tiny": (2, 2), "big": (100, 100), "mid": (50, 100)}
    N = numel(shapes)
    # ERK p: tiny 4/4 = 1, big 200/10000, mid 150/5000; uncapped eps = 1500.4 / 354 = 4.24 would give tiny 4.24
    d = distribution("erk", shapes, 0.1)
    assert d["tiny"] == 1.0
    eps = (0.1 * sum(N.values()) - N["tiny"]) / (200 + 150)  # the rest carry 1500.4 - 4 weights
    assert d["big"] == pytest.approx(eps * 0.02, rel=1e-12) and d["mid"] == pytest.approx(eps * 0.03, rel=1e-12)
    assert sum(d[n] * N[n] for n in N) == pytest.approx(0.1 * sum(N.values()), rel=1e-12)
    counts = survivor_counts("erk", shapes, 0.1)
    assert counts["tiny"] == 4 and sum(counts.values()) == pruning.round_half_up(0.1 * sum(N.values()))
    # two rounds of capping: p = 1, 12/32, 0.02; the first eps (4.65) makes 'tiny' dense, the second (4.72) 'small'
    shapes = {"tiny": (2, 2), "small": (4, 8), "big": (100, 100)}
    d = distribution("erk", shapes, 0.1)
    assert d["tiny"] == d["small"] == 1.0 and d["big"] == pytest.approx((0.1 * 10036 - 36) / 10000, rel=1e-12)
    assert distribution("erk", shapes, 0.05)["small"] == pytest.approx((0.05 * 10036 - 4) / 212 * 0.375, rel=1e-12)
    assert distribution("erk", shapes, 1.0) == {"tiny": 1.0, "small": 1.0, "big": 1.0}


def test_uniform_is_the_same_density_everywhere():
    d = distribution("uniform", SHAPES, 0.137)
    assert set(d.values()) == {0.137}
    counts = survivor_counts("uniform", SHAPES, 0.137)
    N = numel(SHAPES)
    assert all(abs(counts[n] - 0.137 * N[n]) < 1 for n in N)
    assert sum(counts.values()) == pruning.round_half_up(0.137 * sum(N.values()))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["uniform", "er", "erk"]), st.floats(0.0, 1.0),
       st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40), st.sampled_from([0, 1, 3])), min_size=1,
                max_size=6))
def test_global_count_is_exact(name, density, dims):
    shapes = {f"t{i}": (a, b, k, k) if k else (a, b) for i, (a, b, k) in enumerate(dims)}
    counts = survivor_counts(name, shapes, density)
    N = numel(shapes)
    assert sum(counts.values()) == pruning.round_half_up(density * sum(N.values()))
    dens = distribution(name, shapes, density)
    for n in N:
        assert 0 <= counts[n] <= N[n] and abs(counts[n] - dens[n] * N[n]) < 1 + 1e-9, n


def test_remainders_go_to_the_largest_fractions_then_the_earlier_tensor():
    shapes = {"a": (10,), "b": (10,), "c": (10,)}
    assert allocate("uniform", shapes, 16) == {"a": 6, "b": 5, "c": 5}  # 5.33 each: ties to the earlier tensor
    assert allocate("uniform", shapes, 17) == {"a": 6, "b": 6, "c": 5}
    # an upper bound (survivors a tensor has now) is never exceeded; others make up the count
    assert allocate("uniform", shapes, 17, upper={"a": 4, "b": 10, "c": 10}) == {"a": 4, "b": 7, "c": 6}
    with pytest.raises(ValueError, match="cannot keep 25 weights"):
        allocate("uniform", shapes, 25, upper={"a": 4, "b": 10, "c": 10})
    with pytest.raises(ValueError, match="unknown density distribution 'erx'; accepted: uniform, er, erk"):
        distribution("erx", shapes, 0.5)


# --- the schedule --------------------------------------------------------------------------------------------------

def pcfg(**kw):
    base = OmegaConf.to_container(make_cfg("pruning=global", "criterion=random").pruning)
    base.update(kw)
    return OmegaConf.create(base)


def conv2():
    torch.manual_seed(0)
    return build_model("conv2", (3, 8, 8), 10)


def _counts(masks):
    return {n: int(m.count_nonzero()) for n, m in masks.items()}


@pytest.mark.parametrize("name", ["uniform", "er", "erk"])
def test_one_shot_random_pruning_at_distribution_densities_keeps_exactly_those_counts(name):
    model = conv2()
    cfg = pcfg(scope=name, exclude=[])
    prunable = M.prunable_tensors(model, cfg)
    masks = M.ones(model, prunable)
    shapes = {n: tuple(m.shape) for n, m in masks.items()}
    out = pruning.prune(model, masks, prunable, cfg, batches=iter(()), generator=torch.Generator().manual_seed(0),
                        keep_fraction=0.05)
    assert _counts(out) == survivor_counts(name, shapes, 0.05)
    assert sum(_counts(out).values()) == pruning.round_half_up(0.05 * sum(m.numel() for m in masks.values()))
    if name == "erk":  # the first conv (3 input channels) is denser than the big fully connected layer
        dens = M.density(out)
        assert dens["convs.0.weight"] > 0.1 > dens["fcs.0.weight"]
    # random positions: another generator, other positions, the same counts
    again = pruning.prune(model, masks, prunable, cfg, batches=iter(()), generator=torch.Generator().manual_seed(1),
                          keep_fraction=0.05)
    assert _counts(again) == _counts(out) and any(not torch.equal(again[n], out[n]) for n in out)


def test_imp_levels_split_the_global_schedules_count_by_the_distribution():
    model = conv2()
    cfg = pcfg(scope="erk", rate=0.5, exclude=[])
    glob = pcfg(rate=0.5, exclude=[])
    prunable = M.prunable_tensors(model, cfg)
    ones = M.ones(model, prunable)
    shapes = {n: tuple(m.shape) for n, m in ones.items()}
    size = sum(m.numel() for m in ones.values())
    assert pruning.plan_counts(ones, prunable, pcfg(scope="erk", target=0.01)) == \
        pruning.plan_counts(ones, prunable, pcfg(target=0.01))
    masks = ones
    for level in range(1, 8):
        before = _counts(masks)
        masks = pruning.prune(model, masks, prunable, cfg, batches=iter(()),
                              generator=torch.Generator().manual_seed(level))
        now, total = _counts(masks), pruning.level_survivors(ones, prunable, glob, level)
        assert sum(now.values()) == total  # global pruning's count at this level
        assert all(now[n] <= before[n] for n in now)  # masks only shrink
        split = allocate("erk", shapes, total)
        assert all(abs(now[n] - split[n]) <= 1 for n in now)  # the distribution's split (within one, of rounding)
        # from_dense: the level's count split by the distribution, exactly
        assert pruning.level_survivors(ones, prunable, cfg, level) == split
    assert sum(split.values()) / size < 0.01


def test_distribution_scopes_are_validated_with_one_line():
    checked(tiny_cfg("pruning=global", "pruning.scope=erk"))
    with pytest.raises(ValueError, match=r"^unknown pruning.scope 'erdos'; accepted: layerwise, global, uniform, er, "
                                         r"erk$"):
        checked(tiny_cfg("pruning.scope=erdos"))
    with pytest.raises(ValueError) as e:
        checked(tiny_cfg("pruning.scope=erk"))  # pruning=lth sets per-kind rates
    assert str(e.value) == ("pruning.rates and pruning.layer_rates are per-layer rates, which pruning.scope=erk does "
                            "not use (it splits each level's global count, pruning.rate of all surviving weights, by "
                            "the erk densities); use pruning=global pruning.scope=erk (pruning=lth sets per-kind "
                            "rates)")
    with pytest.raises(ValueError, match="which pruning.scope=uniform does not use"):
        checked(tiny_cfg("pruning=global", "pruning.scope=uniform", "+pruning.layer_rates={hidden.0: 0.3}"))


def test_random_pruning_at_erk_densities_through_a_run(tmp_path):
    """method=random with pruning.scope=erk: static random pruning at ERK densities, every level from the dense
    network at IMP's global count split by ERK, as RigL's static sparse baseline."""
    from lottery.experiment import run_experiment
    from lottery.experiment.ticket import load_ticket
    cfg = tiny_cfg("pruning=global", "pruning.scope=erk", "method=random", "pruning.levels=3", "pruning.exclude=[]",
                   "pruning.branches=[]")
    run_experiment(cfg, tmp_path / "run")
    model = build_model("lenet_300_100", (1, 28, 28), 10)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n.endswith("weight")}
    size = sum(math.prod(s) for s in shapes.values())
    total = size
    for level in (1, 2):
        total -= pruning.round_half_up(cfg.pruning.rate * total)
        ticket = load_ticket(tmp_path / "run" / "levels" / f"level_{level}" / "ticket.pt")
        assert {n: int(m.sum()) for n, m in ticket.masks.items()} == allocate("erk", shapes, total), level
