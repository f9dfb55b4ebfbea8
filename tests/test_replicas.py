"""Batched replicas (lottery.training.layouts, lottery.experiment.levels): each network of a batched run sees its single run's batches,
starts from its weights and masks, and follows its losses to float32 round-off; a diverging network disturbs no other;
replicate folders are ordinary run folders; a killed batched run resumes bit-identical."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lottery import masks as M
from lottery.training import layouts as B
from lottery.core.files import load_torch
from lottery.config import Config
from lottery.core.steps import Steps
from lottery.data import Batches, load_pool, split
from lottery.training import Hooks, Network, choose, train
from lottery.experiment import run_experiment
from lottery.init import initialize
from lottery.models import build_model
from lottery.experiment.units import _resume_states
from lottery.experiment.session import replica_seeds
from lottery.report import collect_runs
from lottery.experiment.ticket import load_ticket

from conftest import fault, run_cli, stable, tiny_cfg, train_one

# (model, kwargs, data shape, optimizer, networks): every supported model, every optimizer (with momentum, Nesterov,
# weight decay) at least once; Conv-2 on CIFAR-shaped data with augmentation. VGG trains with SGD: its conv biases sit
# right before a BatchNorm, so their gradient is zero up to round-off, which Adam scales up to full-size steps of
# arbitrary sign in single and batched runs alike (the losses still agree; those biases would not).
MODELS = {
    "lenet_300_100": ({}, "mnist", "adam", 3),
    "mlp": ({"hidden": [32, 16]}, "mnist", "sgd", 3),
    "deep_mlp": ({"depth": 3, "width": 16}, "mnist", "adamw", 3),
    "conv2": ({}, "cifar10", "adam", 3),
    "conv4": ({}, "mnist", "adam", 2),
    "conv6": ({}, "mnist", "adamw", 2),
    "resnet20": ({"width": 4}, "mnist", "sgd", 3),
    "vgg11": ({}, "mnist", "sgd", 2),
}
STEPS = 6
# Largest relative difference allowed between a batched network's training loss and its single run's. Batched matmuls
# and grouped convolutions sum in another order than single ones, so the last bits differ, and training grows such
# differences: measured (2026-11-29, this CPU), over the first two losses (step 0 and after one update) at most 1e-6
# on every model; over all STEPS losses at most 7e-7 for LeNet, the MLPs, Conv-2 and ResNet-20, but 4e-4 (Conv-4,
# Adam), 2e-4 (Conv-6, AdamW) and 3e-2 (VGG-11 with batches of 8, whose last BatchNorms normalize 8 values) where
# Adam or tiny-batch BatchNorm amplify round-off, as they do between two GPUs.
LOSS_RTOL_FIRST, LOSS_RTOL = 1e-5, 0.1


def _cfg(opt: str, augment: bool):
    cfg = OmegaConf.structured(Config)
    if opt == "sgd":
        cfg.optimizer = {"name": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}
    else:
        cfg.optimizer = {"name": opt, "lr": 1e-3, "weight_decay": 1e-2, "betas": [0.9, 0.999]}
    cfg.train.batch_size, cfg.train.duration, cfg.train.eval_every = 8, f"{STEPS}it", "3it"
    cfg.train.progress = False
    return cfg


def _networks(name, kwargs, pool, cfg, seeds):
    """Per seed: an initialized model with 50% random masks (exact zeros applied)."""
    out = []
    for s in seeds:
        m = build_model(name, pool.input_shape, 10, **kwargs)
        initialize(m, OmegaConf.create({"name": "kaiming_normal"}), s)
        prunable = M.prunable_tensors(m, cfg.pruning)
        g = torch.Generator().manual_seed(100 + s)
        masks = {p.name: (torch.rand(dict(m.named_parameters())[p.name].shape, generator=g) < 0.5).float()
                 for p in prunable}
        M.apply(m, masks)
        out.append((m, masks))
    return out


def _pool(shape, augment):
    return load_pool({"name": "synthetic", "val_size": 16, "augment": augment, "synthetic_shape": shape,
                      "synthetic_train": 96, "synthetic_test": 24}, seed=0)


@pytest.mark.parametrize("layout", ["stacked", "interleaved"])
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.slow
def test_batched_run_matches_single_runs(name, layout):
    """Stacked: losses agree to round-off (LOSS_RTOL). Interleaved: each network computes what its single run does, so
    losses and final weights are bit-identical."""
    kwargs, shape, opt, n = MODELS[name]
    augment = shape == "cifar10"
    cfg = _cfg(opt, augment)
    pool = _pool(shape, augment)
    seeds = list(range(n))
    splits = [split(pool, 16, s) for s in seeds]
    nets = _networks(name, kwargs, pool, cfg, seeds)
    steps = Steps.resolve(cfg, 80 // 8)

    # the same batches, augmentation included: the stacked layout gathers every network's batch at once
    batches = [Batches(sp, 8, seed=10 + s) for sp, s in zip(splits, seeds)]
    gathered = B.Stacked([copy.deepcopy(m) for m, _ in nets], batches)
    for step in (0, 5, 11):  # 11: second epoch
        x, y = gathered.train_batch(step)
        for u, sp in enumerate(splits):
            want_x, want_y = Batches(sp, 8, seed=10 + seeds[u]).get(step)
            assert torch.equal(x[:, u], want_x)
            assert torch.equal(y[:, u], want_y)

    # the same start
    together = B.LAYOUTS[layout]([copy.deepcopy(m) for m, _ in nets], batches)
    for (m, _), state in zip(nets, together.states()):
        assert state.keys() == m.state_dict().keys()
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())

    single_losses, single_models, single_results = [], [], []
    for (m, mk), sp, s in zip(nets, splits, seeds):
        losses = []
        model = copy.deepcopy(m)
        single_results.append(train_one(model, mk, sp, cfg, start=0, data_seed=10 + s, steps=steps,
                                        hooks=Hooks(on_log=lambda r, losses=losses: losses.append(r["train_loss"]),
                                                    log_every=1)))
        single_losses.append(losses)
        single_models.append(model)
    batched_losses = [[] for _ in seeds]
    members = [Network(copy.deepcopy(m), mk, Batches(sp, 8, seed=10 + s),
                       Hooks(on_log=lambda r, u=u: batched_losses[u].append(r["train_loss"]), log_every=1))
               for u, ((m, mk), sp, s) in enumerate(zip(nets, splits, seeds))]
    results = train(members, cfg, start=0, steps=steps, layout=layout)

    def worst(k):
        return max(abs(a - b) / abs(a) for s, b_ in zip(single_losses, batched_losses) for a, b in zip(s[:k], b_[:k]))

    print(f"{name} {layout}: max relative loss difference, first 2 steps {worst(2):.1e}, {STEPS} steps "
          f"{worst(STEPS):.1e}")
    assert all(len(b_) == STEPS for b_ in batched_losses)
    if layout == "interleaved":
        assert batched_losses == single_losses
        assert [r["evals"] for r in results] == [r["evals"] for r in single_results]
        for mem, single in zip(members, single_models):
            assert all(torch.equal(v, single.state_dict()[k]) for k, v in mem.model.state_dict().items())
    assert worst(2) <= LOSS_RTOL_FIRST and worst(STEPS) <= LOSS_RTOL
    for mem, (_, mk), res in zip(members, nets, results):
        params = dict(mem.model.named_parameters())
        for n, mask in mk.items():  # pruned weights exactly zero after training
            assert params[n].detach()[mask == 0].abs().max() == 0
        assert [e["step"] for e in res["evals"]] == [0, 3, 6]


@pytest.mark.parametrize("layout", ["stacked", "interleaved"])
@pytest.mark.parametrize("name", ["lenet_300_100", "conv2", "resnet20"])
def test_diverging_network_disturbs_no_other(name, layout):
    """Network 1's weights are NaN from the start; networks 0 and 2 end bit-identical to a batch where network 1 is
    healthy, and network 1's pruned weights stay exactly zero."""
    kwargs, _, opt, _ = MODELS[name]
    cfg = _cfg(opt, False)
    pool = _pool("mnist", False)
    splits = [split(pool, 16, s) for s in range(3)]
    nets = _networks(name, kwargs, pool, cfg, range(3))
    steps = Steps.resolve(cfg, 80 // 8)
    bad = copy.deepcopy(nets[1][0])
    with torch.no_grad():
        for p in bad.parameters():
            p.fill_(float("nan"))
    M.apply(bad, nets[1][1])

    def run(models):
        members = [Network(copy.deepcopy(m), mk, Batches(sp, 8, s)) for m, (_, mk), sp, s in
                   zip(models, nets, splits, range(3))]
        return members, train(members, cfg, start=0, steps=steps, layout=layout)

    healthy, _ = run([m for m, _ in nets])
    broken, results = run([nets[0][0], bad, nets[2][0]])
    # recorded as a single run records a divergence (lottery/divergence.py): at the first evaluation, no metrics
    assert results[1]["diverged"] and results[1]["diverged_step"] == 0 and results[1]["test_accuracy"] is None
    assert not results[0]["diverged"] and not results[2]["diverged"]
    for u in (0, 2):
        for k, v in healthy[u].model.state_dict().items():
            assert torch.equal(broken[u].model.state_dict()[k], v), (u, k)
    params = dict(broken[1].model.named_parameters())
    for n, mask in nets[1][1].items():
        assert torch.all(params[n].detach()[mask == 0] == 0)


def test_unsupported_model_and_bad_replicas_fail_with_one_line():
    with pytest.raises(ValueError, match="LayerNorm layer"):
        B.check_supported(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), "my_model")
    for bad in ("0", "[1,1]", "[]", "-2"):
        with pytest.raises(ValueError, match="replicas must be"):
            replica_seeds(tiny_cfg(f"replicas={bad}"))
    assert replica_seeds(tiny_cfg("seed=5", "replicas=3")) == [5, 6, 7]
    assert replica_seeds(tiny_cfg("replicas=[4,1]")) == [4, 1]
    assert replica_seeds(tiny_cfg()) is None


LEVELS = ["pruning.levels=3", "pruning.branches=[reinit,random_prune]", "threads=1"]


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    run_experiment(tiny_cfg(*LEVELS, "replicas=[0,1]", "replica_batching=interleaved"), root / "batched")
    run_experiment(tiny_cfg(*LEVELS, "replicas=[0,1]", "replica_batching=stacked"), root / "stacked")
    for s in (0, 1):
        run_experiment(tiny_cfg(*LEVELS, f"seed={s}"), root / f"single_{s}")
    return root


@pytest.mark.parametrize("layout", ["interleaved", "stacked"])
@pytest.mark.slow
def test_replicas_imp_matches_single_runs(replicated, layout):
    """After a short IMP run (3 levels, two controls) each replicate is its single run: interleaved exactly (the same
    arithmetic: every record and mask equal), stacked within round-off (batched matrix products round differently,
    so a mask may differ by a tie after training; the counts are exact and accuracies agree within 0.02)."""
    for s in (0, 1):
        one, many = replicated / f"single_{s}", replicated / ("batched" if layout == "interleaved" else "stacked") / \
            f"replicate_{s}"
        a, b = (json.loads((d / "summary.json").read_text()) for d in (one, many))
        assert [(r["level"], r["branch"]) for r in a] == [(r["level"], r["branch"]) for r in b]
        assert len(a) == 7
        for ra, rb in zip(a, b):
            assert ra["weights_remaining_count"] == rb["weights_remaining_count"]
            assert ra["layer_density"] == rb["layer_density"]
            assert ra["replicate"] == rb["replicate"] == s
            assert ra["early_stop_step"] is not None and rb["early_stop_step"] is not None
            if layout == "interleaved":
                assert ra["test_accuracy"] == rb["test_accuracy"] and ra["test_loss"] == rb["test_loss"]
            else:
                assert abs(ra["test_accuracy"] - rb["test_accuracy"]) <= 0.02
        assert all(torch.equal(x, y) for x, y in zip(load_torch(one / "init.pt").values(),
                                                     load_torch(many / "init.pt").values()))
        for level in (1, 2):
            ta, tb = (load_ticket(d / "levels" / f"level_{level}" / "ticket.pt") for d in (one, many))
            assert ta.masks.keys() == tb.masks.keys()
            for k in ta.masks:
                assert int(ta.masks[k].count_nonzero()) == int(tb.masks[k].count_nonzero())
                if layout == "interleaved":
                    assert torch.equal(ta.masks[k], tb.masks[k])


def test_replicate_folders_are_ordinary_runs(replicated):
    parent = replicated / "batched"
    assert json.loads((parent / "replicas.json").read_text())["replicas"] == [0, 1]
    assert not (parent / "summary.json").exists() and not (parent / "config.yaml").exists()
    rows = collect_runs([parent])
    assert {r["run_dir"] for r in rows} == {str(parent / "replicate_0"), str(parent / "replicate_1")}
    assert {r["replicate"] for r in rows} == {0, 1}
    # the folder of replicate 1 is the single run with seed 1: a single run resumes it (here: finds it done)
    before = (parent / "replicate_1" / "summary.json").read_text()
    run_experiment(tiny_cfg(*LEVELS, "seed=1"), parent / "replicate_1")
    assert (parent / "replicate_1" / "summary.json").read_text() == before
    # and rerunning the batched command finds everything done
    run_experiment(tiny_cfg(*LEVELS, "replicas=[0,1]"), parent)
    assert (parent / "replicate_1" / "summary.json").read_text() == before


def test_resume_uses_the_previous_checkpoint_to_keep_the_batch_whole(tmp_path):
    """A kill while the units' checkpoints are written leaves some one checkpoint ahead."""
    from lottery.core.files import Checkpoints
    from lottery.experiment.folder import RunFolder
    from lottery.experiment.units import Job

    class FakeReplicate:
        folder = RunFolder(tmp_path)

    for unit, steps in (("a", (20, 40)), ("b", (20,)), ("c", ())):
        ck = Checkpoints(tmp_path / "levels" / "level_1" / "ticket" / unit)
        for s in steps:
            ck.save({"step": s})
    jobs = [Job(FakeReplicate(), 1, "ticket", None, {}, 0, unit=u) for u in ("a", "b", "c")]
    assert [None if s is None else s["step"] for s in _resume_states(jobs)] == [20, 20, None]


RESUME_ARGS = ["dataset=synthetic", "model=mlp", "model.hidden=[64,32]", "train.batch_size=32", "train.duration=60it",
               "train.eval_every=20it", "checkpoint.every=20it", "pruning.levels=2", "pruning.branches=[reinit]",
               "pruning.rewind=10it", "train.progress=false", "device=cpu", "replicas=2"]


def _cli(run_dir, *extra, env=None):
    r = run_cli(*RESUME_ARGS, f"hydra.run.dir={run_dir}", *extra, cwd=run_dir.parent,
                env={"OMP_NUM_THREADS": "1", **(env or {})})
    r.log = r.stdout + r.stderr
    return r


def _summaries(parent):
    return [json.loads((parent / f"replicate_{s}" / "summary.json").read_text()) for s in (0, 1)]


@pytest.fixture(scope="module")
def batched_reference(tmp_path_factory):
    """Summaries of the uninterrupted run, per replica_batching (computed when first asked for)."""
    refs = {}

    def get(how):
        if how not in refs:
            run_dir = tmp_path_factory.mktemp("ref") / "run"
            r = _cli(run_dir, f"replica_batching={how}")
            assert r.returncode == 0, r.log
            refs[how] = _summaries(run_dir)
        return refs[how]
    return get


@pytest.mark.parametrize("spec, how", [
    pytest.param({"level": 1, "kill_at": 35}, "stacked", marks=pytest.mark.slow),  # the same kill as interleaved's
    ({"level": 0, "signal_at": 25}, "stacked"),
    ({"level": 1, "kill_at": 35}, "interleaved")])
def test_killed_or_signalled_batched_run_resumes_bit_identical(batched_reference, tmp_path, spec, how):
    """Stacked and interleaved (whose checkpoints keep each network's optimizer state under its own indices)."""
    run_dir = tmp_path / "run"
    args, env = fault(**spec)
    r = _cli(run_dir, *args, f"replica_batching={how}", env=env)
    assert r.returncode != 0, r.log
    assert (run_dir / ".fault_fired").exists()
    if "signal_at" in spec:
        assert r.returncode == 75, r.log
        ck = load_torch(run_dir / "replicate_1" / "levels" / "level_0" / "ticket" / "checkpoint.pt")
        assert ck["step"] == 25
    r = _cli(run_dir, *args, f"replica_batching={how}", env=env)
    assert r.returncode == 0, r.log
    assert "resumed at step" in r.log
    assert [stable(s) for s in _summaries(run_dir)] == [stable(s) for s in batched_reference(how)]


def test_one_wandb_run_per_replicate_in_one_group(tmp_path, monkeypatch):
    import wandb
    calls = []
    real = wandb.init

    def spy(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(wandb, "init", spy)
    run_experiment(tiny_cfg("pruning=none", "logger=wandb", "replicas=2", "threads=1"), tmp_path / "run")
    jobs = [c for c in calls if c["job_type"] != "unit"]  # and one run per unit (tests/test_tracking.py)
    assert len(jobs) == 2 and len({c["id"] for c in calls}) == len(calls) == 4
    assert {c["group"] for c in calls} == {"default"}
    assert {c["dir"] for c in jobs} == {str(tmp_path / "run" / f"replicate_{s}") for s in (0, 1)}
    for s in (0, 1):
        assert (tmp_path / "run" / f"replicate_{s}" / "wandb_id.txt").exists()


@pytest.mark.parametrize("how", ["interleaved", "sequential"])
@pytest.mark.slow
def test_interleaved_and_sequential_replicas_equal_single_runs_exactly(replicated, tmp_path, how):
    """`replica_batching=interleaved` (what `auto` picks for conv models on a CPU: one batched loop, each network
    through its own model) and `sequential` (the single-run loop, one unit after another) give summaries exactly equal
    to the single runs'."""
    run_experiment(tiny_cfg(*LEVELS, "replicas=[0,1]", f"replica_batching={how}"), tmp_path / "seq")
    for s in (0, 1):
        one = json.loads((replicated / f"single_{s}" / "summary.json").read_text())
        seq = json.loads((tmp_path / "seq" / f"replicate_{s}" / "summary.json").read_text())
        assert stable(seq) == stable(one)


def test_auto_batching_choice():
    cpu = torch.device("cpu")
    assert choose("auto", build_model("lenet_300_100", (1, 28, 28), 10), cpu) == "stacked"
    assert choose("auto", build_model("conv2", (3, 32, 32), 10), cpu) == "interleaved"
    assert choose("stacked", build_model("conv2", (3, 32, 32), 10), cpu) == "stacked"
    assert choose("auto", nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), cpu) == "interleaved"
    for extra in (["replicas=2"], []):  # checked whether or not the run has replicas
        with pytest.raises(ValueError, match="unknown replica_batching 'fast'; accepted: auto, stacked, interleaved"):
            run_experiment(tiny_cfg(*extra, "replica_batching=fast"), "/nonexistent/never_created")
    with pytest.raises(ValueError, match="unknown replica_batching 'fast'; accepted: auto, stacked, interleaved"):
        run_experiment(tiny_cfg("replicas=2", "replica_batching=fast"), "/nonexistent/never_created")
