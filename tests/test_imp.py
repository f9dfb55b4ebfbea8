"""The training loop and the IMP driver: masks hold under every optimizer, rewinds are exact, controls do what they
claim, early stopping uses validation data, results land in the run-folder contract, and retraining reproduces."""
import copy
import json
import math

import pytest
import torch

from lottery import masks as M
from lottery import pruning
from lottery.experiment import retrain_ticket, run_experiment
from lottery.core.files import load_torch
from lottery.init import initialize
from lottery.models import build_model
from lottery.experiment.ticket import load_ticket
from lottery.core.steps import Steps
from lottery.training import Hooks, early_stop, lr_schedule

from conftest import synthetic_split, tiny_cfg, train_one


def synthetic(shape="mnist"):
    return synthetic_split(shape)


@pytest.mark.parametrize("opt", [
    ["optimizer=sgd", "optimizer.momentum=0.99", "optimizer.weight_decay=0.1", "optimizer.nesterov=true"],
    ["optimizer=sgd", "optimizer.momentum=0.9", "optimizer.lr=0.5"],
    ["optimizer=adam", "optimizer.lr=0.05", "optimizer.weight_decay=0.01"],
    ["optimizer=adamw", "optimizer.lr=0.05", "optimizer.weight_decay=0.5"],
])
def test_pruned_weights_exactly_zero_after_every_step(opt):
    """Pitfall 2: momentum, Adam moments and weight decay must not revive pruned weights."""
    cfg = tiny_cfg(*opt, "train.duration=80it")
    data = synthetic()
    model = build_model("lenet_300_100", data.pool.input_shape, 10)
    initialize(model, cfg.init, 0)
    prunable = M.prunable_tensors(model, cfg.pruning)
    masks = M.ones(model, prunable)
    for _ in range(3):  # 48.8% remaining: plenty of pruned entries with live gradients
        masks = pruning.prune(model, masks, prunable, cfg.pruning, batches=iter(()), generator=torch.Generator())
    M.apply(model, masks)
    params = dict(model.named_parameters())
    start = {n: params[n].detach().clone() for n in masks}
    violations = []

    def check(step):
        for n, m in masks.items():
            if params[n][m == 0].abs().max() != 0:
                violations.append((step, n))

    train_one(model, masks, data, cfg, start=0, data_seed=0, hooks=Hooks(at_step={s: (lambda s=s: check(s))
                                                                               for s in range(1, 81)}))
    assert violations == []
    for n, m in masks.items():  # survivors did train, negative ones included (pitfall 1)
        moved = (params[n] != start[n]) & (m == 1)
        assert moved[start[n] < 0].float().mean() > 0.9
        assert moved[start[n] > 0].float().mean() > 0.9


def test_early_stop_uses_validation_not_test():
    """Pitfall 10."""
    evals = [{"step": 0, "val_loss": 2.0, "test_accuracy": 0.1},
             {"step": 100, "val_loss": 0.5, "test_accuracy": 0.8},
             {"step": 200, "val_loss": 0.7, "test_accuracy": 0.95}]
    assert early_stop(evals)["early_stop_step"] == 100
    assert early_stop(evals)["early_stop_test_accuracy"] == 0.8
    assert early_stop([{"step": 0, "val_loss": None, "test_accuracy": 0.5}])["early_stop_step"] is None


def test_lr_schedules():
    over = ("train.schedule=step", "train.milestones=[10it,20it]", "train.gamma=0.1", "train.warmup=4it")
    cfg = tiny_cfg(*over)
    f = lr_schedule(cfg.train, Steps.resolve(tiny_cfg(*over, "train.duration=30it"), 5))
    assert [f(s) for s in (0, 1, 3, 4, 9, 10, 19, 20, 29)] == pytest.approx(
        [0.25, 0.5, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    cos = lr_schedule(tiny_cfg("train.schedule=cosine").train,
                      Steps.resolve(tiny_cfg("train.schedule=cosine", "train.duration=100it"), 5))
    assert cos(0) == 1.0 and cos(50) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0, abs=1e-12)
    one_epoch = tiny_cfg("train.milestones=[1ep]", "train.schedule=step", "train.duration=100it")
    assert lr_schedule(one_epoch.train, Steps.resolve(one_epoch, 7))(7) == pytest.approx(0.1)


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def imp_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("imp") / "run"
    cfg = tiny_cfg("pruning.levels=3", "pruning.branches=[reinit,random_prune,shuffle]")
    run_experiment(cfg, run_dir)
    return run_dir, cfg


def test_run_folder_contract(imp_run):
    run_dir, _ = imp_run
    summary = _summary(run_dir)
    assert [(r["level"], r["branch"]) for r in summary] == [
        (0, "ticket"), (1, "ticket"), (1, "random_prune"), (1, "reinit"), (1, "shuffle"),
        (2, "ticket"), (2, "random_prune"), (2, "reinit"), (2, "shuffle")]
    for r in summary:
        for key in ("weights_remaining", "params_remaining", "layer_density", "test_accuracy", "early_stop_step",
                    "early_stop_test_accuracy"):
            assert key in r
    lvl = {r["level"]: r for r in summary if r["branch"] == "ticket"}
    # exact counts: 20% of fc and 10% of output weights per level
    assert lvl[1]["weights_remaining_count"] == 188160 + 24000 + 900
    assert lvl[2]["weights_remaining"] == (150528 + 19200 + 810) / 266200
    assert lvl[2]["layer_density"] == {"hidden.0.weight": 0.64, "hidden.1.weight": 0.64, "out.weight": 0.81}
    assert 0 < lvl[2]["params_remaining"] < 1 and lvl[2]["params_remaining"] > lvl[2]["weights_remaining"]
    for level in range(3):
        assert (run_dir / "levels" / f"level_{level}" / "ticket.pt").exists()
    assert (run_dir / "config.yaml").exists() and (run_dir / "metrics.jsonl").exists()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {(d["level"], d["branch"]) for d in lines} >= {(0, "ticket"), (2, "shuffle")}


def test_rewind_to_initialization_is_exact(imp_run):
    """Pitfall 4: the weights a level starts from equal the saved initialization, masked, exactly."""
    run_dir, _ = imp_run
    init = load_torch(run_dir / "init.pt")
    for level in (1, 2):
        ticket = load_ticket(run_dir / "levels" / f"level_{level}" / "ticket.pt")
        assert ticket.rewind_step == 0
        for name, value in init.items():
            expected = value * ticket.masks[name] if name in ticket.masks else value
            assert torch.equal(ticket.rewind_state[name], expected), name
        assert ticket.metrics["branch"] == "ticket"


def test_load_into_gives_the_tickets_masked_rewind_weights(imp_run):
    """`lottery.experiment.ticket.load_into`, the documented way (docs/concepts.md) to use a ticket in your own code."""
    from lottery.experiment.ticket import load_into
    run_dir, _ = imp_run
    ticket = load_ticket(run_dir / "levels" / "level_2" / "ticket.pt")
    model = build_model("lenet_300_100", (1, 28, 28), 10)
    masks = load_into(model, ticket)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), ticket.rewind_state[name]), name
        if name in masks:
            assert torch.equal(masks[name].bool(), ticket.masks[name]) and torch.all(p[masks[name] == 0] == 0)


def test_masks_come_from_previous_level_trained_weights(imp_run):
    run_dir, cfg = imp_run
    t1 = load_ticket(run_dir / "levels" / "level_1" / "ticket.pt")
    t2 = load_ticket(run_dir / "levels" / "level_2" / "ticket.pt")
    final1 = load_torch(run_dir / "levels" / "level_1" / "final.pt")
    model = build_model("lenet_300_100", (1, 28, 28), 10)
    prunable = M.prunable_tensors(model, cfg.pruning)
    masks1 = {n: m.float() for n, m in t1.masks.items()}
    model.load_state_dict(final1)
    expected = pruning.prune(model, masks1, prunable, cfg.pruning, batches=iter(()), generator=torch.Generator())
    for n in t2.masks:
        assert torch.equal(expected[n].bool(), t2.masks[n])
        assert torch.all(t2.masks[n] <= t1.masks[n])


def test_controls_change_only_what_they_claim(imp_run):
    """Pitfall 9: reinit keeps masks and changes weights; random_prune / shuffle keep counts and change masks."""
    run_dir, _ = imp_run
    s = {(r["level"], r["branch"]): r for r in _summary(run_dir)}
    for level in (1, 2):
        ticket = s[(level, "ticket")]
        for branch in ("reinit", "random_prune", "shuffle"):
            assert s[(level, branch)]["weights_remaining_count"] == ticket["weights_remaining_count"]
            assert s[(level, branch)]["layer_density"] == ticket["layer_density"]
        assert s[(level, "reinit")]["test_loss"] != ticket["test_loss"]
        assert s[(level, "random_prune")]["test_loss"] != ticket["test_loss"]


def test_reinit_and_random_prune_inputs(tmp_path):
    """Look inside the controls: capture the model each branch starts from."""
    from lottery.experiment import units
    seen = {}
    original = units._train

    def spy(group, *args):
        for job, _ in group:
            seen[(job.level, job.branch)] = ({n: p.detach().clone() for n, p in job.model.named_parameters()},
                                             {n: m.clone() for n, m in job.masks.items()}, job.start)
        return original(group, *args)

    units._train = spy
    try:
        run_experiment(tiny_cfg("pruning.levels=2", "pruning.branches=[reinit,random_prune]"), tmp_path / "r")
    finally:
        units._train = original
    w_t, m_t, _ = seen[(1, "ticket")]
    w_r, m_r, _ = seen[(1, "reinit")]
    w_p, m_p, _ = seen[(1, "random_prune")]
    for n in m_t:
        assert torch.equal(m_r[n], m_t[n])                  # reinit: same masks
        assert not torch.equal(w_r[n], w_t[n])              # ... new weights
        assert not torch.equal(m_p[n], m_t[n])              # random_prune: new masks
        assert torch.equal(w_p[n], (w_t[n] != 0) * 0 + load_torch(tmp_path / "r" / "rewind.pt")[n] * m_p[n])
    for n in ("hidden.0.bias", "out.bias"):
        assert torch.equal(w_p[n], w_t[n])                  # unpruned tensors: the rewound values


@pytest.mark.slow
def test_rewind_to_step_k_saves_weights_after_k_steps_and_bn_statistics(tmp_path):
    """Rewinding to step k restores the full state after k steps, BatchNorm running statistics included (pitfall 5),
    and later levels train from step k to the end with a fresh optimizer."""
    over = ["model=resnet20", "model.width=4", "dataset.synthetic_shape=cifar10", "dataset.augment=true",
            "pruning=global", "pruning.exclude=[*shortcut*,out.weight]", "pruning.levels=2", "pruning.branches=[]",
            "pruning.rewind=10it", "optimizer=sgd", "optimizer.lr=0.05", "train.duration=30it"]
    run_experiment(tiny_cfg(*over), tmp_path / "a")
    rewind = load_torch(tmp_path / "a" / "rewind.pt")
    # An independent run of only the first 10 steps ends where the rewind point was saved.
    short = tiny_cfg(*over, "pruning=none", "train.duration=10it")
    data = synthetic_split("cifar10", short.dataset.synthetic_train, short.dataset.synthetic_test,
                           short.dataset.val_size, augment=True)
    model = build_model("resnet20", data.pool.input_shape, 10, width=4)
    initialize(model, short.init, 0)
    train_one(model, {}, data, short, start=0, data_seed=0)
    for name, value in model.state_dict().items():
        assert torch.equal(rewind[name], value), name
    assert any("running_mean" in n for n in rewind)
    ticket = load_ticket(tmp_path / "a" / "levels" / "level_1" / "ticket.pt")
    assert ticket.rewind_step == 10
    for name, value in rewind.items():
        expected = value * ticket.masks[name] if name in ticket.masks else value
        assert torch.equal(ticket.rewind_state[name], expected), name
    level1 = json.loads((tmp_path / "a" / "levels" / "level_1" / "ticket" / "result.json").read_text())
    assert level1["start_step"] == 10 and level1["evals"][0]["step"] == 10
    assert not any("shortcut" in n for n in ticket.masks) and "out.weight" not in ticket.masks


def test_target_and_one_shot(tmp_path):
    run_experiment(tiny_cfg("pruning.target=0.5", "pruning.branches=[]"), tmp_path / "t")
    s = _summary(tmp_path / "t")
    assert len(s) == 5 and s[-1]["weights_remaining"] <= 0.5 < s[-2]["weights_remaining"]
    run_experiment(tiny_cfg("pruning.target=0.2", "pruning.one_shot=true", "pruning.branches=[reinit]"),
                   tmp_path / "o")
    s = _summary(tmp_path / "o")
    assert [(r["level"], r["branch"]) for r in s] == [(0, "ticket"), (1, "ticket"), (1, "reinit")]
    assert s[1]["weights_remaining_count"] == round(0.2 * 235200) + round(0.2 * 30000) + round(0.2 * 1000)


def test_rerun_returns_at_once_and_other_experiment_is_refused(imp_run):
    run_dir, cfg = imp_run
    before = (run_dir / "summary.json").read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in run_dir.glob("levels/*/*/result.json")}
    run_experiment(cfg, run_dir)
    assert {p: p.stat().st_mtime_ns for p in run_dir.glob("levels/*/*/result.json")} == mtimes
    assert (run_dir / "summary.json").read_text() == before
    with pytest.raises(ValueError, match="already holds a different experiment.*optimizer.lr"):
        run_experiment(tiny_cfg("pruning.levels=3", "optimizer.lr=0.5"), run_dir)


def test_folder_from_an_older_version_resumes_unless_a_new_option_is_used():
    """A key added to lottery later is missing from an old folder's config.yaml: no difference at its default."""
    from omegaconf import OmegaConf

    from lottery.experiment.folder import differences
    new = OmegaConf.to_container(tiny_cfg("pruning.levels=2"), resolve=True)
    old = copy.deepcopy(new)
    del old["pruning"]["rounds"]
    assert differences(old, new) == []
    new["pruning"]["rounds"] = 3
    assert differences(old, new) == ["pruning.rounds"]
    new["pruning"]["rounds"] = 1
    del old["branch"]["lmc"]  # settings of a branch added later, not used by this run
    assert differences(old, new) == []
    new["pruning"]["branches"] = ["lmc"]  # the branch added to an older folder: at its settings' defaults, no difference
    assert differences(old, new) == []
    new["branch"]["lmc"]["points"] = 5
    assert differences(old, new) == ["branch.lmc.points"]
    new["pruning"]["branches"] = []
    new["pruning"]["criterion"]["name"] = "snip"  # a criterion setting added later, at its default: no difference
    new["pruning"]["criterion"]["num_batches"] = 1
    old["pruning"]["criterion"] = {"name": "snip"}
    assert differences(old, new) == []
    new["pruning"]["criterion"]["num_batches"] = 2
    assert differences(old, new) == ["pruning.criterion.num_batches"]
    new["pruning"]["criterion"] = old["pruning"]["criterion"] = {"name": "magnitude"}
    new["optimizer"]["lr"] = 0.5
    assert differences(old, new) == ["optimizer.lr"]


def test_branch_added_later_to_finished_run(tmp_path):
    run_experiment(tiny_cfg("pruning.levels=2", "pruning.branches=[]"), tmp_path / "r")
    first = _summary(tmp_path / "r")
    run_experiment(tiny_cfg("pruning.levels=2", "pruning.branches=[shuffle]"), tmp_path / "r")
    second = _summary(tmp_path / "r")
    assert [(r["level"], r["branch"]) for r in second] == [(0, "ticket"), (1, "ticket"), (1, "shuffle")]
    assert second[:2] == first


def test_branches_at_chosen_levels_only_and_more_levels_later(tmp_path, caplog):
    """pruning.branch_levels: the controls train at the listed levels only (the plan counts only those), the same
    folder takes more levels later, and a level the run does not have is refused before any work."""
    run = tmp_path / "r"
    with caplog.at_level("INFO", logger="lottery.experiment.progress"):
        run_experiment(tiny_cfg("pruning.levels=4", "pruning.branches=[reinit]", "pruning.branch_levels=[2]"), run)
    assert [(r["level"], r["branch"]) for r in _summary(run)] == [
        (0, "ticket"), (1, "ticket"), (2, "ticket"), (2, "reinit"), (3, "ticket")]
    assert "this run: 5 units" in caplog.text
    assert not (run / "levels" / "level_1" / "reinit").exists()
    run_experiment(tiny_cfg("pruning.levels=4", "pruning.branches=[reinit]", "pruning.branch_levels=[1,2]"), run)
    assert [(r["level"], r["branch"]) for r in _summary(run)][:4] == [
        (0, "ticket"), (1, "ticket"), (1, "reinit"), (2, "ticket")]
    with pytest.raises(ValueError, match=r"pruning.branch_levels names level 4, which this run does not have "
                                         r"\(it trains levels 0, 1, 2, 3\)"):
        run_experiment(tiny_cfg("pruning.levels=4", "pruning.branches=[reinit]", "pruning.branch_levels=[4]"),
                       tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_retrain_reproduces_level_from_ticket(imp_run, tmp_path):
    run_dir, cfg = imp_run
    ticket_path = run_dir / "levels" / "level_2" / "ticket.pt"
    cfg2 = tiny_cfg("pruning.levels=3", "pruning.branches=[reinit,random_prune,shuffle]")
    summary = retrain_ticket(cfg2, ticket_path, tmp_path / "retrain")
    original = next(r for r in _summary(run_dir) if r["level"] == 2 and r["branch"] == "ticket")
    assert summary[0]["branch"] == "retrain"
    for key in ("test_accuracy", "test_loss", "early_stop_step", "early_stop_test_accuracy", "weights_remaining",
                "layer_density"):
        assert summary[0][key] == original[key], key
    other = retrain_ticket(tiny_cfg("pruning.levels=3", "seed=5"), ticket_path, tmp_path / "retrain_seed5")
    assert other[0]["weights_remaining"] == original["weights_remaining"]
    assert other[0]["test_loss"] != original["test_loss"]


def test_evaluations_every_n_steps_and_at_the_end(imp_run):
    run_dir, _ = imp_run
    result = json.loads((run_dir / "levels" / "level_0" / "ticket" / "result.json").read_text())
    assert [e["step"] for e in result["evals"]] == [0, 20, 40, 60]
    assert all(math.isfinite(e["val_loss"]) for e in result["evals"])
    assert result["evals"][0]["train_loss"] is None and result["evals"][1]["train_loss"] > 0


def test_second_process_in_the_same_run_folder_is_refused(tmp_path):
    import fcntl
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    with open(run_dir / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another process is running in"):
            run_experiment(tiny_cfg("pruning=none"), run_dir)
    assert not (run_dir / "config.yaml").exists()
    run_experiment(tiny_cfg("pruning=none"), run_dir)  # once the lock is free the run goes ahead
    assert (run_dir / "summary.json").exists()
