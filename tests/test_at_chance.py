"""A network that learned nothing (issue 32): flagged against the most frequent class's share, and IMP does not prune
its next level from it; a method that trains every level from the dense network records it as a result."""
from __future__ import annotations

import json
import sys

import pytest

from lottery.cli import AT_CHANCE_EXIT
from lottery.core.divergence import AtChance
from lottery.experiment import run_experiment
from lottery.experiment.records import at_chance, majority_share

from conftest import PLUGINS, TINY, plugins_env, run_cli, tiny_cfg

sys.path.insert(0, str(PLUGINS))
import constant_model  # noqa: E402,F401 - registers model `constant_prediction`

CONSTANT = ["model.name=constant_prediction", "imports=[constant_model]", "train.on_chance=stop"]


def test_chance_is_the_most_frequent_class_share():
    import torch
    labels = torch.tensor([1] * 1135 + [0] * 980 + list(range(2, 10)) * 985 + [2] * 5)  # MNIST's test set's counts
    assert len(labels) == 10000 and majority_share(labels) == 0.1135
    assert at_chance(0.1135, 10, 10000, majority_share(labels))  # always predicting "1"
    assert not at_chance(0.1135, 10, 10000)  # what comparing with 1/classes alone missed
    assert not at_chance(0.2, 10, 10000, 0.1135) and not at_chance(None, 10, 10000, 0.1135)


def test_imp_stops_instead_of_pruning_from_a_ticket_at_chance(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(AtChance, match=r"level 0 ticket, test accuracy .*the next level would be pruned from it"):
        run_experiment(tiny_cfg(*CONSTANT, "pruning.levels=3", "pruning.branches=[reinit]"), run_dir)
    records = json.loads((run_dir / "summary.json").read_text())
    assert [(r["level"], r["branch"], r["at_chance"]) for r in records] == [(0, "ticket", True)]
    assert not (run_dir / "levels" / "level_1").exists()  # nothing pruned from it
    with pytest.raises(AtChance):  # the same command again: the same stop, nothing trained
        run_experiment(tiny_cfg(*CONSTANT, "pruning.levels=3", "pruning.branches=[reinit]"), run_dir)


def test_a_collapsed_level_of_a_method_from_the_dense_network_is_a_result(tmp_path):
    records = run_experiment(tiny_cfg(*CONSTANT, "pruning.levels=3", "pruning.from_dense=true"), tmp_path / "run")
    assert [(r["level"], r["at_chance"]) for r in records if r["branch"] == "ticket"] == [(0, True), (1, True), (2, True)]


@pytest.mark.slow
def test_the_stop_is_one_line_with_its_exit_status(tmp_path):
    r = run_cli(*TINY, *CONSTANT, "pruning.levels=2", "threads=1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                env=plugins_env({"OMP_NUM_THREADS": "1"}))
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == AT_CHANCE_EXIT, r.stdout + r.stderr
    assert len(errors) == 1 and "ended at chance" in errors[0] and "Traceback" not in r.stderr


@pytest.mark.slow
def test_on_chance_continue_prunes_from_it_anyway(tmp_path):
    """`train.on_chance=continue`: the researcher asked to see what pruning a ticket at chance gives."""
    records = run_experiment(tiny_cfg(*CONSTANT, "pruning.levels=3", "train.on_chance=continue"), tmp_path / "run")
    assert [(r["level"], r["at_chance"]) for r in records if r["branch"] == "ticket"] == [(0, True), (1, True), (2, True)]
