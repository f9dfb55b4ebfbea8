import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from lottery.init import INITIALIZERS, initialize, register_initializer, weight_variance


@dataclass
class InitCfg:
    name: str = "kaiming_normal"
    variance: float | None = None
    mode: str = "fan_in"
    nonlinearity: str = "relu"
    gain: float | None = None
    bias: str = "zero"
    batchnorm: str = "ones"
    _target_: str | None = None


def small_model():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# Linear(1000 -> 400): fan_in 1000, fan_out 400. Conv2d(128 -> 256, 3x3): fan_in 1152, fan_out 2304.
LINEAR = (lambda: nn.Linear(1000, 400), 1000, 400)
CONV = (lambda: nn.Conv2d(128, 256, 3), 128 * 9, 256 * 9)

# (cfg overrides, expected variance as a function of (fan_in, fan_out)), written out by hand
CASES = {
    "kaiming_normal": ({}, lambda i, o: 2 / i),
    "kaiming_normal_fan_out": ({"name": "kaiming_normal", "mode": "fan_out"}, lambda i, o: 2 / o),
    "kaiming_normal_linear": ({"name": "kaiming_normal", "nonlinearity": "linear"}, lambda i, o: 1 / i),
    "kaiming_normal_tanh": ({"name": "kaiming_normal", "nonlinearity": "tanh"}, lambda i, o: (5 / 3) ** 2 / i),
    "kaiming_uniform": ({}, lambda i, o: 2 / i),  # U(-sqrt(6/fan), sqrt(6/fan)) has variance 2/fan
    "kaiming_uniform_fan_out": ({"name": "kaiming_uniform", "mode": "fan_out"}, lambda i, o: 2 / o),
    "xavier_normal": ({}, lambda i, o: 2 / (i + o)),
    "xavier_normal_gain": ({"name": "xavier_normal", "gain": 2.0}, lambda i, o: 4 * 2 / (i + o)),
    "xavier_uniform": ({}, lambda i, o: 2 / (i + o)),
    "lecun_normal": ({}, lambda i, o: 1 / i),
    "normal": ({"variance": 0.0004}, lambda i, o: 0.0004),
    "pytorch_default": ({}, lambda i, o: 1 / (3 * i)),
}


def cfg_for(case):
    overrides, _ = CASES[case]
    return InitCfg(**{"name": case, **overrides})


@pytest.mark.parametrize("layer", [LINEAR, CONV], ids=["linear", "conv"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_empirical_variance_matches_formula(case, layer):
    make, fan_in, fan_out = layer
    module = make()
    cfg = cfg_for(case)
    initialize(module, cfg, seed=0)
    expected = CASES[case][1](fan_in, fan_out)
    w = module.weight.detach()
    assert abs(w.mean().item()) < 0.05 * math.sqrt(expected)
    assert w.var().item() == pytest.approx(expected, rel=0.03)
    kwargs = {k: getattr(cfg, k) for k in ("variance", "mode", "nonlinearity", "gain")}
    assert weight_variance(cfg.name, fan_in, fan_out, **kwargs) == pytest.approx(expected, rel=1e-9)


def test_every_registered_initializer_is_covered():
    assert set(INITIALIZERS) <= {cfg_for(c).name for c in CASES} | {"orthogonal"}


@pytest.mark.parametrize("bias", ["zero", "default"])
@pytest.mark.parametrize("name", sorted(INITIALIZERS))
def test_seeded_bit_identical_and_global_rng_untouched(name, bias):
    cfg = InitCfg(name=name, variance=0.01 if name == "normal" else None, bias=bias)
    a, b, c = small_model(), small_model(), small_model()
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    initialize(a, cfg, seed=7)
    initialize(b, cfg, seed=7)
    initialize(c, cfg, seed=8)
    assert torch.equal(torch.get_rng_state(), rng)
    sa, sb, sc = state(a), state(b), state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["0.weight"], sc["0.weight"])
    assert not torch.equal(sa["9.weight"], sc["9.weight"])
    if bias == "default":
        assert not torch.equal(sa["9.bias"], sc["9.bias"])


def test_biases_zero_by_default_and_bn_reset():
    model = small_model()
    for m in model.modules():  # dirty everything first so the reset is observable
        for p in m.parameters(recurse=False):
            nn.init.constant_(p, 0.3)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(5.0), m.running_var.fill_(5.0)
    initialize(model, InitCfg(name="kaiming_normal"), seed=0)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            assert torch.all(m.bias == 0)
            assert not torch.all(m.weight == 0.3)
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
            assert torch.all(m.running_mean == 0) and torch.all(m.running_var == 1)


@pytest.mark.parametrize("name", ["kaiming_normal", "pytorch_default"])
def test_batchnorm_uniform_is_open_lths_u01_seeded(name):
    """init.batchnorm=uniform: scales from U(0, 1) (open_lth's batchnorm_init='uniform'), shifts 0, fresh running
    statistics, reproducible from the seed; ones leaves PyTorch's BatchNorm init."""
    a, b, c = small_model(), small_model(), small_model()
    for m, seed in ((a, 0), (b, 0), (c, 1)):
        initialize(m, InitCfg(name=name, batchnorm="uniform"), seed=seed)
    bns = [i for i, m in enumerate(a) if isinstance(m, nn.BatchNorm2d)]
    scales = torch.cat([a[i].weight.detach() for i in bns])
    assert (scales >= 0).all() and (scales < 1).all() and len(scales.unique()) == len(scales)
    assert all(torch.all(a[i].bias == 0) and torch.all(a[i].running_var == 1) for i in bns)
    assert all(torch.equal(x, y) for x, y in zip(state(a).values(), state(b).values()))
    assert not torch.equal(a[bns[0]].weight, c[bns[0]].weight)
    ones = small_model()
    initialize(ones, InitCfg(name=name), seed=0)
    assert all(torch.all(ones[i].weight == 1) for i in bns)
    big = nn.BatchNorm2d(20000)
    initialize(big, InitCfg(name=name, batchnorm="uniform"), seed=0)
    assert big.weight.mean().item() == pytest.approx(0.5, abs=0.01)
    assert big.weight.var().item() == pytest.approx(1 / 12, rel=0.05)
    with pytest.raises(ValueError, match="unknown init.batchnorm 'zeros'; accepted: ones, uniform"):
        initialize(small_model(), InitCfg(name=name, batchnorm="zeros"), seed=0)


@pytest.mark.parametrize("name", ["kaiming_normal", "pytorch_default"])
def test_default_bias_distribution(name):
    layer = nn.Linear(100, 20000)  # 20000 biases, bound 1/sqrt(100) = 0.1
    nn.init.zeros_(layer.bias)
    initialize(layer, InitCfg(name=name, bias="default"), seed=0)
    b = layer.bias.detach()
    assert b.abs().max().item() <= 0.1
    assert b.abs().max().item() > 0.099
    assert b.var().item() == pytest.approx(0.1**2 / 3, rel=0.05)


def test_pytorch_default_zero_bias_and_matches_reset_parameters():
    model = small_model()
    initialize(model, InitCfg(name="pytorch_default", bias="zero"), seed=3)
    assert all(torch.all(m.bias == 0) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))

    ours, ref = small_model(), small_model()
    initialize(ours, InitCfg(name="pytorch_default", bias="default"), seed=3)
    torch.manual_seed(3)
    for m in ref.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm2d)):
            m.reset_parameters()
    so, sr = state(ours), state(ref)
    assert all(torch.equal(so[k], sr[k]) for k in so)


@pytest.mark.parametrize("gain", [None, 2.0])
def test_orthogonal_rows_orthonormal(gain):
    layer = nn.Linear(256, 256)
    initialize(layer, InitCfg(name="orthogonal", gain=gain), seed=0)
    w = layer.weight.detach().double()
    g2 = 1.0 if gain is None else gain**2
    assert torch.allclose(w @ w.T, g2 * torch.eye(256, dtype=torch.float64), atol=1e-5)


def test_normal_without_variance_is_a_clear_error():
    with pytest.raises(ValueError, match=r"init.variance=<float>, e.g. init.variance=0.02"):
        initialize(nn.Linear(4, 4), InitCfg(name="normal"), seed=0)
    with pytest.raises(ValueError, match=r"-0.5"):
        initialize(nn.Linear(4, 4), InitCfg(name="normal", variance=-0.5), seed=0)
    with pytest.raises(ValueError, match=r"init.variance=0"):
        initialize(nn.Linear(4, 4), InitCfg(name="normal", variance=0.0), seed=0)


def test_unknown_name_lists_accepted():
    with pytest.raises(ValueError) as err:
        initialize(nn.Linear(4, 4), InitCfg(name="glorot_magic"), seed=0)
    msg = str(err.value)
    assert "unknown initializer 'glorot_magic'" in msg
    assert str(sorted(INITIALIZERS)) in msg and "init._target_" in msg


def test_bad_bias_option():
    with pytest.raises(ValueError, match="bias"):
        initialize(nn.Linear(4, 4), InitCfg(bias="ones"), seed=0)


@pytest.mark.parametrize("as_", ["dataclass", "dictconfig", "dict"])
def test_target_callable_without_generator(as_):
    fields = dict(name="kaiming_normal", variance=None, mode="fan_in", nonlinearity="relu", gain=None,
                  bias="zero", _target_="torch.nn.init.ones_")
    cfg = {"dataclass": lambda: InitCfg(**fields), "dictconfig": lambda: OmegaConf.create(fields), "dict": lambda: fields}[as_]()
    model = small_model()
    initialize(model, cfg, seed=0)
    assert all(torch.all(m.weight == 1) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def test_target_gets_generator_and_only_accepted_kwargs():
    # kaiming_normal_ takes mode/nonlinearity/generator but not variance/gain: passing those would raise
    cfg = InitCfg(name="ignored", mode="fan_out", nonlinearity="linear", gain=3.0, variance=9.0,
                  _target_="torch.nn.init.kaiming_normal_")
    a, b = nn.Conv2d(128, 256, 3), nn.Conv2d(128, 256, 3)
    rng = torch.get_rng_state()
    initialize(a, cfg, seed=1)
    initialize(b, cfg, seed=1)
    assert torch.equal(torch.get_rng_state(), rng)  # the generator was used, not the global RNG
    assert torch.equal(a.weight, b.weight)
    assert a.weight.var().item() == pytest.approx(1 / (256 * 9), rel=0.03)


def test_registered_user_initializer():
    seen = {}

    def halves(weight, *, generator, gain=1.0):
        seen["generator"] = generator
        weight.fill_(0.5 * gain)

    register_initializer("test_halves")(halves)
    try:
        with pytest.raises(ValueError, match="test_halves"):
            register_initializer("test_halves")(halves)
        model = small_model()
        initialize(model, OmegaConf.create({"name": "test_halves", "gain": 4.0, "variance": None, "bias": "zero"}), seed=0)
        assert isinstance(seen["generator"], torch.Generator)
        assert all(torch.all(m.weight == 2.0) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    finally:
        INITIALIZERS.pop("test_halves", None)


def test_weight_variance_rejects_what_it_cannot_know():
    with pytest.raises(ValueError):
        weight_variance("orthogonal", 10, 10)
    with pytest.raises(ValueError, match="init.variance"):
        weight_variance("normal", 10, 10)
