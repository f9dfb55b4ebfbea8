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


def test_a_users_updater_runs_alone_and_as_replicas_in_both_layouts(tmp_path, monkeypatch):
    """magnitude_drop (tests/plugins/my_lottery_ext.py + conf/dst/magnitude_drop.yaml): one module and one YAML
    file. Each drop removes exactly `count` weights of every layer; replicas=2 interleaved ends exactly as two single
    runs, stacked with the same counts."""
    monkeypatch.syspath_prepend(str(PLUGINS))
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


def _kill_and_resume(tmp_path, args, edit=None):
    """(reference summary, resumed summary, their folders): a run killed at step 35 of level 1 (checkpoint at 20),
    its checkpoint optionally rewritten by `edit`, then resumed."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    out = run_cli(*args, f"hydra.run.dir={ref}", cwd=tmp_path, env=ENV)  # before `args` loses its imports
    assert out.returncode == 0, out.stderr[-3000:]
    _, env = fault(ENV, kill_at=35, level=1)
    user = [a[len("imports=["):-1] for a in args if a.startswith("imports=")]
    args = [a for a in args if not a.startswith("imports=")]
    fault_args = [f"imports=[{','.join(['faults', *user])}]"]
    assert run_cli(*args, *fault_args, f"hydra.run.dir={run}", cwd=tmp_path, env=env).returncode == -signal.SIGKILL
    ckpt = run / "levels" / "level_1" / "ticket" / "checkpoint.pt"
    if edit is not None:
        save_torch(edit(load_torch(ckpt)), ckpt)
    out = run_cli(*args, *fault_args, f"hydra.run.dir={run}", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "level 1 ticket: resuming from step 20" in out.stdout + out.stderr
    return (stable(json.loads((d / "summary.json").read_text())) for d in (ref, run)), (ref, run)


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


def test_a_users_updater_settings_are_checked_before_any_work(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGINS))
    from lottery.experiment.check import checked
    with pytest.raises(ValueError, match="unknown key dst.size for mask updater 'magnitude_drop'; accepted: every, "
                                         "count"):
        checked(tiny_cfg(*USER, "+dst.size=3"))
    with pytest.raises(ValueError, match="dst.every must be >= 1"):
        checked(tiny_cfg(*USER, "dst.every=0"))
