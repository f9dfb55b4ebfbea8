"""pruning.granularity: channel and N:M masks against hand-made cases (whole filters with their bias and BatchNorm
entries, exactly n of every m), exact channel counts, the entries staying zero through training with SGD (momentum,
weight decay) and Adam, the criteria x controls matrix and replicas through the real driver on a tiny conv-BN
network, the structured FLOPs count against a hand count, and the collapse check of pruning at init before the
first write."""
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lottery import masks as M
from lottery import pruning
from lottery.experiment import run_experiment
from lottery.experiment.check import checked
from lottery.models import MODELS, register_model
from lottery.pruning import granularity as G
from lottery.training import cost

from conftest import synthetic_split, tiny_cfg, train_one


class TinyConvBN(nn.Module):
    """conv-BN-ReLU-pool twice, a hidden Linear, the classifier: conv->conv, conv->flatten->Linear, Linear->Linear."""

    def __init__(self, c_in=3, num_classes=10, width=8, hidden=16):
        super().__init__()
        self.c1 = nn.Conv2d(c_in, width, 3, padding=1)
        self.b1 = nn.BatchNorm2d(width)
        self.c2 = nn.Conv2d(width, width, 3, padding=1)
        self.b2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width * 2 * 2, hidden)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.b1(self.c1(x))), 4)
        x = nn.functional.max_pool2d(torch.relu(self.b2(self.c2(x))), 4)
        return self.out(torch.relu(self.fc(x.flatten(1))))


if "tiny_convbn" not in MODELS:
    @register_model("tiny_convbn")
    def _tiny(input_shape, num_classes, **_):
        return TinyConvBN(input_shape[0], num_classes)

CONVBN = ["model.name=tiny_convbn", "dataset.synthetic_shape=cifar10", "train.duration=20it", "train.eval_every=20it",
          "pruning.exclude=[]"]
COMPANIONS = {"c1.weight": ["c1.bias", "b1.weight", "b1.bias"], "c2.weight": ["c2.bias", "b2.weight", "b2.bias"],
              "fc.weight": ["fc.bias"]}


def _pcfg(**kw):
    base = dict(criterion={"name": "magnitude"}, scope="layerwise", when="after_training", levels=2, target=None,
                one_shot=False, rounds=1, rate=0.5, rates={}, layer_rates={}, exclude=[], prune_biases=False,
                prune_batchnorm=False, granularity="channel", n=2, m=4, group_score="sum")
    return OmegaConf.create({**base, **kw})


def _prune(model, pcfg, masks=None, **kw):
    prunable = M.prunable_tensors(model, pcfg)
    masks = masks if masks is not None else M.ones(model, prunable)
    return pruning.prune(model, masks, prunable, pcfg, batches=iter([]), generator=torch.Generator().manual_seed(0),
                         **kw)


def _rows(m):
    return m.reshape(m.shape[0], -1)


def _assert_channel_masks(masks, counts=None):
    for w, comps in COMPANIONS.items():
        rows = _rows(masks[w])
        assert ((rows == 0).all(dim=1) | (rows == 1).all(dim=1)).all(), w  # whole filters only
        ch = rows[:, 0]
        for c in comps:
            assert torch.equal(masks[c], ch), c
        if counts is not None:
            assert int(ch.sum()) == counts[w]
    assert "out.weight" not in masks and "out.bias" not in masks  # never an output neuron (a class)


# --- channel ---------------------------------------------------------------------------------------------------------

def test_channel_companions_found_by_structure():
    assert M.channel_companions(TinyConvBN()) == {**COMPANIONS, "out.weight": ["out.bias"]}
    names = [p.name for p in M.prunable_tensors(TinyConvBN(), _pcfg(prune_biases=True, prune_batchnorm=True))]
    assert names == ["c1.weight", "c2.weight", "fc.weight"]  # biases and BN follow their channel; output kept


def test_channel_masks_zero_whole_filters_with_bias_and_batchnorm():
    torch.manual_seed(0)
    model = TinyConvBN()
    masks = _prune(model, _pcfg(rate=0.3))
    _assert_channel_masks(masks, {"c1.weight": 6, "c2.weight": 6, "fc.weight": 11})  # 8 - round(2.4), 16 - 5
    # the kept filters are the ones with the largest sum of |w|
    s = model.c1.weight.detach().abs().reshape(8, -1).sum(1)
    assert set(_rows(masks["c1.weight"])[:, 0].nonzero().squeeze(1).tolist()) == set(s.topk(6).indices.tolist())
    M.apply(model, masks)
    dead = (masks["c1.bias"] == 0).nonzero().squeeze(1)
    for p in (model.c1.weight[dead], model.c1.bias[dead], model.b1.weight[dead], model.b1.bias[dead]):
        assert (p == 0).all()
    model.train()
    x = torch.randn(4, 3, 32, 32)
    assert (model.b1(model.c1(x))[:, dead] == 0).all()  # a removed channel outputs exactly zero, BN included
    model.eval()
    assert (model.b1(model.c1(x))[:, dead] == 0).all()


def test_channel_scores_sum_l1_l2():
    s = {"w": torch.tensor([[3.0, -4.0], [1.0, 1.0], [-2.0, 0.0]])}
    assert torch.equal(G.channel_scores(s, ["w"], "sum")["w"], torch.tensor([-1.0, 2.0, -2.0]))
    assert torch.equal(G.channel_scores(s, ["w"], "l1")["w"], torch.tensor([7.0, 2.0, 2.0]))
    assert torch.equal(G.channel_scores(s, ["w"], "l2")["w"], torch.tensor([5.0, 2 ** 0.5, 2.0]))
    with pytest.raises(ValueError, match="unknown pruning.group_score 'max'; accepted: sum, l1, l2"):
        G.channel_scores(s, ["w"], "max")


@pytest.mark.parametrize("scope", ["layerwise", "global"])
def test_channel_counts_exact_over_levels_and_ties_stable(scope):
    model = TinyConvBN()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)  # every channel of a layer ties: the lower indices go first, as in the shared selection
        model.c1.weight.fill_(10.0)  # global: c1's 27-weight filters would otherwise go first and collapse the layer
    pcfg = _pcfg(scope=scope, rate=0.2)
    masks = None
    total = 8 + 8 + 16
    per_layer = {"c1.weight": 8, "c2.weight": 8, "fc.weight": 16}
    for _ in range(3):
        masks = _prune(model, pcfg, masks)
        kept = {n: int(_rows(masks[n])[:, 0].sum()) for n in per_layer}
        if scope == "layerwise":
            per_layer = {n: a - pruning.round_half_up(0.2 * a) for n, a in per_layer.items()}
            assert kept == per_layer
            for n, k in kept.items():  # ties: the highest-index channels stay
                assert _rows(masks[n])[:, 0].tolist() == [0.0] * (_rows(masks[n]).shape[0] - k) + [1.0] * k
        else:
            total -= pruning.round_half_up(0.2 * total)
            assert sum(kept.values()) == total
        _assert_channel_masks(masks)


def test_channel_global_collapse_counts_channels():
    model = TinyConvBN()
    with torch.no_grad():
        model.c2.weight.mul_(1e-6)
    with pytest.raises(ValueError, match="would remove every channel of 'c2.weight'"):
        _prune(model, _pcfg(scope="global"), keep_fraction=0.3)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_channel_entries_stay_zero_through_training(opt):
    """Masker (the one masking place) covers the companions: SGD's momentum and weight decay and Adam's moments do not
    revive a removed channel's filter, bias or BatchNorm scale and shift."""
    torch.manual_seed(0)
    model = TinyConvBN()
    masks = _prune(model, _pcfg(rate=0.5))
    M.apply(model, masks)
    over = ["optimizer=sgd", "optimizer.momentum=0.9", "optimizer.weight_decay=0.01", "optimizer.lr=0.5"] \
        if opt == "sgd" else ["optimizer=adam", "optimizer.weight_decay=0.01", "optimizer.lr=0.05"]
    cfg = tiny_cfg(*over, "train.duration=6it", "train.eval_every=6it")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_one(model, masks, synthetic_split("cifar10", n_train=128, n_test=32, val_size=32), cfg)
    params = dict(model.named_parameters())
    for n, m in masks.items():
        assert (params[n][m == 0] == 0).all(), n
        assert not torch.equal(params[n][m != 0], before[n][m != 0]), n  # the kept entries did train
    assert not torch.equal(params["out.weight"], before["out.weight"])


# --- N:M -------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (3, 8)])
def test_nm_exactly_n_in_every_block_of_m(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    lin = torch.rand(6, 16, generator=g)
    conv = torch.rand(5, 8, 3, 3, generator=g)
    for s in (lin, conv):
        mask = G.nm_select(s, torch.ones_like(s), n, m)
        assert int(mask.sum()) == s.numel() * n // m and G.nm_counts_ok(mask, n, m)
    # linear: blocks run along the input dimension, the n highest of each kept
    mask = G.nm_select(lin, torch.ones_like(lin), n, m)
    blocks = lin.reshape(6, 16 // m, m)
    expect = torch.zeros_like(blocks).scatter_(-1, blocks.topk(n, dim=-1).indices, 1.0).reshape(6, 16)
    assert torch.equal(mask, expect)
    # conv: blocks of m input channels at each kernel position
    mask = G.nm_select(conv, torch.ones_like(conv), n, m)
    assert ((mask.reshape(5, 8 // m, m, 3, 3).sum(dim=2)) == n).all()


def test_nm_ties_and_survivors_only():
    s = torch.ones(2, 8)
    assert G.nm_select(s, torch.ones_like(s), 2, 4).tolist() == [[0, 0, 1, 1] * 2] * 2  # ties: higher index stays
    alive = torch.tensor([[1.0, 1, 0, 0, 1, 1, 1, 1]])
    scores = torch.tensor([[0.1, 0.2, 9.0, 9.0, 0.4, 0.3, 0.2, 0.1]])  # pruned entries with high scores stay pruned
    assert G.nm_select(scores, alive, 2, 4).tolist() == [[1, 1, 0, 0, 1, 1, 0, 0]]


def test_nm_prune_keeps_output_layer_structure_and_refuses_bad_shapes():
    torch.manual_seed(0)
    model = TinyConvBN()
    pcfg = _pcfg(granularity="nm", n=2, m=4, exclude=["c1.weight"])  # c1 has 3 input channels
    masks = _prune(model, pcfg)
    assert set(masks) == {"c2.weight", "fc.weight", "out.weight"}
    assert all(G.nm_counts_ok(m, 2, 4) for m in masks.values())
    with pytest.raises(ValueError, match=r"multiple of pruning.m=4, but 'c1.weight' has shape \[8, 3, 3, 3\]"):
        _prune(model, _pcfg(granularity="nm"))


# --- configuration checks -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("over,match", [
    (["pruning.granularity=blocks"], "unknown pruning.granularity 'blocks'; accepted: unstructured, channel, nm"),
    (["pruning.granularity=nm", "pruning.levels=3"], "not by IMP levels; set pruning.one_shot=true"),
    (["pruning.granularity=nm", "pruning.one_shot=true", "pruning.target=0.3"], "set pruning.target=null or 0.5"),
    (["pruning.granularity=nm", "pruning.one_shot=true", "pruning.n=4", "pruning.m=4"], "1 <= n < m, got 4:4"),
    (["pruning.granularity=channel", "model=resnet20"], "shortcuts of model=resnet20"),
    (["pruning.granularity=channel", "dst=set"], "dst=set grows and drops single weights"),
    (["pruning.granularity=channel", "pruning=global", "pruning.scope=erk"], "pruning.scope=erk is a density"),
    (["pruning.group_score=max"], "unknown pruning.group_score 'max'"),
    (["pruning.granularity=nm", "pruning.one_shot=true", "method=early_bird", "pruning=global", "pruning.target=0.5"],
     "early-bird tickets are drawn per weight or per channel, not with pruning.granularity=nm"),
    (["pruning.granularity=channel", "method=gmp", "pruning=global"], "dst=gmp prunes single weights gradually"),
])
def test_bad_granularity_settings_refused_in_one_line(over, match):
    with pytest.raises(ValueError, match=match) as e:
        checked(tiny_cfg(*over))
    assert "\n" not in str(e.value)


# --- through the driver: criteria x controls, replicas ------------------------------------------------------------

def _spy(monkeypatch):
    from lottery.experiment import units
    seen = {}
    original = units._train

    def spy(group, *args):
        for job, _ in group:
            seen[(job.level, job.branch)] = ({n: p.detach().clone() for n, p in job.model.named_parameters()},
                                             {n: m.clone() for n, m in job.masks.items()})
        return original(group, *args)

    monkeypatch.setattr(units, "_train", spy)
    return seen


CRITERIA_RUNS = {"magnitude": ["pruning.one_shot=true"], "snip": ["method=snip", "pruning.one_shot=true"],
                 "synflow": ["method=synflow", "pruning.one_shot=true", "pruning.rounds=5"],
                 "random": ["method=random", "pruning.one_shot=true"]}


@pytest.mark.parametrize("criterion", sorted(CRITERIA_RUNS))
@pytest.mark.parametrize("granularity", ["channel", "nm"])
def test_granularity_x_criterion_x_controls(granularity, criterion, tmp_path, monkeypatch):
    seen = _spy(monkeypatch)
    over = ["pruning.granularity=channel", "pruning.target=0.5"] if granularity == "channel" else \
        ["pruning.granularity=nm", "pruning.exclude=[c1.weight]"]
    records = run_experiment(tiny_cfg(*CONVBN, *CRITERIA_RUNS[criterion], *over,
                                      "pruning.branches=[reinit,random_prune,shuffle]"), tmp_path / "r")
    units = {b: seen[(1, b)] for b in ("ticket", "reinit", "random_prune", "shuffle")}
    _, ticket = units["ticket"]
    for branch, (weights, masks) in units.items():
        assert set(masks) == set(ticket)
        if granularity == "channel":
            _assert_channel_masks(masks, {"c1.weight": 4, "c2.weight": 4, "fc.weight": 8})
        else:
            assert set(masks) == {"c2.weight", "fc.weight", "out.weight"}
            assert all(G.nm_counts_ok(m, 2, 4) for m in masks.values())
        for n, m in masks.items():
            assert (weights[n][m == 0] == 0).all(), (branch, n)  # the unit starts with its pruned entries zero
    assert all(torch.equal(units["reinit"][1][n], ticket[n]) for n in ticket)
    for control in ("random_prune", "shuffle"):
        assert any(not torch.equal(units[control][1][n], ticket[n]) for n in ticket), control
    level1 = [r for r in records if r["level"] == 1]
    if granularity == "channel":
        assert all(r["channels_remaining"] == {"c1.weight": 4, "c2.weight": 4, "fc.weight": 8} for r in level1)
    assert all(r["weights_remaining"] == 0.5 for r in level1)


@pytest.mark.parametrize("granularity", ["channel", "nm"])
def test_replicas_interleaved_equal_single_runs(granularity, tmp_path):
    args = [*CONVBN, "pruning.branches=[random_prune]", *(
        ["pruning.granularity=channel", "pruning.levels=2"] if granularity == "channel" else
        ["pruning.granularity=nm", "pruning.one_shot=true", "pruning.exclude=[c1.weight]"])]
    run_experiment(tiny_cfg(*args, "replicas=[0,1]", "replica_batching=interleaved"), tmp_path / "many")
    skip = ("device_info", "wall_time_s")
    for s in (0, 1):
        one = run_experiment(tiny_cfg(*args, f"seed={s}"), tmp_path / f"one_{s}")
        many = json.loads((tmp_path / "many" / f"replicate_{s}" / "summary.json").read_text())
        assert [{k: v for k, v in r.items() if k not in skip} for r in many] == \
            [{k: v for k, v in r.items() if k not in skip} for r in one]
        a = torch.load(tmp_path / "many" / f"replicate_{s}" / "levels" / "level_1" / "ticket.pt")
        b = torch.load(tmp_path / f"one_{s}" / "levels" / "level_1" / "ticket.pt")
        assert all(torch.equal(a["masks"][n], b["masks"][n]) for n in b["masks"])


# --- cost ------------------------------------------------------------------------------------------------------------

def test_structured_flops_hand_count():
    """c1: 8 filters of 3x3x3 on 32x32 positions; c2: 8 of 8x3x3 on 8x8; fc: 16 x 32 (8 channels x 2x2); out: 10 x 16.
    Removing c1 channels {0, 1, 2} removes c2's inputs 0-2; removing c2 channels {7} removes fc's inputs 28-31;
    removing fc neurons {0..5} removes out's inputs 0-5."""
    model = TinyConvBN()
    info = cost.model_info(model, (3, 32, 32))
    masks = {"c1.weight": torch.ones(8, 3, 3, 3), "c2.weight": torch.ones(8, 8, 3, 3), "fc.weight": torch.ones(16, 32)}
    masks["c1.weight"][:3] = 0
    masks["c2.weight"][7] = 0
    masks["fc.weight"][:6] = 0
    masks["fc.weight"][10, 5] = 0  # one more single weight, inside a kept neuron and a kept input
    c1 = 1024 * (5 * 27)
    c2 = 64 * (7 * 5 * 9)  # 7 kept filters x 5 live input channels x 3x3
    fc = 1 * (10 * 28 - 1)  # 10 kept neurons x 28 live inputs (7 channels x 2x2), minus the single weight
    out = 1 * (10 * 10)  # 10 classes x 10 live inputs (the output layer is not masked)
    assert cost.macs(info, masks, structured=True) == c1 + c2 + fc + out
    unstructured = 1024 * 5 * 27 + 64 * 7 * 72 + (10 * 32 - 1) + 160
    assert cost.macs(info, masks) == unstructured  # unchanged without structured
    assert cost.step_flops(info, masks, 4, structured=True) == 3 * 2 * (c1 + c2 + fc + out) * 4
    with pytest.raises(ValueError, match="structured count needs the masks"):
        cost.macs(info, {"c1.weight": 0.5}, structured=True)


def test_channel_run_records_structured_flops(tmp_path):
    """LeNet-300-100 pruned to 80% of its hidden neurons: hidden.1 and the output lose the inputs of removed
    neurons."""
    records = run_experiment(tiny_cfg("pruning.granularity=channel", "pruning.levels=2", "pruning.branches=[]",
                                      "train.duration=20it", "train.eval_every=20it"), tmp_path / "r")
    r = records[-1]
    assert r["channels_remaining"] == {"hidden.0.weight": 240, "hidden.1.weight": 80}
    assert r["weights_remaining_count"] == 240 * 784 + 80 * 300
    macs = 240 * 784 + 80 * 240 + 10 * 80
    assert r["train_flops"] == 20 * 3 * 2 * macs * 32
    assert r["train_flops_dense"] == 20 * 3 * 2 * (784 * 300 + 300 * 100 + 100 * 10) * 32


# --- collapse before the first write ---------------------------------------------------------------------------------

def test_pruning_at_init_collapse_refused_before_any_write(tmp_path):
    """The command of issue 27: global magnitude at init to 0.01% empties a layer, which the seed alone decides; the
    refusal comes before init.pt and config.yaml are written, so the corrected command runs in the same folder."""
    common = ["method=magnitude_init", "pruning=global", "pruning.one_shot=true", "pruning.branches=[]",
              "train.duration=10it", "train.eval_every=10it"]
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="would remove every weight of 'hidden.0.weight' \\(layer collapse\\)"):
        run_experiment(tiny_cfg(*common, "pruning.target=0.0001"), run)
    assert not (run / "init.pt").exists() and not (run / "config.yaml").exists()
    records = run_experiment(tiny_cfg(*common, "pruning.target=0.05"), run)
    assert records[-1]["weights_remaining_count"] == pruning.round_half_up(0.05 * 265200)  # out.weight excluded


def test_channel_collapse_at_init_refused_before_any_write(tmp_path):
    """Global channel pruning at init: the channel scores decided in memory, the refusal counts channels (the sum of
    |w| over a 27-weight filter of c1 loses against c2's 72-weight filters), then the corrected run in the folder."""
    common = [*CONVBN, "method=magnitude_init", "pruning=global", "pruning.granularity=channel",
              "pruning.one_shot=true", "pruning.target=0.2", "pruning.branches=[]"]
    run = tmp_path / "r"
    with pytest.raises(ValueError, match="18.8% of the channels would remove every channel of 'c1.weight'"):
        run_experiment(tiny_cfg(*common), run)
    assert not (run / "init.pt").exists() and not (run / "config.yaml").exists()
    records = run_experiment(tiny_cfg(*common, "pruning.scope=layerwise"), run)
    assert records[-1]["channels_remaining"] == {"c1.weight": 2, "c2.weight": 2, "fc.weight": 3}


def test_channel_pruning_at_init_from_dense_has_imps_channel_counts(tmp_path):
    """method=random (from_dense: every level prunes the dense network to IMP's count at that level) counts channels:
    level L keeps IMP's layerwise channel counts after L levels at pruning.rates.linear / conv."""
    records = run_experiment(tiny_cfg(*CONVBN, "method=random", "pruning.granularity=channel", "pruning.levels=3",
                                      "pruning.rates.conv=0.5", "pruning.rates.linear=0.5", "pruning.branches=[]"),
                             tmp_path / "r")
    assert [r["channels_remaining"] for r in records] == [{"c1.weight": 4, "c2.weight": 4, "fc.weight": 8},
                                                          {"c1.weight": 2, "c2.weight": 2, "fc.weight": 4}]


def test_channel_stacked_replicas_keep_counts_and_zero_biases(tmp_path):
    """Stacked replicas (one batched network): the companions' masks stack with the weights' and stay applied."""
    run_experiment(tiny_cfg("pruning.granularity=channel", "pruning.levels=2", "pruning.branches=[]", "replicas=2",
                            "replica_batching=stacked", "train.duration=20it", "train.eval_every=20it"), tmp_path / "r")
    for s in (0, 1):
        rec = json.loads((tmp_path / "r" / f"replicate_{s}" / "summary.json").read_text())[-1]
        assert rec["channels_remaining"] == {"hidden.0.weight": 240, "hidden.1.weight": 80}
        final = torch.load(tmp_path / "r" / f"replicate_{s}" / "levels" / "level_1" / "final.pt")
        dead = (final["hidden.0.weight"] == 0).all(dim=1)
        assert int(dead.sum()) == 60 and (final["hidden.0.bias"][dead] == 0).all()


# --- early-bird channel tickets from BatchNorm scales (You et al. 2020) ----------------------------------------------

EARLY_CHANNEL = [*CONVBN, "method=early_bird", "pruning=global", "pruning.granularity=channel",
                 "pruning.group_score=bn", "pruning.target=0.5", "pruning.exclude=[fc.weight]", "pruning.branches=[]",
                 "train.duration=120it", "train.eval_every=10it", "dst.eps=0.2", "optimizer=adam",
                 "optimizer.lr=0.01"]  # Adam moves the BatchNorm scales enough in 120 steps for masks that change


def test_early_bird_draws_channels_by_batchnorm_scale_and_trains_the_last_checks_mask(tmp_path):
    """The paper's early bird: channel masks by |BatchNorm scale| (network slimming), the distance between
    consecutive checks over kept channels, and the ticket is the last check's mask: the half of all conv channels
    whose BatchNorm scales at the draw are largest, with their bias and BatchNorm entries."""
    from lottery.core.files import load_torch
    from lottery.experiment.ticket import load_ticket
    dense, ticket = run_experiment(tiny_cfg(*EARLY_CHANNEL), tmp_path / "r")
    drawn = dense["early_bird_step"]
    assert drawn is not None and dense["train_steps"] == drawn < 120 and ticket["early_bird_step"] == drawn
    result = json.loads((tmp_path / "r" / "levels" / "level_0" / "ticket" / "result.json").read_text())
    distances = [d for _, d in result["mask_distances"]]
    assert len(distances) >= 5 and max(distances[-5:]) < 0.2 and max(distances) > 0  # the masks did move
    final = load_torch(tmp_path / "r" / "levels" / "level_0" / "final.pt")  # the weights at the draw
    masks = load_ticket(tmp_path / "r" / "levels" / "level_1" / "ticket.pt").masks
    gammas = torch.cat([final["b1.weight"].abs(), final["b2.weight"].abs()])
    keep = torch.zeros(16, dtype=torch.bool)
    keep[torch.sort(gammas, stable=True, descending=True).indices[:8]] = True  # 8 of 16 channels (no ties here)
    assert len(set(gammas.tolist())) == 16
    assert torch.equal(_rows(masks["c1.weight"])[:, 0].bool(), keep[:8])
    assert torch.equal(_rows(masks["c2.weight"])[:, 0].bool(), keep[8:])
    for w, comps in {"c1.weight": ["c1.bias", "b1.weight", "b1.bias"],
                     "c2.weight": ["c2.bias", "b2.weight", "b2.bias"]}.items():
        assert all(torch.equal(masks[c].bool(), _rows(masks[w])[:, 0].bool()) for c in comps)
    assert "fc.weight" not in masks  # excluded: it has no BatchNorm


def test_the_early_bird_channel_check_is_the_prunings_channel_selection():
    """EarlyBird.check_channels against lottery.pruning's channel selection on the same weights, for each group
    score (global: one ranking over all channels)."""
    from lottery.training.early_bird import EarlyBird
    from lottery.training.updaters import Context, make_layers
    torch.manual_seed(3)
    model = TinyConvBN()
    with torch.no_grad():
        for bn in (model.b1, model.b2):
            bn.weight.uniform_(0.1, 2.0)
    for how in G.GROUP_SCORES:
        pcfg = _pcfg(scope="global", one_shot=True, target=0.4, group_score=how, levels=2,
                     exclude=["fc.weight"] if how == "bn" else [])
        expected = _prune(model, pcfg, keep_fraction=0.4)  # as the experiment prunes a one-shot target
        names = list(expected)
        params = dict(model.named_parameters())
        layers = make_layers([(params[n], torch.ones_like(params[n]), [(0, None, n)]) for n in names], 1)
        up = EarlyBird({"target": 0.4, "every": 0, "window": 5, "eps": 0.1, "distribution": "global",
                        "granularity": "channel", "group_score": how},
                       Context(100, 0, 100, [0], layers, [model], lambda u: dict(model.named_parameters())))
        drawn = up.check_mask(0)
        for w in ("c1.weight", "c2.weight", "fc.weight"):
            if how == "bn" and w == "fc.weight":  # no BatchNorm: excluded
                assert w not in drawn
                continue
            assert torch.equal(drawn[w].bool(), _rows(expected[w])[:, 0].bool()), (how, w)


def test_batchnorm_group_score_refused_for_a_layer_without_batchnorm(tmp_path):
    run = tmp_path / "r"
    with pytest.raises(ValueError, match="'hidden.0.weight' of model 'lenet_300_100' has no BatchNorm; exclude it") \
            as e:
        run_experiment(tiny_cfg("pruning.granularity=channel", "pruning.group_score=bn", "pruning.levels=2",
                                "train.duration=10it", "train.eval_every=10it"), run)
    assert "\n" not in str(e.value) and not (run / "config.yaml").exists() and not (run / "init.pt").exists()


@pytest.mark.slow
def test_early_bird_channel_replicas_draw_as_their_single_runs(tmp_path):
    """Interleaved replicas draw exactly the tickets of their single runs; stacked ones (the BatchNorm scales read
    through views into the stacked tensors) draw whole channels in exact counts."""
    from lottery.experiment.ticket import load_ticket
    args = EARLY_CHANNEL
    run_experiment(tiny_cfg(*args, "replicas=[0,1]", "replica_batching=interleaved"), tmp_path / "many")
    for s in (0, 1):
        one = run_experiment(tiny_cfg(*args, f"seed={s}"), tmp_path / f"one_{s}")
        many = json.loads((tmp_path / "many" / f"replicate_{s}" / "summary.json").read_text())
        assert [r["early_bird_step"] for r in one] == [r["early_bird_step"] for r in many]
        assert [r["test_accuracy"] for r in one] == [r["test_accuracy"] for r in many]
        a = load_ticket(tmp_path / f"one_{s}" / "levels" / "level_1" / "ticket.pt").masks
        b = load_ticket(tmp_path / "many" / f"replicate_{s}" / "levels" / "level_1" / "ticket.pt").masks
        assert all(torch.equal(a[n], b[n]) for n in a)
    run_experiment(tiny_cfg(*args, "replicas=[0,1]", "replica_batching=stacked"), tmp_path / "stacked")
    for s in (0, 1):
        masks = load_ticket(tmp_path / "stacked" / f"replicate_{s}" / "levels" / "level_1" / "ticket.pt").masks
        kept = sum(int(_rows(masks[w])[:, 0].sum()) for w in ("c1.weight", "c2.weight"))
        got = json.loads((tmp_path / "stacked" / f"replicate_{s}" / "summary.json").read_text())
        single = json.loads((tmp_path / f"one_{s}" / "summary.json").read_text())
        assert kept == 8 and got[0]["early_bird_step"] == single[0]["early_bird_step"]
