"""Training FLOPs from the shapes and the masks (lottery.training.cost): hand-computed counts for LeNet-300-100, Conv-2 on 32x32
and strided, unpadded and grouped convolutions, sparse counts from the masks, RigL's 3x (and 2 f_S + f_D) per step."""
import pytest
import torch
from torch import nn

from lottery.training import cost
from lottery.models import build_model

LENET_MACS = 784 * 300 + 300 * 100 + 100 * 10


def random_masks(model, keep, seed=0):
    """{name: mask} keeping exactly keep[name] random entries of each named weight."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    out = {}
    for name, k in keep.items():
        flat = torch.zeros(params[name].numel())
        flat[torch.randperm(flat.numel(), generator=g)[:k]] = 1
        out[name] = flat.view_as(params[name])
    return out


def test_lenet_300_100_dense_and_sparse_by_hand():
    model = build_model("lenet_300_100", (1, 28, 28), 10)
    info = cost.model_info(model, (1, 28, 28))
    assert [(l.name, l.positions, l.numel) for l in info.layers] == [
        ("hidden.0.weight", 1, 784 * 300), ("hidden.1.weight", 1, 300 * 100), ("out.weight", 1, 100 * 10)]
    assert cost.macs(info) == info.dense_macs == LENET_MACS == 266_200
    assert cost.forward_flops(info) == 2 * LENET_MACS
    assert cost.step_flops(info, batch_size=60) == 3 * 2 * LENET_MACS * 60
    # sparse: the kept weights of each masked layer; the output layer unmasked (excluded) counts dense
    masks = random_masks(model, {"hidden.0.weight": 23_520, "hidden.1.weight": 3_000})
    assert cost.macs(info, masks) == 23_520 + 3_000 + 1_000
    assert cost.forward_flops(info, masks) == 2 * (23_520 + 3_000 + 1_000)
    assert cost.training_flops(info, masks, steps=100, batch_size=60) == 100 * 60 * 3 * 2 * (23_520 + 3_000 + 1_000)
    # densities instead of masks: the same count
    dens = {n: int(m.sum()) / m.numel() for n, m in masks.items()}
    assert cost.macs(info, dens) == pytest.approx(23_520 + 3_000 + 1_000, rel=1e-12)
    # RigL's update step: the weight gradient dense, 2 f_S + f_D
    f_s, f_d = 2 * (23_520 + 3_000 + 1_000), 2 * LENET_MACS
    assert cost.step_flops(info, masks, 60, dense_weight_grad=True) == (2 * f_s + f_d) * 60


def test_conv2_on_32x32_by_hand():
    model = build_model("conv2", (3, 32, 32), 10)
    info = cost.model_info(model, (3, 32, 32))
    # padding=1 keeps 32x32: 32*32*3*3*C_in*C_out per conv; a 2x2 max-pool, then 16*16*64 inputs to the first fc
    expected = {"convs.0.weight": 32 * 32 * 3 * 3 * 3 * 64, "convs.1.weight": 32 * 32 * 3 * 3 * 64 * 64,
                "fcs.0.weight": 16 * 16 * 64 * 256, "fcs.1.weight": 256 * 256, "out.weight": 256 * 10}
    assert {l.name: l.macs for l in info.layers} == expected
    assert info.dense_macs == sum(expected.values())
    # a conv at density d costs d of its MACs: 1024 positions times its kept weights
    masks = random_masks(model, {"convs.1.weight": 3_686, "fcs.0.weight": 41_943})
    assert cost.macs(info, masks) == (expected["convs.0.weight"] + 1024 * 3_686 + 41_943 + expected["fcs.1.weight"]
                                      + expected["out.weight"])


def test_strided_unpadded_and_grouped_convolutions_and_a_module_used_twice():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, stride=2)  # 9x9 -> 4x4
            self.b = nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=False)  # 4x4, weight 8 x 2 x 3 x 3
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 8)  # called twice
            self.out = nn.Linear(8, 5)

        def forward(self, x):
            x = self.bn(self.b(self.a(x))).mean((2, 3))
            return self.out(self.fc(torch.relu(self.fc(x))))

    model = Net().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = cost.model_info(model, (3, 9, 9))
    assert {l.name: (l.positions, l.numel) for l in info.layers} == {
        "a.weight": (16, 4 * 3 * 3 * 3), "b.weight": (16, 8 * 2 * 3 * 3), "fc.weight": (2, 64), "out.weight": (1, 40)}
    assert info.dense_macs == 16 * 108 + 16 * 144 + 2 * 64 + 40
    # the model is untouched: its device, mode, statistics; no hooks left on it
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())


def test_sparse_flops_scale_with_the_masks():
    model = build_model("resnet20", (3, 32, 32), 10)
    info = cost.model_info(model, (3, 32, 32))
    names = [l.name for l in info.layers]
    assert len(names) == 22 and names[0] == "conv.weight" and names[-1] == "out.weight"  # 19 convs, 2 shortcuts, fc
    params = dict(model.named_parameters())
    dense = cost.forward_flops(info)
    for d in (0.5, 0.1, 0.02):  # every layer at exactly d: d of the dense FLOPs
        masks = random_masks(model, {n: round(d * params[n].numel()) for n in names})
        exact = 2 * sum(l.positions * round(d * l.numel) for l in info.layers)
        assert cost.forward_flops(info, masks) == exact
        assert exact == pytest.approx(d * dense, rel=1e-3)
    # one layer's mask halved: only its share of the FLOPs halves
    half = random_masks(model, {"stage3.2.conv2.weight": params["stage3.2.conv2.weight"].numel() // 2})
    layer = next(l for l in info.layers if l.name == "stage3.2.conv2.weight")
    assert cost.macs(info) - cost.macs(info, half) == layer.positions * (layer.numel - layer.numel // 2)


def test_training_cost_adds_up_levels_and_mask_updates():
    model = build_model("lenet_300_100", (1, 28, 28), 10)
    info = cost.model_info(model, (1, 28, 28))
    total = cost.TrainingCost(info, batch_size=60)
    total.add(1000)  # level 0: dense
    masks = random_masks(model, {"hidden.0.weight": 47_040, "hidden.1.weight": 6_000, "out.weight": 500})
    total.add(1000, masks)  # level 1
    total.add(100, masks, dense_weight_grad_steps=10)  # a dynamic sparse stretch with 10 update steps
    f_d, f_s = 2 * LENET_MACS, 2 * (47_040 + 6_000 + 500)
    assert total.record() == {
        "steps": 2100, "train_flops_dense": 2100 * 3 * f_d * 60,
        "train_flops_sparse": (1000 * 3 * f_d + 1000 * 3 * f_s + 90 * 3 * f_s + 10 * (2 * f_s + f_d)) * 60}
    with pytest.raises(ValueError, match="dense_weight_grad_steps"):
        total.add(5, masks, dense_weight_grad_steps=6)

