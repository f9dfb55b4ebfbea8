"""Published numbers shipped with the presets (`paper:` blocks), `lottery-report --paper`, and Synaptic-Flow's counting
convention (pruning.counting=synflow) against a hand computation of their rule."""
import copy
import csv
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lottery import masks as M
from lottery import pruning
from lottery.config import job_dirname
from lottery.core.papers import check_block, published_interval
from lottery.experiment.folder import differences
from lottery.models import build_model
from lottery.pruning.schedule import synflow_drop, synflow_k
from lottery.report.paper import AGREES, DISAGREES, NOT_COMPARABLE, NO_NUMBERS, compare

from conftest import CONF, TINY, make_cfg, run_cli

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def number(**kw):
    n = {"claim": "test accuracy of the ticket", "place": "Figure 3", "page": 4, "metric": "test_accuracy",
         "branch": "ticket", "density": 50.0, "value": 98.0, "spread": {"kind": "min_max", "plus_minus": 0.2},
         "runs": 5, "iterations": 100}
    n.update(kw)
    return n


def block(*numbers):
    return {"source": "A & B 2019", "changes": "none", "numbers": list(numbers)}


# --- the blocks ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_has_a_well_formed_paper_block(preset):
    """Every preset says what it reproduces: numbers with their places, or why none is published."""
    cfg = make_cfg(f"experiment={preset}")
    b = OmegaConf.to_container(cfg.paper, resolve=True)
    assert b, f"conf/experiment/{preset}.yaml has no paper: block"
    check_block(b)
    assert b.get("numbers") or b.get("none_published")
    for n in b.get("numbers") or []:
        assert n["place"] and n["page"]


@pytest.mark.parametrize("change, message", [
    ({"place": None}, "no place"),
    ({"place": "the text"}, "no place"),
    ({"page": None}, "page must be"),
    ({"page": 0}, "page must be"),
    ({"metric": "accuracy"}, "unknown metric"),
    ({"density": 0}, "density must be"),
    ({"spread": {"kind": "none"}}, "tolerance"),
    ({"spread": {"kind": "min_max"}}, "min_max spread needs"),
    ({"spread": {"kind": "std", "plus_minus": 0.1, "low": 1}}, "takes"),
    ({"runs": None}, "runs must be"),
    ({"metric": "instability_test"}, "lmc branch"),
    ({"colour": "red"}, "unknown key"),
])
def test_a_number_without_place_or_readable_spread_is_refused(change, message):
    n = number(**change)
    n = {k: v for k, v in n.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        check_block(block(n))


def test_block_needs_numbers_or_a_reason():
    with pytest.raises(ValueError, match="none_published"):
        check_block({"source": "x", "changes": "none", "numbers": []})
    check_block({"source": "x", "changes": "none", "none_published": "none published at this scale"})
    check_block(block(number(page="not verified: no page numbers in the copy read")))


def test_a_bad_block_is_refused_before_any_work(tmp_path):
    r = run_cli(*TINY, "+paper.source=x", "+paper.changes=y", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode != 0
    assert "paper: no numbers" in r.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_the_block_is_not_part_of_the_experiment():
    """Editing the block never makes a finished run a different experiment, nor a sweep job a different folder."""
    old = OmegaConf.to_container(make_cfg("experiment=lth_lenet_mnist"), resolve=True)
    new = copy.deepcopy(old)
    new["paper"]["numbers"][0]["value"] = 12.5
    new["paper"]["changes"] = "edited"
    assert differences(old, new) == []
    new["train"]["duration"] = "10it"
    assert differences(old, new) == ["train.duration"]
    assert job_dirname(["paper.changes=x", "seed=1"]) == "seed-1"


# --- the comparison on made-up records -----------------------------------------------------------------------------

def records(values, density=50.0, branch="ticket", steps=100, dense=None, metric="test_accuracy"):
    """One record per replicate at `density` (and a dense level 0 when `dense` is given), values in fractions."""
    out = []
    for i, v in enumerate(values):
        out.append({"_replicate": str(i), "branch": branch, "percent_remaining": density, "steps": steps, metric: v})
        if dense is not None:
            out.append({"_replicate": str(i), "branch": "ticket", "percent_remaining": 100.0, "steps": steps,
                        metric: dense[i]})
    return out


def test_agrees_within_the_published_min_max():
    res = compare(number(), records([0.979, 0.9815, 0.983]))  # ours min-max 97.9-98.3 overlaps 97.8-98.2
    assert res["verdict"] == AGREES
    assert res["ours"]["n"] == 3 and res["ours"]["mean"] == pytest.approx((97.9 + 98.15 + 98.3) / 3)


def test_does_not_agree_outside_the_combined_spread():
    res = compare(number(), records([0.975, 0.976, 0.977]))  # ours 97.5-97.7 below 97.8
    assert res["verdict"] == DISAGREES


def test_std_spread_compares_mean_and_std():
    n = number(spread={"kind": "std", "plus_minus": 0.1})
    assert compare(n, records([0.977, 0.979]))["verdict"] == AGREES  # 97.8 ± 0.14 reaches 97.9
    assert compare(n, records([0.970, 0.972]))["verdict"] == DISAGREES


def test_stated_tolerance_where_the_paper_gives_none():
    n = number(spread={"kind": "none", "tolerance": 0.5})
    assert published_interval(n) == (97.5, 98.5)
    assert compare(n, records([0.9745]))["verdict"] == DISAGREES
    assert compare(n, records([0.9755]))["verdict"] == AGREES


def test_relative_numbers_are_per_replicate_against_its_own_dense_level():
    above = number(relative="difference", value=0.3, bound="above", spread={"kind": "none"},
                   metric="early_stop_test_accuracy")
    ours = records([0.985, 0.986], dense=[0.980, 0.981], metric="early_stop_test_accuracy")
    res = compare(above, ours)
    assert res["verdict"] == AGREES and res["ours"]["mean"] == pytest.approx(0.5)
    ours = records([0.981, 0.982], dense=[0.980, 0.981], metric="early_stop_test_accuracy")
    assert compare(above, ours)["verdict"] == DISAGREES
    ratio = number(metric="early_stop_step", relative="ratio", value=0.62,
                   spread={"kind": "none", "tolerance": 0.1})
    steps = records([300, 330], dense=[500, 500], metric="early_stop_step")
    res = compare(ratio, steps)
    assert res["ours"]["mean"] == pytest.approx(0.63) and res["verdict"] == AGREES
    speedup = number(metric="early_stop_step", relative="speedup", value=3.5, spread={"kind": "none", "tolerance": 1})
    assert compare(speedup, records([100, 100], dense=[500, 500], metric="early_stop_step"))["verdict"] == DISAGREES


@pytest.mark.parametrize("recs, why", [
    (records([0.98], steps=60), "trained 60 iterations per level, the paper 100"),
    (records([0.98], density=80.0), "reached no level at 50.0%"),
    (records([0.98], branch="reinit"), "no ticket records"),
    (records([None]), "have no test_accuracy"),
])
def test_not_comparable_at_this_scale(recs, why):
    res = compare(number(), recs)
    assert res["verdict"] == NOT_COMPARABLE
    assert why in res["reason"]
    assert (res["ours"] is None) == ("iterations" not in why)  # a shorter run's number is shown, not compared


def test_instability_at_a_step():
    n = number(metric="instability_test", branch="lmc", density=100.0, lmc_step=0, value=2.0, bound="below",
               spread={"kind": "none"})
    rec = [{"_replicate": "0", "branch": "lmc", "percent_remaining": 100.0, "steps": 100, "instability_test_k0": 0.4}]
    assert compare(n, rec)["verdict"] == AGREES
    rec[0]["instability_test_k0"] = 3.0
    assert compare(n, rec)["verdict"] == DISAGREES
    del rec[0]["instability_test_k0"]
    assert "no step k=0" in compare(n, rec)["reason"]


# --- lottery-report --paper ----------------------------------------------------------------------------------------

SHRUNK = [*TINY, "experiment=lth_lenet_mnist", "dataset=synthetic", "dataset.val_size=64", "train.duration=60it",
          "train.eval_every=20it", "pruning.levels=2", "pruning.branches=[random_prune]", "threads=1"]


def report(capsys, *args) -> tuple[int, str]:
    """lottery-report in this process (its start-up is most of a subprocess's time): exit status and stdout."""
    from lottery.report import main
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().out


@pytest.mark.slow
def test_paper_report_on_a_shrunk_run_then_with_an_edited_block(tmp_path, capsys):
    run = tmp_path / "run"
    r = run_cli(*SHRUNK, "replicas=2", f"hydra.run.dir={run}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    code, out = report(capsys, str(run), "--paper", "--out", str(tmp_path / "rep"))
    assert code == 0
    assert "lth_lenet_mnist: 6 cannot be compared at this scale" in out
    rows = list(csv.DictReader(open(tmp_path / "rep" / "paper.csv")))
    assert len(rows) == 6 and {row["verdict"] for row in rows} == {NOT_COMPARABLE}
    assert "trained 60 iterations per level, the paper 50000" in rows[0]["reason"]
    md = (tmp_path / "rep" / "paper.md").read_text()
    assert "Cannot be compared at this scale: dense LeNet-300-100 test accuracy" in md
    assert "ours (not compared)" in md  # a shorter run's numbers are shown beside the paper's, not compared
    assert (tmp_path / "rep" / "paper.png").stat().st_size > 0

    # the block is documentation: a resumed run with an edited block is the same experiment, its config gets the edit
    r = run_cli(*SHRUNK, "replicas=2", f"hydra.run.dir={run}", "paper.changes=edited after the run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stderr + r.stdout
    assert "edited after the run" in (run / "replicate_1" / "config.yaml").read_text()

    # a made-up block whose numbers this run agrees with, does not agree with, and cannot reach
    levels = json.loads((run / "replicate_0" / "summary.json").read_text())
    acc = 100 * [r for r in levels if r["level"] == 0][0]["test_accuracy"]
    level1 = [r for r in levels if r["level"] == 1 and r["branch"] == "ticket"][0]
    made_up = {"source": "made up", "changes": "none", "numbers": [
        number(claim="agrees", density=100.0, value=round(acc, 2), spread={"kind": "none", "tolerance": 50},
               iterations=60),
        number(claim="disagrees", density=round(100 * level1["weights_remaining"], 1), value=-5.0,
               spread={"kind": "std", "plus_minus": 1.0}, iterations=60),
        number(claim="too sparse", density=1.0, iterations=60)]}
    for rep in ("replicate_0", "replicate_1"):
        cfg = OmegaConf.load(run / rep / "config.yaml")
        cfg.paper = made_up
        OmegaConf.save(cfg, run / rep / "config.yaml")
    code, out = report(capsys, str(run), "--paper", "--out", str(tmp_path / "rep2"))
    assert "lth_lenet_mnist: 1 agrees, 1 does not agree, 1 cannot be compared at this scale" in out, out
    rows = {row["claim"]: row for row in csv.DictReader(open(tmp_path / "rep2" / "paper.csv"))}
    assert rows["agrees"]["our_n"] == "2"
    assert "reached no level at 1.0%" in rows["too sparse"]["reason"]


@pytest.mark.slow
def test_paper_report_on_a_sweep_and_on_a_run_without_a_block(tmp_path, capsys):
    r = run_cli("-m", *SHRUNK, "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    code, out = report(capsys, str(tmp_path / "sweep"), "--paper")
    assert code == 0
    assert "lth_lenet_mnist: 6 cannot be compared at this scale" in out
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "report" / "paper.csv")))
    assert len(rows) == 6  # the two seeds are one condition: replicates of it

    r = run_cli(*TINY, "pruning.levels=2", "threads=1", f"hydra.run.dir={tmp_path / 'plain'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    code, out = report(capsys, str(tmp_path / "plain"), "--paper")
    assert code == 0
    assert out.strip().splitlines()[-1] == f"default: {NO_NUMBERS}"
    assert not (tmp_path / "plain" / "report" / "paper.csv").exists()


# --- Synaptic-Flow's counting ---------------------------------------------------------------------------------------

def test_synflow_count_and_threshold_by_hand():
    """Their rule: k = int((1 - d) N) over all N entries (pruned ones score 0), prune each score <= the k-th lowest."""
    scores = torch.tensor([0.5, 0.1, 0.1, 0.3, 0.7, 0.1, 0.9, 0.2], dtype=torch.float64)  # 8 survivors of N = 10
    k = synflow_k(10, 8, None, 1, 1, 0.6)  # from density 0.8 to 0.6: k = int(0.4 * 10) = 4
    assert k == 4
    # all ten scores sorted: 0, 0, 0.1, 0.1, 0.1, 0.2, ...: the 4th is 0.1, and all three 0.1s go (ours: two)
    assert synflow_drop(scores, 10, k).tolist() == [False, True, True, False, False, True, False, False]
    assert not synflow_drop(scores, 10, 0).any()
    # from the dense network, d_r = d^(r/R): int((1 - 0.1 ** 0.5) * 100) = int(68.37...) = 68, then int(0.9 * 100)
    assert [synflow_k(100, 100, None, r, 2, 0.1) for r in (1, 2)] == [68, 90]
    assert synflow_k(100, 100, 10, 2, 2, None) == 90  # a count target: its last round exactly


def _their_masks(weights: dict, density: float, rounds: int) -> dict:
    """Synaptic-Flow's prune_loop + _global_mask written out from their code, with scores that are 0 where the mask
    is (as SynFlow's: a masked weight has no flow): every round k = int((1 - d^(r/R)) N) and masks = score > the k-th
    smallest. Magnitude scores of the masked weights stand in for SynFlow's, so ties can be made on purpose."""
    masks = {n: torch.ones_like(w) for n, w in weights.items()}
    for r in range(rounds):
        sparse = density ** ((r + 1) / rounds)
        scores = {n: (w * masks[n]).abs() for n, w in weights.items()}
        flat = torch.cat([s.flatten() for s in scores.values()])
        k = int((1.0 - sparse) * flat.numel())
        if not k < 1:
            threshold, _ = torch.kthvalue(flat, k)
            masks = {n: torch.where(s <= threshold, 0.0, 1.0) for n, s in scores.items()}
    return masks


@pytest.mark.parametrize("rounds", [1, 5])
def test_synflow_counting_matches_their_code_on_tied_scores(rounds):
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, hidden=[32])
    with torch.no_grad():  # coarse weights: many ties at every threshold
        for p in model.parameters():
            p.copy_(torch.randint(-6, 7, p.shape) / 10.0)
    cfg = make_cfg("pruning=global", "pruning.exclude=[]", "pruning.counting=synflow", f"pruning.rounds={rounds}")
    prunable = M.prunable_tensors(model, cfg.pruning)
    masks = M.ones(model, prunable)
    weights = {n: dict(model.named_parameters())[n].detach().clone() for n in masks}
    ours = pruning.prune(copy.deepcopy(model), masks, prunable, cfg.pruning, batches=iter(()),
                         generator=torch.Generator().manual_seed(0), keep_fraction=0.3)
    theirs = _their_masks(weights, 0.3, rounds)
    assert all(torch.equal(ours[n].bool(), theirs[n].bool()) for n in masks)
    exact = pruning.prune(copy.deepcopy(model), masks, prunable, OmegaConf.merge(cfg.pruning, {"counting": "exact"}),
                          batches=iter(()), generator=torch.Generator().manual_seed(0), keep_fraction=0.3)
    n_total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in exact.values()) == pruning.round_half_up(0.3 * n_total)
    assert sum(int(m.sum()) for m in ours.values()) < sum(int(m.sum()) for m in exact.values())  # ties pruned


def test_counting_is_checked():
    from lottery.experiment.check import checked
    with pytest.raises(ValueError, match="unknown pruning.counting 'theirs'; accepted: exact, synflow"):
        checked(make_cfg("pruning.counting=theirs"))
