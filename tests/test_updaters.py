"""The mask-updater protocol (issue 27): a user's own updater from their module for one network and replicas in both
layouts, its state through a kill and resume, checkpoints written before updaters, and refusals in one line."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from lottery.core.files import load_torch, save_torch
from lottery.experiment import run_experiment
from lottery.experiment.ticket import load_ticket
from lottery.training.updaters import checkpoint_state

from conftest import REPO, TINY, fault, run_cli, stable, tiny_cfg

PLUGINS = REPO / "tests" / "plugins"
USER = ["imports=[my_lottery_ext]", f"hydra.searchpath=[file://{PLUGINS / 'conf'}]", "dst=magnitude_drop"]
# sparse at initialization (ERK densities, one level), 60 steps: the toy updater drops at steps 20, 40 and 60
SPARSE = ["pruning.levels=2", "method=random", "pruning=global", "pruning.scope=erk", "pruning.exclude=[]",
          "pruning.branches=[]", "train.duration=60it"]
ENV = {"PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}


def _result(run, level=1, branch="ticket"):
    return json.loads((run / "levels" / f"level_{level}" / branch / "result.json").read_text())


def _same(a, b):
    drop = ("device_info", "wall_time_s", "provenance")
    return [{k: v for k, v in r.items() if k not in drop} for r in a] == \
        [{k: v for k, v in r.items() if k not in drop} for r in b]


@pytest.mark.slow
def test_a_users_updater_runs_alone_and_as_replicas_in_both_layouts(tmp_path, plugins_on_path):
    """magnitude_drop (tests/plugins/my_lottery_ext.py + conf/dst/magnitude_drop.yaml): one module and one YAML
    file. Each drop removes exactly `count` weights of every layer; replicas=2 interleaved ends exactly as two single
    runs, stacked with the same counts."""
    static = run_experiment(tiny_cfg(*SPARSE), tmp_path / "static")[0]
    one = run_experiment(tiny_cfg(*SPARSE, *USER), tmp_path / "one")
    res = _result(tmp_path / "one")
    assert [s for s, _ in res["mask_changes"]] == [0, 20, 40, 60] and one[0]["drops"] == 3
    layers = len(static["layer_density"])
    assert one[0]["weights_remaining_count"] == static["weights_remaining_count"] - 3 * 3 * layers
    masks = load_ticket(tmp_path / "one" / "levels" / "level_1" / "ticket.pt").masks
    final = load_torch(tmp_path / "one" / "levels" / "level_1" / "final.pt")
    assert all((final[n][~m] == 0).all() for n, m in masks.items())  # dropped weights are exactly zero
    # its training cost is counted span by span at the densities it had: less than at the starting densities
    assert one[0]["train_flops"] < static["train_flops"]

    run_experiment(tiny_cfg(*SPARSE, *USER, "replicas=[0,1]", "replica_batching=interleaved"), tmp_path / "many")
    single_1 = run_experiment(tiny_cfg(*SPARSE, *USER, "seed=1"), tmp_path / "one_1")
    for seed, single in ((0, one), (1, single_1)):
        many = json.loads((tmp_path / "many" / f"replicate_{seed}" / "summary.json").read_text())
        assert _same(many, single)
    run_experiment(tiny_cfg(*SPARSE, *USER, "replicas=[0,1]", "replica_batching=stacked"), tmp_path / "stacked")
    for seed, single in ((0, one), (1, single_1)):
        stacked = json.loads((tmp_path / "stacked" / f"replicate_{seed}" / "summary.json").read_text())
        assert stacked[0]["weights_remaining_count"] == single[0]["weights_remaining_count"]
        assert stacked[0]["layer_density"] == single[0]["layer_density"] and stacked[0]["drops"] == 3
        assert stacked[0]["test_loss"] == pytest.approx(single[0]["test_loss"], rel=1e-3)


def _kill_and_resume(tmp_path, args, edit=None, level=1):
    """(reference summary, resumed summary, their folders): a run killed at step 35 of `level` (checkpoint at 20),
    its checkpoint optionally rewritten by `edit`, then resumed."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    out = run_cli(*args, f"hydra.run.dir={ref}", cwd=tmp_path, env=ENV)  # before `args` loses its imports
    assert out.returncode == 0, out.stderr[-3000:]
    _, env = fault(ENV, kill_at=35, level=level)
    user = [a[len("imports=["):-1] for a in args if a.startswith("imports=")]
    args = [a for a in args if not a.startswith("imports=")]
    fault_args = [f"imports=[{','.join(['faults', *user])}]"]
    assert run_cli(*args, *fault_args, f"hydra.run.dir={run}", cwd=tmp_path, env=env).returncode == -signal.SIGKILL
    ckpt = run / "levels" / f"level_{level}" / "ticket" / "checkpoint.pt"
    if edit is not None:
        save_torch(edit(load_torch(ckpt)), ckpt)
    out = run_cli(*args, *fault_args, f"hydra.run.dir={run}", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"level {level} ticket: resuming from step 20" in out.stdout + out.stderr
    return (stable(json.loads((d / "summary.json").read_text())) for d in (ref, run)), (ref, run)


@pytest.mark.slow
def test_a_users_updater_state_comes_back_on_resume(tmp_path):
    """The toy updater's own counter (`drops`) and its masks are in the checkpoint through its state_dict: a SIGKILL
    between two drops resumes to exactly the uninterrupted run."""
    args = [*TINY, *SPARSE, *USER, "device=cpu", "checkpoint.every=20it"]
    (ref, got), (a, b) = _kill_and_resume(tmp_path, args)
    assert got == ref and ref[0]["drops"] == 3
    ma, mb = (load_ticket(d / "levels" / "level_1" / "ticket.pt").masks for d in (a, b))
    assert all(torch.equal(ma[n], mb[n]) for n in ma)


def _old_format(state: dict) -> dict:
    """A checkpoint as the loop wrote it before mask updaters (commit 2b4b1aa, lottery/training/loop.py): the
    masks, mask_changes and gradient_steps beside the model, no `updater` entry."""
    updater = state.pop("updater")
    assert updater["name"] == "rigl"
    state.update(masks=updater["masks"], mask_changes=updater["mask_changes"],
                 gradient_steps=updater["gradient_steps"])
    return state


@pytest.mark.slow
def test_a_rigl_checkpoint_written_before_updaters_still_resumes(tmp_path):
    args = [*TINY, *SPARSE, "dst=rigl", "dst.delta_t=10", "device=cpu", "checkpoint.every=20it"]
    (ref, got), (a, b) = _kill_and_resume(tmp_path, args, edit=_old_format)
    assert got == ref
    assert _result(a)["mask_changes"] == _result(b)["mask_changes"] and len(_result(a)["mask_changes"]) == 5


def test_a_checkpoint_of_another_updater_is_refused_in_one_line():
    state = {"step": 20, "masks": {}, "mask_changes": [[0, {}]], "gradient_steps": []}
    assert checkpoint_state("set", state)["mask_changes"] == [[0, {}]]  # the format before updaters
    with pytest.raises(ValueError, match="written by dynamic sparse training before mask updaters .* uses dst=gmp"):
        checkpoint_state("gmp", state)
    with pytest.raises(ValueError, match="written by mask updater 'set', this run uses 'rigl'; resume with dst=set"):
        checkpoint_state("rigl", {"step": 20, "updater": {"name": "set"}})
    with pytest.raises(ValueError, match="holds no mask-updater state .* this run uses dst=rigl"):
        checkpoint_state("rigl", {"step": 20, "model": {}})


def test_a_users_updater_settings_are_checked_before_any_work(plugins_on_path):
    from lottery.experiment.check import checked
    with pytest.raises(ValueError, match="unknown key dst.size for mask updater 'magnitude_drop'; accepted: every, "
                                         "count"):
        checked(tiny_cfg(*USER, "+dst.size=3"))
    with pytest.raises(ValueError, match="dst.every must be >= 1"):
        checked(tiny_cfg(*USER, "dst.every=0"))


# --- gradual magnitude pruning ---------------------------------------------------------------------------------------

GMP = ["method=gmp", "pruning=global", "pruning.levels=3", "pruning.rate=0.6", "pruning.exclude=[]",
       "pruning.branches=[]", "train.duration=60it", "dst.delta_t=10", "dst.end=0.9"]


def test_gmp_prunes_the_smallest_survivors_to_the_cubic_schedule_exactly():
    """One layer by hand: dense at the start, then at each pruning step exactly round_half_up(d_t * weights) kept,
    d_t the closed form, the kept ones the largest magnitudes among the survivors, the last step exactly the target."""
    from torch import nn
    from lottery.pruning.selection import round_half_up
    from lottery.training.gmp import GradualMagnitude, cubic_density
    from lottery.training.updaters import Context, make_layers
    torch.manual_seed(0)
    layer = nn.Linear(20, 10, bias=False)
    mask = (torch.rand(10, 20) < 0.1).float()  # 20 of 200 weights: the unit's target
    target = int(mask.sum())
    settings = {"delta_t": 5, "begin": 0.1, "end": 0.6, "distribution": "uniform"}
    up = GradualMagnitude(settings, Context(100, 0, 100, [0], make_layers([(layer.weight, mask, [(0, None, "w")])], 1)))
    assert up.begin(0) == [0] and int(mask.sum()) == 200
    assert up.updates() == [15, 20, 25, 30, 35, 40, 45, 50, 55, 60]  # t_0 = 10, n = 10
    opt = torch.optim.SGD([layer.weight], lr=0.1)
    before = mask.clone()
    for step in range(1, 101):
        with torch.no_grad():
            layer.weight.add_(torch.randn(10, 20) * 0.1)  # training moves the weights between pruning steps
        changed = up.after_step(step, opt, [True])
        if step not in up.updates():
            assert changed == [] and torch.equal(mask, before)
            continue
        d = cubic_density(step, 10, 10, 5, target / 200)
        assert d == pytest.approx(target / 200 + (1 - target / 200) * (1 - (step - 10) / 50) ** 3)
        assert int(mask.sum()) == (target if step == 60 else round_half_up(d * 200))
        assert ((mask == 1) <= (before == 1)).all()  # survivors only
        kept, gone = layer.weight.abs()[mask == 1], layer.weight.abs()[(before == 1) & (mask == 0)]
        assert gone.numel() == 0 or kept.min() >= gone.max()
        before = mask.clone()
    assert [s for s, _ in up.result(0)["mask_changes"]] == [0, *up.updates()]


@pytest.mark.parametrize("distribution", ["uniform", "erk", "global"])
def test_gmp_runs_each_level_from_dense_to_its_count(tmp_path, distribution):
    from lottery.pruning.densities import allocate
    from lottery.pruning.selection import round_half_up
    from lottery.training.gmp import cubic_density
    records = run_experiment(tiny_cfg(*GMP, f"dst.distribution={distribution}"), tmp_path / "r")
    static = run_experiment(tiny_cfg(*GMP, "method=random", "dst=none"), tmp_path / "static")
    for rec, ref in zip(records, static):
        assert rec["weights_remaining_count"] == ref["weights_remaining_count"]  # exactly the level's count
        # dense at first, then sparser: between the dense cost and the static cost at the final density
        assert ref["train_flops"] < rec["train_flops"] < rec["train_flops_dense"]
    res = _result(tmp_path / "r", level=2)
    init = load_torch(tmp_path / "r" / "init.pt")
    shapes = {n: tuple(init[n].shape) for n in res["layer_density"]}
    size = sum(torch.Size(s).numel() for s in shapes.values())
    final = records[1]["weights_remaining_count"]
    counts = [{n: round(d * torch.Size(shapes[n]).numel()) for n, d in dens.items()} for _, dens in res["mask_changes"]]
    assert [s for s, _ in res["mask_changes"]] == [0, 10, 20, 30, 40, 50] and sum(counts[0].values()) == size
    for (step, _), now, prev in zip(res["mask_changes"][1:], counts[1:], counts):
        want = final if step == 50 else round_half_up(cubic_density(step, 0, 5, 10, final / size) * size)
        assert sum(now.values()) == want
        if distribution != "global":
            assert now == allocate(distribution, shapes, want, upper=prev)
    masks = load_ticket(tmp_path / "r" / "levels" / "level_2" / "ticket.pt").masks
    trained = load_torch(tmp_path / "r" / "levels" / "level_2" / "final.pt")
    assert all((trained[n][~m] == 0).all() for n, m in masks.items())


def test_gmp_early_stop_is_chosen_among_evaluations_at_the_final_count(tmp_path):
    """An evaluation during gradual pruning is of a denser network than the ticket: the early stop is the best
    evaluation from the last pruning step (50) on. Here the denser network at step 10 had the lowest validation loss
    of all, so counting it would credit the 10% ticket with a denser network's accuracy."""
    records = run_experiment(tiny_cfg(*GMP, "pruning.rate=0.9", "train.eval_every=10it"), tmp_path / "r")
    evals = _result(tmp_path / "r", level=2)["evals"]
    assert min(evals, key=lambda e: e["val_loss"])["step"] < 50  # what an unfiltered early stop would pick
    best = min([e for e in evals if e["step"] >= 50], key=lambda e: e["val_loss"])
    assert records[1]["early_stop_step"] == best["step"] >= 50
    assert records[1]["early_stop_test_accuracy"] == best["test_accuracy"]


def test_gmp_replicas_interleaved_equal_single_runs(tmp_path):
    args = [*GMP, "pruning.levels=2"]
    run_experiment(tiny_cfg(*args, "replicas=[0,1]", "replica_batching=interleaved"), tmp_path / "many")
    for seed in (0, 1):
        one = run_experiment(tiny_cfg(*args, f"seed={seed}"), tmp_path / f"one_{seed}")
        assert _same(json.loads((tmp_path / "many" / f"replicate_{seed}" / "summary.json").read_text()), one)
    run_experiment(tiny_cfg(*args, "replicas=[0,1]", "replica_batching=stacked"), tmp_path / "stacked")
    for seed in (0, 1):
        a = json.loads((tmp_path / "stacked" / f"replicate_{seed}" / "summary.json").read_text())
        b = json.loads((tmp_path / f"one_{seed}" / "summary.json").read_text())
        assert [r["weights_remaining_count"] for r in a] == [r["weights_remaining_count"] for r in b]


@pytest.mark.slow
def test_a_killed_gmp_run_resumes_bit_identical(tmp_path):
    args = [*TINY, *GMP, "pruning.levels=2", "device=cpu", "checkpoint.every=20it"]
    (ref, got), (a, b) = _kill_and_resume(tmp_path, args)
    assert got == ref
    assert _result(a)["mask_changes"] == _result(b)["mask_changes"]
    ma, mb = (load_ticket(d / "levels" / "level_1" / "ticket.pt").masks for d in (a, b))
    assert all(torch.equal(ma[n], mb[n]) for n in ma)


def test_the_report_names_gradual_magnitude_pruning_by_its_distribution():
    from lottery.report.collect import method_label
    assert method_label({"dst.name": "gmp", "dst.distribution": "erk"}) == "gradual magnitude pruning, ERK densities"
    assert method_label({"dst.name": "gmp"}) == "gradual magnitude pruning, uniform densities"
    assert method_label({"dst.name": "rigl", "pruning.scope": "erk"}) == "RigL, ERK densities"


# --- early-bird tickets ----------------------------------------------------------------------------------------------

EARLY = ["method=early_bird", "pruning=global", "pruning.target=0.2", "pruning.exclude=[]", "pruning.branches=[]",
         "train.duration=200it", "train.eval_every=10it", "dst.eps=0.2"]


def test_the_early_bird_distance_is_the_fraction_of_kept_weights_that_changed():
    from lottery.training.early_bird import mask_distance, settled
    a = {"w": torch.tensor([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool)}
    b = {"w": torch.tensor([1, 0, 1, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool)}
    # one of the two kept weights moved: 0.5 (an all-weights Hamming distance would say 0.2)
    assert mask_distance(a, b) == 0.5 and mask_distance(a, a) == 0.0
    assert mask_distance(a, {"w": ~a["w"]}) == 1.0
    assert not settled([0.0] * 4, 5, 0.1)  # the window is not full yet: never stop
    assert settled([0.5, 0.09, 0.0, 0.05, 0.01, 0.09], 5, 0.1)
    assert not settled([0.09, 0.0, 0.05, 0.01, 0.1], 5, 0.1)  # the largest must be below eps


def test_the_early_bird_stop_rule_on_a_scripted_sequence_of_masks():
    """Checks at every evaluation (steps 10, 20, ...); scripted masks of two kept weights give the distances 1, 0.5,
    then 0: the window of five fills at the 6th check (holding 1), still holds 0.5 at the 7th, and the ticket is drawn
    at the 8th (step 80), the first whose last five distances are all below eps."""
    from torch import nn
    from lottery.training.early_bird import EarlyBird
    from lottery.training.updaters import Context, make_layers
    masks = [[0, 1], [2, 3], [2, 4], [2, 4], [2, 4], [2, 4], [2, 4], [2, 4], [2, 4]]
    script = [torch.zeros(40, dtype=torch.bool) for _ in masks]
    for m, idx in zip(script, masks):
        m[idx] = True

    class Scripted(EarlyBird):
        def check_mask(self, u):
            return {"w": self.script.pop(0)}

    layer = nn.Linear(8, 5, bias=False)
    mask = torch.ones(5, 8)
    up = Scripted({"target": 0.05, "every": 0, "window": 5, "eps": 0.1, "distribution": "global"},
                  Context(100, 0, 100, [0], make_layers([(layer.weight, mask, [(0, None, "w")])], 1)))
    up.script = list(script)
    for k in range(1, 10):
        up.at_eval(10 * k, {0: {}})
        if up.finished(0):
            break
    distances = [d for _, d in up.distances[0]]
    assert distances[:3] == [1.0, 0.5, 0.0]
    assert up.drawn_at[0] == 80 and max(distances[-5:]) < 0.1 and len(distances) == 7
    assert up.result(0)["early_bird_steps_saved"] == 20


def test_an_early_bird_run_draws_its_ticket_and_trains_it_rewound(tmp_path):
    from lottery.training.early_bird import EarlyBird
    from lottery.training.updaters import Context, make_layers
    records = run_experiment(tiny_cfg(*EARLY), tmp_path / "r")
    dense, ticket = records
    drawn = dense["early_bird_step"]
    assert drawn is not None and drawn % 10 == 0 and drawn < 200
    assert dense["train_steps"] == drawn and dense["early_bird_steps_saved"] == 200 - drawn
    assert ticket["early_bird_step"] == drawn and ticket["cost_steps"] == drawn + 200  # the saved training shows
    res = _result(tmp_path / "r", level=0)
    assert res["evals"][-1]["step"] == drawn and len(res["mask_distances"]) >= 5
    assert max(d for _, d in res["mask_distances"][-5:]) < 0.2
    # the ticket is the mask the last check drew: level 0's weights at the draw, pruned to pruning.target
    final = load_torch(tmp_path / "r" / "levels" / "level_0" / "final.pt")
    masks = load_ticket(tmp_path / "r" / "levels" / "level_1" / "ticket.pt").masks
    params = {n: torch.nn.Parameter(final[n].clone()) for n in masks}
    ones = {n: torch.ones_like(p) for n, p in params.items()}
    layers = make_layers([(params[n], ones[n], [(0, None, n)]) for n in masks], 1)
    up = EarlyBird({"target": 0.2, "every": 0, "window": 5, "eps": 0.2, "distribution": "global",
                    "granularity": "unstructured", "group_score": "sum"},
                   Context(200, 0, 200, [0], layers))
    assert all(torch.equal(up.check_mask(0)[n], masks[n]) for n in masks)
    rewind = load_ticket(tmp_path / "r" / "levels" / "level_1" / "ticket.pt").rewind_state
    init = load_torch(tmp_path / "r" / "init.pt")
    assert all(torch.equal(rewind[n], init[n] * masks[n]) for n in masks)  # rewound as IMP's (to step 0)


@pytest.mark.slow
def test_a_killed_early_bird_run_resumes_bit_identical(tmp_path):
    args = [*TINY, *EARLY, "device=cpu", "checkpoint.every=20it"]
    (ref, got), (a, b) = _kill_and_resume(tmp_path, args, level=0)
    assert got == ref and ref[0]["early_bird_step"] is not None
    assert _result(a, level=0)["mask_distances"] == _result(b, level=0)["mask_distances"]


# --- mask similarity -------------------------------------------------------------------------------------------------

def test_mask_overlap_by_hand():
    from lottery import masks as M
    a = {"x": torch.tensor([1, 1, 0, 0]), "y": torch.tensor([1, 0, 0, 0, 0, 0])}
    b = {"x": torch.tensor([1, 0, 1, 0]), "y": torch.tensor([1, 0, 0, 0, 0, 0])}
    assert M.overlap(a, b) == {"x": 0.5, "y": 1.0, "all": 2 * 2 / 6}


@pytest.mark.slow
def test_the_report_compares_tickets_between_seeds_and_between_methods(tmp_path):
    """Random masks of two seeds overlap about as much as chance (their density); magnitude-at-init masks of one
    seed against the random ones too; every pair at one level and density is in mask_similarity.csv, and the figure
    is drawn."""
    import csv
    from lottery.report import main
    args = ["pruning=global", "pruning.levels=3", "pruning.rate=0.5", "pruning.branches=[]", "pruning.exclude=[]",
            "replicas=2", "train.duration=20it"]
    run_experiment(tiny_cfg(*args, "method=random"), tmp_path / "runs" / "random")
    run_experiment(tiny_cfg(*args, "method=magnitude_init"), tmp_path / "runs" / "magnitude")
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    with open(tmp_path / "report" / "mask_similarity.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    reps = [r for r in rows if r["kind"] == "replicates" and r["layer"] == "all"]
    assert sorted((r["level"], r["a"]) for r in reps) == sorted(
        (str(lv), a) for lv in (1, 2) for a in {r["a"] for r in reps}) and len({r["a"] for r in reps}) == 2
    for r in reps:
        if "random" in r["a"]:  # independent random draws: the overlap is near the density
            assert abs(float(r["overlap"]) - float(r["chance"])) < 0.05
    methods = [r for r in rows if r["kind"] == "methods" and r["layer"] == "all"]
    assert {(r["level"], r["replicate_a"]) for r in methods} == {(lv, s) for lv in ("1", "2") for s in ("0", "1")}
    assert (tmp_path / "report" / "mask_similarity.png").exists()


@pytest.mark.slow
def test_early_bird_replicas_stop_on_their_own_and_equal_single_runs(tmp_path):
    """Each replicate is drawn on its own: interleaved, exactly as its single run; stacked, at the same step and with
    its single run's weights at the draw, within round-off (a network stopped while the others train on:
    test_a_network_the_updater_stops_keeps_the_weights_of_its_stop_in_both_layouts)."""
    args = [*EARLY, "dst.eps=0.3"]
    singles = [run_experiment(tiny_cfg(*args, f"seed={s}"), tmp_path / f"one_{s}") for s in (0, 1)]
    run_experiment(tiny_cfg(*args, "replicas=[0,1]", "replica_batching=interleaved"), tmp_path / "many")
    for s in (0, 1):
        assert _same(json.loads((tmp_path / "many" / f"replicate_{s}" / "summary.json").read_text()), singles[s])
    run_experiment(tiny_cfg(*args, "replicas=[0,1]", "replica_batching=stacked"), tmp_path / "stacked")
    for s in (0, 1):
        got = json.loads((tmp_path / "stacked" / f"replicate_{s}" / "summary.json").read_text())
        assert got[0]["early_bird_step"] == singles[s][0]["early_bird_step"] < 200
        a = load_torch(tmp_path / "stacked" / f"replicate_{s}" / "levels" / "level_0" / "final.pt")
        b = load_torch(tmp_path / f"one_{s}" / "levels" / "level_0" / "final.pt")
        assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4) for k in b)


def test_a_network_the_updater_stops_keeps_the_weights_of_its_stop_in_both_layouts():
    """The loop ends a network when its updater says so: it trains no further (its final_step and weights are those
    of the stop) while the others go on, also in the stacked layout, which computes every network on."""
    from lottery.core.steps import Steps
    from lottery.data import Batches
    from lottery.models import build_model
    from lottery.training import Hooks, MaskUpdater, Network, train
    from conftest import synthetic_split

    class StopFirstAt20(MaskUpdater):
        name = "stop_first_at_20"  # not registered: handed to train() directly

        def __init__(self, settings, ctx):
            super().__init__(settings, ctx)
            self.step = 0

        def after_step(self, step, optimizer, active):
            self.step = step
            return []

        def finished(self, u):
            return u == 0 and self.step >= 20

    cfg = tiny_cfg("optimizer=sgd", "optimizer.lr=0.05")
    split = synthetic_split()

    def run(seeds, layout):
        nets = []
        for s in seeds:
            torch.manual_seed(s)
            model = build_model("mlp", split.pool.input_shape, split.pool.num_classes, hidden=[16])
            masks = {n: torch.ones_like(p) for n, p in model.named_parameters() if p.dim() > 1}
            nets.append(Network(model, masks, Batches(split, 32, s), Hooks()))
        steps = Steps.resolve(cfg, nets[0].batches.steps_per_epoch)
        return nets, train(nets, cfg, start=0, steps=steps, layout=layout, updater=(StopFirstAt20, {}))

    single, (res,) = run([0], "interleaved")
    assert res["final_step"] == 20 and res["evals"][-1]["step"] == 20
    for layout in ("interleaved", "stacked"):
        nets, results = run([0, 1], layout)
        assert [r["final_step"] for r in results] == [20, 60]
        a, b = nets[0].model.state_dict(), single[0].model.state_dict()
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in b), layout


def test_each_updater_refuses_settings_that_cannot_take_effect_in_the_training():
    """The checks run before any work: no mask update at all within the training is refused in one line."""
    from lottery.training.dst import RigL, SET
    from lottery.training.gmp import GradualMagnitude
    for cls in (SET, RigL):
        cls.check_fit({"delta_t": 100, "end": 0.75}, 200)  # 150 steps of updates: one at step 100
        with pytest.raises(ValueError, match=r"dst.delta_t=100 is longer .* 75 steps"):
            cls.check_fit({"delta_t": 100, "end": 0.75}, 100)
    GradualMagnitude.check_fit({"delta_t": 10, "begin": 0.25, "end": 0.75}, 40)  # a span of 20 steps
    with pytest.raises(ValueError, match=r"dst.delta_t=30 is longer than the pruning span .* 20 steps"):
        GradualMagnitude.check_fit({"delta_t": 30, "begin": 0.25, "end": 0.75}, 40)
