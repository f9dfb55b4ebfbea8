import copy

import pytest
import torch
import torch.nn as nn

from lottery.models import MODELS, build_model, register_model

MNIST, CIFAR = (1, 28, 28), (3, 32, 32)
KWARGS = {"mlp": {"hidden": [32, 16]}, "deep_mlp": {"depth": 4, "width": 32}}


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def weights(m, kind):
    return [mod.weight.numel() for mod in m.modules() if isinstance(mod, kind)]


def test_all_expected_models_registered():
    expected = {"mlp", "lenet_300_100", "deep_mlp", "conv2", "conv4", "conv6", "vgg11", "vgg16", "vgg19", "resnet20"}
    assert expected <= set(MODELS)


# The built-in models only: other test modules register their own (tiny_convbn, constant_prediction) when they are
# imported or run, and a parametrization must not depend on which ran first (pytest-xdist collects in every worker).
BUILTIN = sorted(n for n, build in MODELS.items() if getattr(build, "__module__", "").startswith("lottery."))


@pytest.mark.parametrize("shape", [MNIST, CIFAR], ids=["mnist", "cifar"])
@pytest.mark.parametrize("name", BUILTIN)
def test_forward_backward(name, shape):
    torch.manual_seed(0)
    model = build_model(name, shape, 10, **KWARGS.get(name, {}))
    x = torch.randn(3, *shape)
    y = model(x)
    assert y.shape == (3, 10)
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", BUILTIN)
def test_model_rules(name):
    model = build_model(name, CIFAR, 7, **KWARGS.get(name, {}))
    allowed = (nn.Linear, nn.Conv2d, nn.BatchNorm2d)
    for mod_name, mod in model.named_modules():
        if any(True for _ in mod.parameters(recurse=False)):
            assert type(mod) in allowed, f"{mod_name} is {type(mod).__name__}"
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    last_name, last = linears[-1]
    assert last_name == "out" and last.out_features == 7
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("name", BUILTIN)
def test_deepcopy_is_independent(name):
    model = build_model(name, MNIST, 10, **KWARGS.get(name, {}))
    clone = copy.deepcopy(model)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), clone.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()
    x = torch.randn(2, *MNIST)
    model.eval(), clone.eval()
    assert torch.equal(model(x), clone(x))


def test_lenet_layer_sizes():
    m = build_model("lenet_300_100", MNIST, 10)
    assert weights(m, nn.Linear) == [784 * 300, 300 * 100, 100 * 10]
    assert n_params(m) == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert [n for n, _ in m.named_modules() if n] == ["hidden", "hidden.0", "hidden.1", "out"]


def test_lenet_rejects_other_hidden():
    build_model("lenet_300_100", MNIST, 10, hidden=None)
    build_model("lenet_300_100", MNIST, 10, hidden=[300, 100])
    with pytest.raises(ValueError, match="lenet_300_100"):
        build_model("lenet_300_100", MNIST, 10, hidden=[300, 50])


def test_mlp_needs_hidden_and_uses_it():
    m = build_model("mlp", MNIST, 10, hidden=[50, 40, 30])
    assert weights(m, nn.Linear) == [784 * 50, 50 * 40, 40 * 30, 30 * 10]
    with pytest.raises(TypeError):
        build_model("mlp", MNIST, 10)


def test_deep_mlp_defaults_to_50_by_100():
    m = build_model("deep_mlp", MNIST, 10)
    assert weights(m, nn.Linear) == [784 * 100] + [100 * 100] * 49 + [100 * 10]
    m = build_model("deep_mlp", MNIST, 10, hidden=[20, 30])
    assert weights(m, nn.Linear) == [784 * 20, 20 * 30, 30 * 10]


# Frankle & Carbin Figure 2, CIFAR-10 input 3x32x32: (conv widths, flattened size after the pools)
CONV_PLANS = {
    "conv2": ([(3, 64), (64, 64)], 64 * 16 * 16),
    "conv4": ([(3, 64), (64, 64), (64, 128), (128, 128)], 128 * 8 * 8),
    "conv6": ([(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256)], 256 * 4 * 4),
}


@pytest.mark.parametrize("name", sorted(CONV_PLANS))
def test_conv_layer_sizes(name):
    convs, flat = CONV_PLANS[name]
    conv_w = [cin * cout * 9 for cin, cout in convs]
    fc = [(flat, 256), (256, 256), (256, 10)]
    fc_w = [a * b for a, b in fc]
    m = build_model(name, CIFAR, 10)
    assert weights(m, nn.Conv2d) == conv_w
    assert weights(m, nn.Linear) == fc_w
    biases = sum(cout for _, cout in convs) + sum(b for _, b in fc)
    assert n_params(m) == sum(conv_w) + sum(fc_w) + biases
    assert not any(isinstance(x, nn.BatchNorm2d) for x in m.modules())


def test_conv_spot_values_cifar():
    # literal numbers, not derived from the plan table above
    assert weights(build_model("conv2", CIFAR, 10), nn.Conv2d) + weights(build_model("conv2", CIFAR, 10), nn.Linear) == [
        1728, 36864, 4194304, 65536, 2560]
    assert n_params(build_model("conv2", CIFAR, 10)) == 4301642
    assert n_params(build_model("conv4", CIFAR, 10)) == 2425930
    assert n_params(build_model("conv6", CIFAR, 10)) == 2262602


def test_conv_mnist_flatten():
    # 28 -> 14 -> 7 -> 3 through three pools
    assert weights(build_model("conv6", MNIST, 10), nn.Linear)[0] == 256 * 3 * 3 * 256
    assert weights(build_model("conv2", MNIST, 10), nn.Conv2d)[0] == 1 * 64 * 9


@pytest.mark.parametrize("width", [16, 8])
def test_resnet20_parameter_count(width):
    w, k = width, 10
    conv = lambda cin, cout, ks=3: cin * cout * ks * ks  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    total = conv(3, w) + bn(w)
    c_in = w
    for c in (w, 2 * w, 4 * w):
        for b in range(3):
            cin = c_in if b == 0 else c
            total += conv(cin, c) + bn(c) + conv(c, c) + bn(c)
            if cin != c:
                total += conv(cin, c, 1) + bn(c)
        c_in = c
    total += 4 * w * k + k
    m = build_model("resnet20", CIFAR, k, width=width)
    assert n_params(m) == total
    if width == 16:
        assert total == 272474  # about 0.27M, as in He et al.


def test_resnet20_structure():
    m = build_model("resnet20", CIFAR, 10)
    names = dict(m.named_parameters())
    assert "stage2.0.shortcut.0.weight" in names and "stage3.0.shortcut.1.weight" in names
    assert not any("shortcut" in n for n in names if n.startswith(("stage1", "stage2.1", "stage3.2")))
    assert all(c.bias is None for c in m.modules() if isinstance(c, nn.Conv2d))
    assert len([c for c in m.modules() if isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3)]) == 19


def test_vgg_conv_counts():
    for name, n_conv in [("vgg11", 8), ("vgg16", 13), ("vgg19", 16)]:
        m = build_model(name, CIFAR, 10)
        convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
        bns = [c for c in m.modules() if isinstance(c, nn.BatchNorm2d)]
        assert len(convs) == len(bns) == n_conv
        assert convs[0].in_channels == 3 and convs[-1].out_channels == 512
        assert m.out.in_features == 512


def test_unknown_name_lists_accepted():
    with pytest.raises(ValueError) as err:
        build_model("resnet9000", CIFAR, 10)
    msg = str(err.value)
    assert "unknown model 'resnet9000'" in msg
    assert f"accepted: {', '.join(sorted(MODELS))}" in msg


def test_none_kwargs_dropped_and_unknown_kwargs_rejected():
    build_model("conv2", CIFAR, 10, hidden=None, width=None, depth=None)
    with pytest.raises(TypeError):
        build_model("conv2", CIFAR, 10, width=16)


def test_duplicate_registration_rejected():
    with pytest.raises(ValueError, match="conv2"):
        register_model("conv2")(lambda input_shape, num_classes: nn.Linear(1, 1))
    assert MODELS["conv2"].__name__ == "conv2"
