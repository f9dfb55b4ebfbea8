"""Diverged training: detected, stopped, recorded; never pruned from; the run fails visibly; a sweep goes on."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from lottery.experiment import units
from lottery.core.divergence import Diverged
from lottery.experiment import run_experiment
from lottery.report import _curves, collect_runs, make_figures

from conftest import TINY, run_cli, tiny_cfg

DIVERGE = ["optimizer=sgd", "optimizer.lr=1e6"]  # NaN within a few steps on the synthetic data


def strict_json_lines(path: Path) -> list[dict]:
    def refuse(name):
        raise ValueError(f"{name} in {path}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def summary(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "summary.json").read_text())


def test_real_diverging_run_stops_records_and_never_prunes(tmp_path, caplog):
    run_dir = tmp_path / "run"
    cfg = tiny_cfg(*DIVERGE, "pruning.levels=3", "pruning.branches=[reinit]", "logger=wandb", "logger.log_every=5")
    with caplog.at_level("INFO"), pytest.raises(Diverged) as err:
        run_experiment(cfg, run_dir)
    [rec] = summary(run_dir)
    assert (rec["level"], rec["branch"], rec["diverged"]) == (0, "ticket", True)
    # found at a training-loss log (every 5 steps), the first read of the loss after it went bad
    assert rec["diverged_step"] % 5 == 0 and 0 < rec["diverged_step"] <= 20 and rec["last_finite_step"] == 0
    assert rec["test_accuracy"] is None and rec["val_loss"] is None  # not a 9.8% result
    assert "level 0 ticket has a non-finite loss by step" in str(err.value)
    assert "train.on_divergence=stop" in str(err.value)
    assert not (run_dir / "levels" / "level_1").exists() and not (run_dir / "levels" / "level_0" / "final.pt").exists()
    records = strict_json_lines(run_dir / "metrics.jsonl")  # no NaN in any JSON file
    last_eval = [r for r in records if r["kind"] == "eval"][-1]
    assert last_eval["diverged"] and last_eval["step"] == rec["diverged_step"]
    assert max(r["step"] for r in records) == rec["diverged_step"]  # the unit stopped at once
    result = json.loads((run_dir / "levels" / "level_0" / "ticket" / "result.json").read_text())
    assert result["diverged"] and result["evals"][-1]["diverged"]
    assert any("DIVERGED: non-finite loss at step" in r.getMessage() for r in caplog.records)

    from test_tracking import offline_runs
    runs = offline_runs(run_dir)
    job_id = (run_dir / "wandb_id.txt").read_text().strip()
    unit = runs[f"{job_id}-L0-ticket"]
    assert unit["summary"]["diverged_step"] == rec["diverged_step"] and "diverged" in unit["tags"]
    assert runs[job_id]["summary"]["diverged"] is True and "diverged" in runs[job_id]["tags"]

    # rerunning the same command does not prune the diverged level either: same error, nothing trained
    with pytest.raises(Diverged):
        run_experiment(cfg, run_dir)
    assert len(summary(run_dir)) == 1 and not (run_dir / "levels" / "level_1").exists()


def poison(monkeypatch, unit: str):
    """The unit `level L branch` starts from NaN weights (diverges at its first evaluation)."""
    real = units.train

    def train(networks, *args, desc="train", **kwargs):
        if desc == unit:
            with torch.no_grad():
                next(networks[0].model.parameters()).fill_(math.nan)
        return real(networks, *args, desc=desc, **kwargs)
    monkeypatch.setattr(units, "train", train)


def test_stop_then_continue_trains_only_the_units_that_do_not_depend_on_it(tmp_path, monkeypatch):
    poison(monkeypatch, "level 1 ticket")
    run_dir = tmp_path / "run"
    common = ("pruning.levels=3", "pruning.branches=[reinit]", "train.duration=40it")
    with pytest.raises(Diverged, match="level 1 ticket has a non-finite loss by step 0"):
        run_experiment(tiny_cfg(*common), run_dir)
    assert [(r["level"], r["branch"], r["diverged"]) for r in summary(run_dir)] == [(0, "ticket", False),
                                                                                     (1, "ticket", True)]
    # the same folder, told to keep going: the level's control trains, level 2 is never made from the diverged ticket
    with pytest.raises(Diverged, match="the units that did not depend on it were trained"):
        run_experiment(tiny_cfg(*common, "train.on_divergence=continue"), run_dir)
    assert [(r["level"], r["branch"], r["diverged"]) for r in summary(run_dir)] == \
        [(0, "ticket", False), (1, "ticket", True), (1, "reinit", False)]
    assert not (run_dir / "levels" / "level_2").exists()


def test_continue_after_a_diverged_control_makes_every_level(tmp_path, monkeypatch):
    poison(monkeypatch, "level 1 reinit")
    run_dir = tmp_path / "run"
    with pytest.raises(Diverged, match="level 1 reinit"):
        run_experiment(tiny_cfg("pruning.levels=3", "pruning.branches=[reinit]", "train.duration=40it",
                                "train.on_divergence=continue"), run_dir)
    got = [(r["level"], r["branch"], r["diverged"]) for r in summary(run_dir)]
    assert got == [(0, "ticket", False), (1, "ticket", False), (1, "reinit", True), (2, "ticket", False),
                   (2, "reinit", False)]


def test_branch_of_several_units_stops_at_its_diverged_unit(tmp_path, monkeypatch, plugins_on_path):
    """A user's two-unit branch with an analysis: the diverged copy ends the branch (no second copy, no analysis
    over NaNs), its record says which unit diverged, and the levels go on with train.on_divergence=continue."""
    poison(monkeypatch, "level 1 two_copies/copy_0")
    run_dir = tmp_path / "run"
    with pytest.raises(Diverged, match="level 1 two_copies has a non-finite loss by step 0"):
        run_experiment(tiny_cfg("imports=[my_lottery_ext]", "pruning.levels=3", "pruning.branches=[two_copies]",
                                "train.duration=40it", "train.on_divergence=continue"), run_dir)
    rows = {(r["level"], r["branch"]): r for r in summary(run_dir)}
    assert sorted(rows) == [(0, "ticket"), (0, "two_copies"), (1, "ticket"), (1, "two_copies"), (2, "ticket"),
                            (2, "two_copies")]
    bad = rows[(1, "two_copies")]
    assert bad["diverged"] and bad["diverged_unit"] == "copy_0" and "mean_copy_accuracy" not in bad
    assert not (run_dir / "levels" / "level_1" / "two_copies" / "copy_1").exists()
    assert rows[(2, "two_copies")]["copies"] == 2 and not rows[(2, "two_copies")]["diverged"]


def test_bad_policy_is_refused():
    from lottery.experiment.check import checked
    with pytest.raises(ValueError, match="unknown train.on_divergence 'maybe'; accepted: stop, continue"):
        checked(tiny_cfg("train.on_divergence=maybe"))


SWEEP = ["dataset=synthetic", "model=mlp", "model.hidden=[64,32]", "train.batch_size=32", "train.duration=60it",
         "train.eval_every=20it", "checkpoint.every=20it", "pruning.levels=2", "pruning.branches=[]",
         "train.progress=false", "device=cpu", "optimizer=sgd"]


@pytest.mark.slow
def test_multirun_one_job_diverges_the_others_finish(tmp_path):
    sweep_dir = tmp_path / "sweep"
    r = run_cli("-m", "optimizer.lr=1e6,0.05", *SWEEP, f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path,
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 1, r.stdout + r.stderr  # a failed job: the command says so at the end
    bad, good = sorted((d for d in sweep_dir.iterdir() if d.is_dir() and not d.name.startswith(".")),
                       key=lambda d: int(d.name.split("_")[0]))
    assert (bad / "error.txt").read_text().startswith("Diverged: training diverged: level 0 ticket")
    assert not (good / "error.txt").exists() and len(summary(good)) == 2
    with open(sweep_dir / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_job = {}
    for row in rows:
        by_job.setdefault(Path(row["run_dir"]).name, []).append(row)
    assert [(x["level"], x["diverged"], x["test_accuracy"]) for x in by_job[bad.name]] == [("0", "True", "")]
    assert by_job[bad.name][0]["error"].startswith("Diverged: training diverged")
    assert [(x["level"], x["diverged"], x["error"]) for x in by_job[good.name]] == [("0", "False", ""),
                                                                                     ("1", "False", "")]

    # the figures leave the diverged unit off the accuracy curves and mark it instead
    report = collect_runs([sweep_dir])
    curves = _curves(report, "test_accuracy")
    assert all(n == 1 for panel in curves.values() for *_, n in panel.values())
    written = make_figures(report, tmp_path / "report")
    assert (tmp_path / "report" / "lottery_ticket.svg") in written
    assert "diverged (no accuracy" in (tmp_path / "report" / "lottery_ticket.svg").read_text()

    # a single run says it on one line, exit status 3
    r = run_cli(*TINY, *DIVERGE, "pruning.levels=2", f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr
    [line] = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: training diverged: level 0 ticket has a non-finite loss by step 20")
