"""The methods the field compares against (issue 21): dynamic sparse training (SET, RigL) against hand-made cases,
fine-tuning and learning-rate rewinding as IMP schedules and as branches, replicas of dynamic runs, and the training
cost every record carries."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lottery import masks as M
from lottery.core.steps import Steps
from lottery.experiment import run_experiment
from lottery.training import lr_schedule
from lottery.training.dst import DST, drop_fraction, dst_settings
from lottery.training.updaters import Context, make_layers

from conftest import tiny_cfg

SETTINGS = {"delta_t": 10, "end": 0.5, "alpha": 0.5, "decay": "cosine"}


def _one_layer(weights, mask, grad=None):
    layer = nn.Linear(weights.shape[1], weights.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weights)
    layer.weight.grad = grad
    return layer, mask.clone().float()


def _updater(rule, layer, mask, settings=SETTINGS, total=100):
    return DST[rule](settings, Context(total, 0, total, [0], make_layers([(layer.weight, mask, [(0, None, "w")])], 1)))


def test_rigl_drops_the_smallest_active_and_grows_the_largest_gradient_inactive():
    w = torch.tensor([[0.5, -0.1, 0.0, 0.0], [0.3, 0.0, -0.05, 0.0]])
    m = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]])
    g = torch.tensor([[9.0, 9.0, 0.2, -3.0], [9.0, 1.0, 0.0, 0.5]])  # inactive: 0.2, -3.0, 1.0, 0.5
    layer, mask = _one_layer(w, m, g)
    opt = torch.optim.SGD([layer.weight], lr=0.1, momentum=0.9)
    opt.state[layer.weight]["momentum_buffer"] = torch.ones_like(w)
    up = _updater("rigl", layer, mask)
    # at step 10 of an update window ending at 50: cos(pi/5) -> fraction 0.5/2*(1+0.809) = 0.452; 4 active -> 1
    assert drop_fraction(SETTINGS, 10, 50) == pytest.approx(0.25 * (1 + math.cos(math.pi * 10 / 50)))
    assert up.update(10, opt, [True]) == [0]
    # dropped: the smallest |w| among the active (-0.05 at [1, 2]); grown: the largest |g| among the inactive
    # after the drop (-3.0 at [0, 3]); the grown weight starts at 0, its momentum at 0
    assert mask.tolist() == [[1, 1, 0, 1], [1, 0, 0, 0]]
    assert layer.weight[0, 3] == 0 and opt.state[layer.weight]["momentum_buffer"][0, 3] == 0
    assert opt.state[layer.weight]["momentum_buffer"][0, 0] == 1  # the kept ones keep theirs
    assert int(mask.sum()) == 4


def test_rigl_can_grow_back_what_it_just_dropped_without_resetting_it():
    w = torch.tensor([[0.5, -0.01, 0.0]])
    m = torch.tensor([[1, 1, 0]])
    g = torch.tensor([[0.0, 5.0, 1.0]])  # the dropped weight has the largest gradient
    layer, mask = _one_layer(w, m, g)
    opt = torch.optim.SGD([layer.weight], lr=0.1, momentum=0.9)
    opt.state[layer.weight]["momentum_buffer"] = torch.full_like(w, 2.0)
    _updater("rigl", layer, mask, {**SETTINGS, "decay": "constant"}).update(10, opt, [True])
    assert mask.tolist() == [[1, 1, 0]] and layer.weight[0, 1] == -0.01  # never left: value and momentum kept
    assert opt.state[layer.weight]["momentum_buffer"][0, 1] == 2.0


def test_set_grows_only_among_inactive_entries_and_counts_stay():
    torch.manual_seed(0)
    w = torch.randn(20, 30)
    m = (torch.rand(20, 30) < 0.3).float()
    layer, mask = _one_layer(w * m, m)
    opt = torch.optim.Adam([layer.weight], lr=1e-3)
    layer.weight.grad = torch.randn_like(w)
    opt.step()
    before = mask.clone()
    active_weights = layer.weight.detach().abs() * before
    n_drop = int(int(before.sum()) * drop_fraction({**SETTINGS, "decay": "constant"}, 10, 50))
    up = _updater("set", layer, mask, {**SETTINGS, "decay": "constant"})
    up.update(10, opt, [True])
    assert int(mask.sum()) == int(before.sum())  # the layer's count never changes
    # the n smallest active magnitudes are dropped (some may be grown back), every larger one is kept
    active_idx = before.reshape(-1).nonzero().squeeze(1)
    smallest = active_idx[torch.sort(active_weights.reshape(-1)[active_idx], stable=True).indices[:n_drop]]
    survivors = before.reshape(-1).bool().clone()
    survivors[smallest] = False
    assert mask.reshape(-1)[survivors].all()
    dropped = (before == 1) & (mask == 0)
    grown = (before == 0) & (mask == 1)
    assert dropped.reshape(-1)[survivors].sum() == 0 and int(grown.sum()) == int(dropped.sum()) > 0
    # grown weights start at zero, Adam's moments too
    assert (layer.weight[grown] == 0).all()
    assert (opt.state[layer.weight]["exp_avg"][grown] == 0).all()
    assert (opt.state[layer.weight]["exp_avg_sq"][grown] == 0).all()


def test_drop_fraction_follows_the_cosine_and_nothing_changes_after_end():
    s = {"delta_t": 5, "end": 0.5, "alpha": 0.3, "decay": "cosine"}
    up = DST["set"](s, Context(100, 0, 100, [0], [[]]))
    assert up.end_step == 50
    assert [step for step in range(1, 101) if up.due(step)] == list(range(5, 51, 5))
    for step in (5, 25, 50):
        assert drop_fraction(s, step, 50) == pytest.approx(0.15 * (1 + math.cos(math.pi * step / 50)))
    assert drop_fraction(s, 50, 50) == pytest.approx(0.0, abs=1e-12)
    assert drop_fraction({**s, "decay": "constant"}, 25, 50) == 0.3


DST_RUN = ["pruning.levels=2", "method=random", "pruning=global", "pruning.scope=erk", "pruning.exclude=[]",
           "pruning.branches=[]", "train.duration=60it", "dst.delta_t=10", "dst.end=0.75"]


@pytest.mark.parametrize("rule", ["set", "rigl"])
def test_a_dynamic_sparse_run_keeps_every_layers_count_and_its_masks_change(tmp_path, rule):
    records = run_experiment(tiny_cfg(*DST_RUN, f"dst={rule}"), tmp_path / "run")
    static = run_experiment(tiny_cfg(*DST_RUN), tmp_path / "static")
    result = json.loads((tmp_path / "run" / "levels" / "level_1" / "ticket" / "result.json").read_text())
    changes = result["mask_changes"]
    assert [s for s, _ in changes] == [0, 10, 20, 30, 40]  # updates every 10 steps to 75% of 60
    assert all(c[1] == changes[0][1] for c in changes)  # the densities of every layer never change
    assert records[0]["weights_remaining_count"] == static[0]["weights_remaining_count"]
    from lottery.experiment.ticket import load_ticket
    dynamic = load_ticket(tmp_path / "run" / "levels" / "level_1" / "ticket.pt").masks
    fixed = load_ticket(tmp_path / "static" / "levels" / "level_1" / "ticket.pt").masks
    assert any(not torch.equal(dynamic[n], fixed[n]) for n in fixed)  # the same start, other final masks
    assert all(int(dynamic[n].sum()) == int(fixed[n].sum()) for n in fixed)
    final = torch.load(tmp_path / "run" / "levels" / "level_1" / "final.pt")
    assert all((final[n][~dynamic[n]] == 0).all() for n in dynamic)  # pruned exactly zero under the final masks
    # RigL's update steps compute a dense weight gradient: they cost more than SET's
    assert records[0]["train_flops"] > 0 and records[0]["train_flops"] < records[0]["train_flops_dense"]


@pytest.mark.parametrize("rule", ["rigl", "set"])
@pytest.mark.slow
def test_dynamic_replicas_equal_single_runs(tmp_path, rule):
    """Each replicate's masks change on their own: replicas=2 (interleaved) ends exactly as two single runs (SET's
    random draws too: seeded by the tensor's place in its network, not in the layout)."""
    args = [*DST_RUN, f"dst={rule}"]
    run_experiment(tiny_cfg(*args, "replicas=[0,1]", "replica_batching=interleaved"), tmp_path / "many")
    for s in (0, 1):
        one = run_experiment(tiny_cfg(*args, f"seed={s}"), tmp_path / f"one_{s}")
        many = json.loads((tmp_path / "many" / f"replicate_{s}" / "summary.json").read_text())
        assert [{k: v for k, v in r.items() if k not in ("device_info", "wall_time_s")} for r in many] == \
            [{k: v for k, v in r.items() if k not in ("device_info", "wall_time_s")} for r in one]
    a = json.loads((tmp_path / "many" / "replicate_0" / "levels" / "level_1" / "ticket" / "result.json").read_text())
    b = json.loads((tmp_path / "many" / "replicate_1" / "levels" / "level_1" / "ticket" / "result.json").read_text())
    assert a["mask_changes"][0] != b["mask_changes"][0] or a["test_loss"] != b["test_loss"]


def test_stacked_dynamic_replicas_keep_counts(tmp_path):
    run_experiment(tiny_cfg(*DST_RUN, "dst=set", "replicas=2", "replica_batching=stacked"), tmp_path / "r")
    for s in (0, 1):
        res = json.loads((tmp_path / "r" / f"replicate_{s}" / "levels" / "level_1" / "ticket" / "result.json")
                         .read_text())
        assert len(res["mask_changes"]) == 5 and all(c[1] == res["mask_changes"][0][1] for c in res["mask_changes"])


def test_dst_settings_are_checked():
    assert dst_settings({"name": "none"}) == (None, {})
    with pytest.raises(ValueError, match="unknown mask updater \\(dst\\) 'sparse'; accepted: .*rigl, set.*, none"):
        dst_settings({"name": "sparse"})
    with pytest.raises(ValueError, match=r"dst.end must be in \(0, 1\], got 2.0"):
        dst_settings({"name": "rigl", "end": 2.0})
    assert dst_settings({"name": "none", "alpha": 0.3}) == (None, {})  # a sweep over dst=none,set,rigl keeps them
    with pytest.raises(ValueError, match="dst.alpha must be in"):
        dst_settings({"name": "none", "alpha": 3})


# --- fine-tuning and learning-rate rewinding -------------------------------------------------------------------------

SCHEDULE = ["optimizer=sgd", "optimizer.lr=0.1", "train.schedule=step", "train.milestones=[30it,50it]",
            "train.duration=60it", "train.eval_every=10it", "pruning.rewind=20it"]


def _result(run, level, branch="ticket"):
    return json.loads((run / "levels" / f"level_{level}" / branch / "result.json").read_text())


def test_imp_with_fine_tuning_keeps_the_trained_weights_and_the_final_learning_rate(tmp_path):
    run = tmp_path / "ft"
    run_experiment(tiny_cfg(*SCHEDULE, "pruning.levels=3", "pruning.branches=[]", "pruning.retrain=finetune",
                            "pruning.retrain_steps=30it"), run)
    final_lr = 0.1 * 0.1 ** 2
    for level in (1, 2):
        res = _result(run, level)
        assert res["start_step"] == 60 and res["steps"] == 90  # 30 more steps after the end of training
        assert [e["step"] for e in res["evals"]] == [60, 70, 80, 90]
        assert all(e["lr"] == pytest.approx(final_lr) for e in res["evals"][1:])
        # it starts from the trained weights of the level before, masked: its first evaluation is theirs, masked
        from lottery.experiment.ticket import load_ticket
        ticket = load_ticket(run / "levels" / f"level_{level}" / "ticket.pt")
        before = torch.load(run / "levels" / f"level_{level - 1}" / "final.pt")
        for n, m in ticket.masks.items():
            assert torch.equal(ticket.rewind_state[n], before[n] * m)
    # the cost of level 2 includes the levels it was pruned from
    s = {(r["level"], r["branch"]): r for r in json.loads((run / "summary.json").read_text())}
    assert s[(2, "ticket")]["cost_steps"] == 60 + 30 + 30
    assert s[(1, "ticket")]["train_steps"] == 30 and s[(0, "ticket")]["cost_steps"] == 60


def test_imp_with_learning_rate_rewinding_restarts_the_schedule_at_its_step(tmp_path):
    run = tmp_path / "lrr"
    run_experiment(tiny_cfg(*SCHEDULE, "pruning.levels=2", "pruning.branches=[]", "pruning.retrain=lr_rewind"), run)
    res = _result(run, 1)
    assert res["start_step"] == 20 and res["steps"] == 60
    schedule = lr_schedule(tiny_cfg(*SCHEDULE).train, Steps.resolve(tiny_cfg(*SCHEDULE), 28))
    for e in res["evals"][1:]:
        assert e["lr"] == pytest.approx(0.1 * schedule(e["step"] - 1))
    assert res["evals"][-1]["lr"] == pytest.approx(0.1 * 0.01) and res["evals"][1]["lr"] == pytest.approx(0.1)
    # unlike weight rewinding, the weights are the trained ones: its first evaluation differs from a rewound ticket's
    rewound = tmp_path / "wr"
    run_experiment(tiny_cfg(*SCHEDULE, "pruning.levels=2", "pruning.branches=[]"), rewound)
    assert _result(rewound, 1)["evals"][0]["test_loss"] != res["evals"][0]["test_loss"]
    from lottery.experiment.ticket import load_ticket
    ticket = load_ticket(run / "levels" / "level_1" / "ticket.pt")
    trained = torch.load(run / "levels" / "level_0" / "final.pt")
    assert all(torch.equal(ticket.rewind_state[n], trained[n] * m) for n, m in ticket.masks.items())


def test_finetune_and_lr_rewind_branches_beside_the_ticket(tmp_path):
    run = tmp_path / "b"
    run_experiment(tiny_cfg(*SCHEDULE, "pruning.levels=2", "pruning.branches=[finetune,lr_rewind]",
                            "branch.finetune.steps=20it"), run)
    ft, lrr, ticket = _result(run, 1, "finetune"), _result(run, 1, "lr_rewind"), _result(run, 1)
    assert (ft["start_step"], ft["steps"]) == (60, 80) and all(e["lr"] == pytest.approx(0.001) for e in ft["evals"][1:])
    assert (lrr["start_step"], lrr["steps"]) == (20, 60)
    assert ft["layer_density"] == lrr["layer_density"] == ticket["layer_density"]
    # both start from level 0's trained weights with the ticket's masks: the same first evaluation
    assert ft["evals"][0]["test_loss"] == lrr["evals"][0]["test_loss"] != ticket["evals"][0]["test_loss"]


def test_retraining_needs_trained_weights():
    from lottery.experiment.check import checked
    with pytest.raises(ValueError, match="pruning.retrain=finetune keeps the trained weights"):
        checked(tiny_cfg("method=snip", "pruning.retrain=finetune"))
    with pytest.raises(ValueError, match="unknown pruning.retrain 'rewind'; accepted: weight_rewind, lr_rewind"):
        checked(tiny_cfg("pruning.retrain=rewind"))


@pytest.mark.slow
def test_the_comparison_runs_and_reports_accuracy_against_cost(tmp_path):
    """experiment=compare_lenet_mnist shrunk onto synthetic data: six methods as one multirun, each job two
    replicates; lottery-report draws accuracy against weights remaining and against training cost, one line per
    method, and the aggregated table carries the cost."""
    from conftest import run_cli
    sweep = tmp_path / "sweep"
    r = run_cli("-m", "experiment=compare_lenet_mnist", "dataset=synthetic", "dataset.val_size=128",
                "train.duration=40it", "train.milestones=[20it,30it]", "train.on_chance=continue",
                "train.eval_every=20it", "train.batch_size=32", "train.progress=false", "pruning.levels=3",
                "pruning.rate=0.5", "replicas=2", "dst.delta_t=10", "method=imp,lr_rewind,finetune,snip,random_erk,rigl",
                f"hydra.sweep.dir={sweep}", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rep = run_cli(str(sweep), "--out", str(tmp_path / "report"), entry="lottery.report:main", cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr
    import csv
    with open(tmp_path / "report" / "aggregate.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    methods = {row["method"] for row in rows}
    assert {"IMP (magnitude), original init", "IMP (magnitude), LR rewound to 0", "IMP (magnitude), fine-tuned",
            "SNIP at init", "random at init, ERK densities", "RigL, ERK densities"} <= methods, methods
    assert all(row["cost_flops_mean"] for row in rows if row["branch"] == "ticket")
    assert all(row["test_accuracy_n"] == "2" for row in rows if row["branch"] == "ticket")
    # IMP's level 2 cost includes levels 0 and 1; pruning at init costs only its own training
    by = {(row["method"], row["level"]): float(row["cost_flops_mean"]) for row in rows}
    assert by[("IMP (magnitude), original init", "2")] > 2.5 * by[("SNIP at init", "2")]
    assert (tmp_path / "report" / "cost.png").exists() and (tmp_path / "report" / "methods.png").exists()
    svg = (tmp_path / "report" / "cost.svg").read_text()
    assert "RigL, ERK densities" in svg and "training FLOPs" in svg


@pytest.mark.slow
def test_a_killed_dynamic_sparse_run_resumes_bit_identical(tmp_path):
    """The masks change during training: a checkpoint holds them, so a SIGKILL between two mask updates resumes to
    exactly the uninterrupted run's results and masks."""
    import signal
    from conftest import TINY, fault, run_cli, stable
    args = [*TINY, *DST_RUN[:-1], "train.duration=60it", "dst=rigl", "checkpoint.every=20it", "device=cpu"]
    ref = tmp_path / "ref"
    assert run_cli(*args, f"hydra.run.dir={ref}", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"}).returncode == 0
    run = tmp_path / "run"
    fault_args, env = fault({"OMP_NUM_THREADS": "1"}, kill_at=35, level=1)
    r = run_cli(*args, *fault_args, f"hydra.run.dir={run}", cwd=tmp_path, env=env)
    assert r.returncode == -signal.SIGKILL, r.stderr
    r = run_cli(*args, *fault_args, f"hydra.run.dir={run}", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "level 1 ticket: resuming from step 20" in r.stdout + r.stderr
    assert stable(json.loads((run / "summary.json").read_text())) == \
        stable(json.loads((ref / "summary.json").read_text()))
    from lottery.experiment.ticket import load_ticket
    a, b = (load_ticket(d / "levels" / "level_1" / "ticket.pt").masks for d in (ref, run))
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.slow
def test_the_cifar10_comparison_composes_and_runs_shrunk(tmp_path):
    """experiment=compare_conv2_cifar10 (Conv-2, step schedule, global pruning, replicas=3) shrunk onto synthetic
    CIFAR-shaped data: IMP with learning-rate rewinding and RigL, each job two replicates, finish and record their cost."""
    from conftest import run_cli
    sweep = tmp_path / "sweep"
    r = run_cli("-m", "experiment=compare_conv2_cifar10", "dataset=synthetic", "dataset.synthetic_shape=cifar10",
                "dataset.synthetic_train=256", "dataset.val_size=64", "train.duration=8it", "train.eval_every=8it",
                "train.milestones=[4it,6it]", "train.batch_size=16", "train.progress=false", "pruning.levels=2",
                "train.on_chance=continue",
                "replicas=2", "dst.delta_t=2", "method=lr_rewind,rigl", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    summaries = sorted(sweep.glob("*/replicate_*/summary.json"))
    assert len(summaries) == 4, summaries
    for path in summaries:
        records = json.loads(path.read_text())
        levels = [rec["level"] for rec in records]
        # IMP trains the dense level 0 first; RigL is sparse from the start (its level 1 only)
        assert levels == ([0, 1] if "method-lr_rewind" in str(path) else [1]), (path, levels)
        assert all(rec["cost_flops"] > 0 for rec in records)
    # this many overrides make a job folder name past 255 bytes: it is cut and ends in a digest of the whole
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 2 and all(len(j.encode()) < 255 and "~" in j for j in jobs), jobs
    config = (next(sweep.glob("0_*")) / "replicate_0" / "config.yaml").read_text()
    assert "name: conv2" in config and "schedule: step" in config
