"""Pruning at initialization: each criterion's scores against an independent computation (backpropagation written out
by hand, finite differences for GraSP's Hessian-gradient product, SynFlow's path products as matrix products),
SynFlow's conservation and layer-collapse properties, the schedules (train_dense, from_dense, magnitude_init's own
`when`) and the ablation branches, through the real driver on tiny synthetic data."""
import json

import pytest
import torch
from torch import nn

from lottery import masks as M
from lottery import pruning
from lottery.branches import BRANCHES
from lottery.experiment.check import checked
from lottery.pruning.pai import grasp, per_class, snip, synflow
from lottery.experiment import plan, run_experiment
from lottery.experiment.session import open_session
from lottery.experiment.units import context
from lottery.pruning import CRITERIA, select_global
from lottery.experiment.ticket import load_ticket

from conftest import REPO, make_cfg, stable, tiny_cfg
from test_slurm import fake_slurm  # noqa: F401  (the fake scheduler fixture, shared)

torch.set_default_dtype(torch.float32)


class TwoLayer(nn.Module):
    def __init__(self, d_in=6, d_hidden=5, d_out=3, bias=True):
        super().__init__()
        self.fc = nn.Linear(d_in, d_hidden, bias=bias)
        self.out = nn.Linear(d_hidden, d_out, bias=bias)

    def forward(self, x):
        return self.out(torch.relu(self.fc(x.flatten(1))))


def hand_grad(W1, b1, W2, b2, x, y, T=1.0):
    """Gradient of mean cross-entropy(softmax(out / T)) for out = W2 relu(W1 x + b1) + b2, by hand."""
    pre = x @ W1.T + b1
    h = pre.clamp(min=0)
    z = (h @ W2.T + b2) / T
    p = torch.softmax(z, dim=1)
    dz = (p - torch.nn.functional.one_hot(y, p.shape[1]).to(p.dtype)) / (len(y) * T)
    dW2 = dz.T @ h
    dpre = (dz @ W2) * (pre > 0).to(p.dtype)
    return dpre.T @ x, dW2


def _masks(model, names=("fc.weight", "out.weight")):
    params = dict(model.named_parameters())
    return {n: torch.ones_like(params[n]) for n in names}


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_snip_equals_hand_written_gradient_times_weight():
    torch.manual_seed(0)
    model = TwoLayer()
    x1, y1 = torch.randn(8, 6), torch.randint(0, 3, (8,))
    x2, y2 = torch.randn(8, 6), torch.randint(0, 3, (8,))
    masks = _masks(model)
    with torch.no_grad():  # one pruned weight: it stays zero and scores zero
        model.fc.weight[0, 0] = 0
        masks["fc.weight"][0, 0] = 0
    before = _params(model)
    scores = snip(model, masks, batches=iter([(x1, y1), (x2, y2)]), generator=None, num_batches=2)
    W1, b1, W2, b2 = (before[k] for k in ("fc.weight", "fc.bias", "out.weight", "out.bias"))
    g1 = [a + b for a, b in zip(hand_grad(W1, b1, W2, b2, x1, y1), hand_grad(W1, b1, W2, b2, x2, y2))]
    torch.testing.assert_close(scores["fc.weight"], (g1[0] * W1).abs(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(scores["out.weight"], (g1[1] * W2).abs(), rtol=1e-5, atol=1e-7)
    assert scores["fc.weight"][0, 0] == 0
    # one batch by default: the paper's single mini-batch
    one = snip(model, masks, batches=iter([(x1, y1), (x2, y2)]), generator=None)
    g = hand_grad(W1, b1, W2, b2, x1, y1)
    torch.testing.assert_close(one["out.weight"], (g[1] * W2).abs(), rtol=1e-5, atol=1e-7)
    # the model handed in is untouched: weights, and no gradients left on it
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


class BatchNormNet(nn.Module):
    def __init__(self, d_in=6, d_hidden=5, d_out=3):
        super().__init__()
        self.fc = nn.Linear(d_in, d_hidden)
        self.bn = nn.BatchNorm1d(d_hidden)
        self.out = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc(x))))


def hand_grad_batchnorm(p, x, y, mode, eps=1e-5):
    """Gradient of mean cross-entropy for out = W2 relu(gamma * xhat + beta) + b2, pre = W1 x + b1, by hand:
    eval mode xhat = (pre - running_mean) / sqrt(running_var + eps), a fixed affine map; train mode xhat normalizes
    with the batch's mean and biased variance, whose backward is
    (N dxhat - sum dxhat - xhat sum(dxhat xhat)) / (N s)."""
    W1, b1, W2, b2, gamma, beta = (p[k] for k in ("fc.weight", "fc.bias", "out.weight", "out.bias", "bn.weight",
                                                  "bn.bias"))
    pre = x @ W1.T + b1
    if mode == "eval":
        mean, var = p["bn.running_mean"], p["bn.running_var"]
    else:
        mean, var = pre.mean(0), pre.var(0, unbiased=False)
    inv = 1 / torch.sqrt(var + eps)
    xhat = (pre - mean) * inv
    bn = gamma * xhat + beta
    h = bn.clamp(min=0)
    z = h @ W2.T + b2
    n = len(y)
    dz = (torch.softmax(z, 1) - torch.nn.functional.one_hot(y, z.shape[1]).to(z.dtype)) / n
    dW2 = dz.T @ h
    dxhat = (dz @ W2) * (bn > 0).to(z.dtype) * gamma
    if mode == "eval":
        dpre = dxhat * inv
    else:
        dpre = inv / n * (n * dxhat - dxhat.sum(0) - xhat * (dxhat * xhat).sum(0))
    return dpre.T @ x, dW2


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_snip_in_both_batchnorm_modes_against_a_hand_computation(mode):
    torch.manual_seed(3)
    model = BatchNormNet().double()
    with torch.no_grad():  # statistics and affine parameters far from the batch's, so the two modes differ
        model.bn.running_mean.copy_(torch.randn(5, dtype=torch.float64))
        model.bn.running_var.copy_(torch.rand(5, dtype=torch.float64) + 0.5)
        model.bn.weight.copy_(torch.rand(5, dtype=torch.float64) + 0.5)
        model.bn.bias.copy_(torch.randn(5, dtype=torch.float64) * 0.1)
    model.train()
    x, y = torch.randn(16, 6, dtype=torch.float64) * 2 + 1, torch.arange(16) % 3
    masks = _masks(model)
    before = _params(model)
    scores = snip(model, masks, batches=iter([(x, y)]), generator=None, batchnorm=mode)
    g1, g2 = hand_grad_batchnorm(before, x, y, mode)
    torch.testing.assert_close(scores["fc.weight"], (g1 * before["fc.weight"]).abs(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(scores["out.weight"], (g2 * before["out.weight"]).abs(), rtol=1e-10, atol=1e-12)
    other = hand_grad_batchnorm(before, x, y, "train" if mode == "eval" else "eval")
    assert not torch.allclose((other[0] * before["fc.weight"]).abs(), scores["fc.weight"], rtol=1e-3)
    # the caller's model: its mode, weights and BatchNorm statistics (num_batches_tracked too), no gradients
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    snip(model, masks, batches=iter([(x, y)]), generator=None, batchnorm=mode)
    assert not model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_snip_defaults_to_the_authors_batchnorm_mode_and_checks_it():
    from lottery.pruning import criterion_settings
    assert criterion_settings(tiny_cfg("criterion=snip").pruning.criterion) == {"num_batches": 1, "batchnorm": "eval"}
    torch.manual_seed(0)
    model = BatchNormNet()
    x, y = torch.randn(8, 6), torch.arange(8) % 3
    default = snip(model, _masks(model), batches=iter([(x, y)]), generator=None)
    assert all(torch.equal(default[n], v)
               for n, v in snip(model, _masks(model), batches=iter([(x, y)]), generator=None, batchnorm="eval").items())
    with pytest.raises(ValueError, match="unknown pruning.criterion.batchnorm 'inference'; accepted: eval, train"):
        checked(tiny_cfg("criterion=snip", "pruning.criterion.batchnorm=inference"))
    # no BatchNorm: the two modes are the same computation
    mlp = TwoLayer()
    a, b = (snip(mlp, _masks(mlp), batches=iter([(x, y)]), generator=None, batchnorm=m) for m in ("eval", "train"))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_grasp_equals_finite_difference_hessian_gradient_product_and_authors_selection():
    torch.manual_seed(1)
    model = TwoLayer().double()
    T, spc = 200.0, 3
    xs = torch.randn(40, 6, dtype=torch.float64)
    ys = torch.arange(40) % 3
    batches = [(xs[i:i + 8], ys[i:i + 8]) for i in range(0, 40, 8)]
    masks = _masks(model)
    before = _params(model)
    scores = grasp(model, masks, batches=iter(batches), generator=None, samples_per_class=spc, temperature=T,
                   abs=False)

    # the data, chosen independently: first `spc` examples of each class in order, sorted by class, in two halves
    idx = sorted((int(c), i) for c in range(3) for i in [j for j in range(40) if ys[j] == c][:spc])
    x, y = xs[[i for _, i in idx]], ys[[i for _, i in idx]]
    px, py = per_class(iter(batches), 3, spc)
    assert torch.equal(px, x) and torch.equal(py, y)
    half = len(x) // 2
    W1, b1, W2, b2 = (before[k] for k in ("fc.weight", "fc.bias", "out.weight", "out.bias"))

    def grad(W1, W2):  # gradient of the sum of the two halves' losses, by hand
        a = hand_grad(W1, b1, W2, b2, x[:half], y[:half], T)
        b = hand_grad(W1, b1, W2, b2, x[half:], y[half:], T)
        return a[0] + b[0], a[1] + b[1]

    g1, g2 = grad(W1, W2)
    eps = 1e-5
    plus, minus = grad(W1 + eps * g1, W2 + eps * g2), grad(W1 - eps * g1, W2 - eps * g2)
    hg1, hg2 = ((p - m) / (2 * eps) for p, m in zip(plus, minus))
    torch.testing.assert_close(scores["fc.weight"], W1 * hg1, rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(scores["out.weight"], W2 * hg2, rtol=1e-4, atol=1e-12)
    assert (scores["fc.weight"] < 0).any() and (scores["fc.weight"] > 0).any()  # a signed score, not |.|

    # the authors' selection (pruner/GraSP.py): S = -theta*Hg, normalized, the largest S removed (their `<=` keeps
    # the threshold entry, one weight more than asked for; the shared selection's counts are exact, hence `<`)
    S = {n: -s for n, s in scores.items()}
    flat = torch.cat([v.flatten() for v in S.values()])
    norm = flat.sum().abs() + 1e-10
    n_remove = int(len(flat) * 0.6)
    threshold = torch.topk(flat / norm, n_remove, sorted=True).values[-1]
    authors = {n: (v / norm < threshold).double() for n, v in S.items()}
    ours = select_global(scores, masks, n_remove, "grasp")
    assert all(torch.equal(ours[n], authors[n]) for n in masks)

    magnitude = grasp(model, masks, batches=iter(batches), generator=None, samples_per_class=spc, temperature=T,
                      abs=True)
    assert all(torch.allclose(magnitude[n], scores[n].abs()) for n in masks)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _bias_free_mlp(widths, seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b, bias=False), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def test_synflow_equals_path_products_and_conserves_flow_per_layer():
    net = _bias_free_mlp([7, 6, 5, 4])
    masks = {n: torch.ones_like(p) for n, p in net.named_parameters()}
    with torch.no_grad():
        net[2].weight[1, 2] = 0  # a pruned weight carries no flow
    masks["2.weight"][1, 2] = 0
    signs = {k: v.sign() for k, v in net.state_dict().items()}
    scores = synflow(net, masks, batches=iter([(torch.randn(3, 7), None)]), generator=None)
    A = [net[i].weight.detach().double().abs() for i in (0, 2, 4)]
    ones_in, ones_out = torch.ones(7, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    R = ones_out @ A[2] @ A[1] @ A[0] @ ones_in
    for k, name in enumerate(["0.weight", "2.weight", "4.weight"]):
        into = ones_in
        for a in A[:k]:
            into = a @ into
        out_of = ones_out
        for a in reversed(A[k + 1:]):
            out_of = out_of @ a
        expected = out_of[:, None] * A[k] * into[None, :]
        assert scores[name].dtype == torch.float64
        torch.testing.assert_close(scores[name], expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(scores[name].sum(), R, rtol=1e-12, atol=0)  # the synaptic flow, in every layer
    assert scores["2.weight"][1, 2] == 0
    assert all(torch.equal(v.sign(), signs[k]) for k, v in net.state_dict().items())  # the weights are untouched


def test_synflow_uses_batchnorm_in_eval_mode_and_leaves_its_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    net.train()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    before = _params(net)
    masks = {"0.weight": torch.ones_like(net[0].weight), "4.weight": torch.ones_like(net[4].weight)}
    scores = synflow(net, masks, batches=iter([(torch.randn(2, 1, 6, 6), None)]), generator=None)
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    # eval mode: |running statistics| normalize the all-ones input; in train mode the batch of one would give zeros
    ref = net.__class__(*[m for m in net]).double()
    ref.load_state_dict({k: v.double().abs() if v.is_floating_point() else v for k, v in before.items()})
    ref.eval()
    out = ref(torch.ones(1, 1, 6, 6, dtype=torch.float64)).sum()
    grads = torch.autograd.grad(out, [ref[0].weight, ref[4].weight])
    torch.testing.assert_close(scores["0.weight"], (grads[0] * ref[0].weight).abs().detach())
    torch.testing.assert_close(scores["4.weight"], (grads[1] * ref[4].weight).abs().detach())


def _deep_narrow(seed=0, depth=8, width=16):
    torch.manual_seed(seed)
    net = _bias_free_mlp([784, *[width] * depth, 10], seed)
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net


def test_synflow_avoids_the_layer_collapse_of_global_magnitude_at_init():
    pcfg = tiny_cfg("pruning=global", "pruning.exclude=[]", "criterion=magnitude_init").pruning
    density = 0.01
    net = _deep_narrow()
    masks = {n: torch.ones_like(p) for n, p in net.named_parameters()}
    prunable = [M.Prunable(n, "linear") for n in masks]
    batches = iter(lambda: (torch.randn(4, 784), torch.zeros(4, dtype=torch.long)), None)
    with pytest.raises(ValueError, match=r"global magnitude_init pruning to 1% .* \(layer collapse\)"):
        pruning.prune(net, masks, prunable, pcfg, batches=batches, generator=torch.Generator(), keep_fraction=density)
    pcfg.criterion = {"name": "synflow"}
    pcfg.rounds = 100
    new = pruning.prune(net, masks, prunable, pcfg, batches=batches, generator=torch.Generator(),
                        keep_fraction=density)
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in new.values()) == pruning.round_half_up(density * total)
    assert min(int(m.sum()) for m in new.values()) > 0, {n: int(m.sum()) for n, m in new.items()}


def test_magnitude_init_scores_the_initial_weights_even_after_training(tmp_path):
    run = tmp_path / "mi"
    cfg = tiny_cfg("criterion=magnitude_init", "pruning.levels=2", "pruning.branches=[]")
    assert cfg.pruning.when == "after_training" and pruning.scores_at(cfg.pruning) == "at_init"
    run_experiment(cfg, run)
    init = torch.load(run / "init.pt")
    masks = load_ticket(run / "levels" / "level_1" / "ticket.pt").masks
    for name, m in masks.items():
        w = init[name].abs()
        assert 0 < m.sum() < m.numel() and w[m].min() >= w[~m].max(), name


def _records(run):
    return {(r["level"], r["branch"]): r for r in json.loads((run / "summary.json").read_text())}


def test_one_shot_at_init_without_dense_level_and_the_ablations(tmp_path):
    run = tmp_path / "snip"
    cfg = tiny_cfg("method=snip", "pruning.target=0.1", "pruning.one_shot=true",
                   "pruning.branches=[layer_shuffle,reinit,invert]")
    run_experiment(cfg, run)
    s = _records(run)
    assert sorted(s) == [(1, "invert"), (1, "layer_shuffle"), (1, "reinit"), (1, "ticket")]  # no level 0
    assert not (run / "levels" / "level_0").exists()
    ticket = load_ticket(run / "levels" / "level_1" / "ticket.pt")
    for b in ("layer_shuffle", "invert", "reinit"):
        assert s[(1, b)]["layer_density"] == s[(1, "ticket")]["layer_density"], b  # the ticket's per-layer counts
    assert abs(s[(1, "ticket")]["weights_remaining"] - 0.1) < 1e-3

    # invert: the same scores (same weights and scoring batches) with the lowest kept, layer by layer
    with open_session(cfg, run) as session:
        [r] = session.replicates
    masks = {n: m.float() for n, m in ticket.masks.items()}
    inv = BRANCHES["invert"].fn(context(r, 1, "invert", masks))[0].masks
    same = plan.prune_level(r, 1, plan.masks_before(r, 1))
    assert all(torch.equal(same[n].bool().cpu(), ticket.masks[n]) for n in masks)  # the ticket's scores again
    from lottery.data import Batches
    from lottery.core.seeds import derive_seed
    model = r.new_model()
    model.load_state_dict(r.rewind_state)
    b = Batches(r.split, cfg.train.batch_size, seed=derive_seed(cfg.seed, "score", 1))
    scores = CRITERIA["snip"].fn(model, plan.masks_before(r, 1), batches=iter(b), generator=None)
    for n, m in inv.items():
        kept = m.bool()
        assert int(kept.sum()) == int(ticket.masks[n].sum())
        assert scores[n][kept].max() <= scores[n][~kept].min(), n
        assert not torch.equal(kept.cpu(), ticket.masks[n])
    shuffled = BRANCHES["layer_shuffle"].fn(context(r, 1, "layer_shuffle", masks))[0].masks
    assert all(int(shuffled[n].sum()) == int(masks[n].sum()) and not torch.equal(shuffled[n], masks[n])
               for n in masks)


def test_from_dense_prunes_every_level_from_the_dense_network_at_imps_counts(tmp_path):
    imp, fd = tmp_path / "imp", tmp_path / "fd"
    run_experiment(tiny_cfg("pruning.levels=3", "pruning.branches=[]"), imp)
    run_experiment(tiny_cfg("method=magnitude_init", "pruning.levels=3", "pruning.branches=[invert]"), fd)
    a, b = _records(imp), _records(fd)
    assert sorted(b) == [(1, "invert"), (1, "ticket"), (2, "invert"), (2, "ticket")]
    for level in (1, 2):
        assert b[(level, "ticket")]["weights_remaining_count"] == a[(level, "ticket")]["weights_remaining_count"]
    # magnitude at init from the dense network at level 2: the largest |theta_0| at level 2's per-layer counts
    init = torch.load(fd / "init.pt")
    for name, m in load_ticket(fd / "levels" / "level_2" / "ticket.pt").masks.items():
        w = init[name].abs()
        assert w[m].min() >= w[~m].max(), name


@pytest.mark.parametrize("overrides, message", [
    (["pruning.train_dense=false"], "pruning.train_dense=false skips the dense network, which pruning.when="
                                    "after_training with pruning.rewind=0 needs"),
    (["method=snip", "pruning.rewind=20it"], "pruning.train_dense=false skips the dense network, which "
                                             "pruning.when=at_init with pruning.rewind=20it needs"),
    (["criterion=snip", "+pruning.criterion.batches=2"],
     "unknown key pruning.criterion.batches for pruning criterion 'snip'; accepted: num_batches"),
    (["criterion=grasp", "pruning.criterion.temperature=hot"], "bad setting for pruning criterion 'grasp'"),
    (["pruning.branches=[inverse]"], "unknown pruning.branches entry 'inverse'; accepted: reinit, random_prune, "
                                     "shuffle, layer_shuffle, invert"),
])
def test_bad_pai_settings_fail_validation(overrides, message):
    with pytest.raises(ValueError) as e:
        checked(tiny_cfg(*overrides))
    assert message in str(e.value)


@pytest.mark.parametrize("experiment", ["pai_lenet_mnist", "pai_resnet20_cifar10"])
@pytest.mark.parametrize("method", ["imp", "oneshot_magnitude", "random", "magnitude_init", "snip", "grasp",
                                    "synflow"])
def test_every_method_composes_on_both_experiments(experiment, method):
    cfg = make_cfg(f"experiment={experiment}", f"method={method}", "dataset.download=false",
                   f"dataset.root={REPO / 'no_data_here'}")
    p = cfg.pruning
    assert p.criterion["name"] == {"imp": "magnitude", "oneshot_magnitude": "magnitude"}.get(method, method)
    assert p.scope == "global" and p.levels == 21 and p.branches == ["layer_shuffle", "reinit", "invert"]
    assert (p.rewind in ("0", 0)) == (method not in ("imp", "oneshot_magnitude") or experiment == "pai_lenet_mnist")
    assert p.rounds == (100 if method == "synflow" else 1)
    assert p.from_dense == (method != "imp") and p.train_dense == (method in ("imp", "oneshot_magnitude"))
    with pytest.raises(FileNotFoundError):  # everything else checks out; only the data is not in REPO
        checked(cfg)


@pytest.mark.slow
def test_report_draws_one_line_per_method_with_ablations(tmp_path):
    from lottery.report import _curves, collect_runs, make_figures
    root = tmp_path / "sweep"
    G = ("pruning=global", "pruning.exclude=[]")  # one density per level for every method
    run_experiment(tiny_cfg(*G, "method=imp", "pruning.levels=3", "pruning.branches=[]"), root / "imp")
    run_experiment(tiny_cfg(*G, "method=snip", "pruning.levels=3", "pruning.branches=[layer_shuffle,invert]"),
                   root / "snip")
    counts = _records(root / "imp")
    for level in (1, 2):  # one-shot runs, one per density: one line between them
        frac = counts[(level, "ticket")]["weights_remaining"]
        run_experiment(tiny_cfg(*G, "method=magnitude_init", f"pruning.target={frac}", "pruning.one_shot=true",
                                "pruning.branches=[]"), root / f"mi_{level}")
    rows = collect_runs([root])
    # x-axis keys never split a line; a criterion's own keys (snip's num_batches) follow its name
    assert not any(k in r["condition"] for r in rows for k in ("pruning.target", "pruning.levels", "num_batches"))
    methods = {r["method"] for r in rows}
    assert methods == {"IMP (magnitude), original init", "SNIP at init", "magnitude at init"}
    curves = _curves([r for r in rows if r["branch"] == "ticket" and r["level"]], "test_accuracy")
    (panel,) = curves.values()
    by_label = {c[0]: c for c in panel.values()}
    assert set(by_label) == methods
    imp_x = sorted(by_label["IMP (magnitude), original init"][1])
    assert sorted(by_label["magnitude at init"][1]) == imp_x == sorted(by_label["SNIP at init"][1])
    labels = {(r["branch"], r["method"]) for r in rows}
    assert ("invert", "SNIP at init") in labels and ("layer_shuffle", "SNIP at init") in labels
    written = {p.name for p in make_figures(rows, tmp_path / "rep")}
    assert {"methods.png", "methods.svg", "ablations.png", "lottery_ticket.png"} <= written
    svg = (tmp_path / "rep" / "methods.svg").read_text()
    assert "SNIP at init" in svg and "IMP (magnitude), original init (ceiling)" in svg and "dense network" in svg


@pytest.mark.parametrize("name", ["pai_lenet_mnist", "pai_resnet20_cifar10"])
def test_named_comparison_sweep_is_a_multirun_over_every_method_and_works_with_slurm(name):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from lottery.config import register_configs
    from conftest import CONF
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"sweep={name}", "launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.name == name
    assert "slurm" in cfg.hydra.launcher._target_.lower()
    params = cfg.hydra.sweeper.params
    assert set(params) == {"method", "seed"} and len(str(params.seed).split(",")) == 3
    methods = str(params.method).split(",")
    assert methods == ["imp", "oneshot_magnitude", "random", "magnitude_init", "snip", "grasp", "synflow"]
    assert all((CONF / "method" / f"{m}.yaml").exists() for m in methods)


@pytest.mark.slow
def test_killed_pruning_at_init_run_resumes_to_the_same_results(tmp_path):
    """SNIP at every level from the dense network, no dense level, the invert ablation: SIGKILL inside level 2's
    invert unit, rerun the same command: the same summary as an uninterrupted run, finished units not redone."""
    import signal
    from conftest import TINY, fault, run_cli
    args = [*TINY, "device=cpu", "method=snip", "pruning.levels=3", "pruning.branches=[invert]"]
    fault_args, env = fault({"OMP_NUM_THREADS": "1"}, kill_at=50, level=2, branch="invert")

    def train(run):
        r = run_cli(*args, f"hydra.run.dir={run}", *fault_args, cwd=tmp_path, env=env)
        return r.returncode, r.stdout + r.stderr

    run_experiment(tiny_cfg(*args[len(TINY):]), tmp_path / "ref")  # uninterrupted, in this process
    code, log = train(tmp_path / "run")
    assert code == -signal.SIGKILL, log
    done = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("levels/*/*/result.json")}
    assert len(done) == 3  # level 1 ticket and invert, level 2 ticket
    code, log = train(tmp_path / "run")
    assert code == 0, log
    assert "level 2 invert: resuming from step 40" in log
    assert stable(_records(tmp_path / "run")) == stable(_records(tmp_path / "ref"))
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())


@pytest.mark.parametrize("name", ["snip", "grasp", "synflow"])
def test_criteria_score_a_resnet_with_batchnorm_and_leave_it_as_it_was(name):
    from lottery.masks import prunable_tensors
    from lottery.models import build_model
    torch.manual_seed(0)
    model = build_model("resnet20", (3, 32, 32), 10, width=4)
    pcfg = tiny_cfg("pruning=global").pruning
    masks = {p.name: torch.ones_like(dict(model.named_parameters())[p.name]) for p in prunable_tensors(model, pcfg)}
    model.train()
    before = _params(model)
    batches = iter(lambda: (torch.randn(20, 3, 32, 32), torch.arange(20) % 10), None)
    scores = CRITERIA[name].fn(model, masks, batches=batches, generator=torch.Generator(),
                               **({"samples_per_class": 2} if name == "grasp" else {}))
    assert set(scores) == set(masks)
    for n, v in scores.items():
        assert v.shape == masks[n].shape and torch.isfinite(v).all() and v.abs().sum() > 0, n
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow
def test_comparison_sweep_runs_as_a_slurm_array_and_reports_per_method(fake_slurm, tmp_path):
    """The named sweep through launcher=slurm (a fake scheduler, tests/test_slurm.py), shrunk from the command line to
    two methods, one seed and tiny training; lottery-report then draws the per-method figures."""
    import csv
    from conftest import run_cli
    env, state = fake_slurm
    sweep = tmp_path / "sweep"
    r = run_cli("sweep=pai_lenet_mnist", "launcher=slurm", "method=imp,snip", "seed=0", "dataset=synthetic",
                "dataset.val_size=128",
                "train.duration=40it", "train.eval_every=20it", "train.batch_size=32", "train.progress=false",
                "checkpoint.every=20it", "pruning.levels=2", "device=cpu", f"hydra.sweep.dir={sweep}",
                cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr + "".join(p.read_text() for p in state.glob("run_*.log"))
    assert len(list(state.glob("sbatch_*.sh"))) == 1  # one array job
    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["level"], r["branch"]) for r in rows if "snip" in r["run_dir"]} == \
        {("1", "ticket"), ("1", "layer_shuffle"), ("1", "reinit"), ("1", "invert")}
    rep = run_cli(str(sweep), entry="lottery.report:main", cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert (sweep / "report" / "methods.png").exists() and (sweep / "report" / "ablations.png").exists()
