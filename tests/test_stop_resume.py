"""Stopping and resuming as people do (issue 32): Ctrl-C checkpoints and says how to resume, the same command finds
its folder again, more levels extend a finished run, and a refused start leaves nothing behind."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from lottery.cli import INTERRUPTED_EXIT, PREEMPTED_EXIT
from lottery.config import run_id
from lottery.core.files import load_torch
from lottery.experiment import run_experiment
from lottery.experiment.folder import FolderRefused

from conftest import TINY, fault, run_cli, stable, tiny_cfg

ENV = {"OMP_NUM_THREADS": "1"}
ARGS = [*TINY, "pruning.levels=2", "pruning.branches=[reinit]", "threads=1"]


def summary(run_dir) -> list[dict]:
    return json.loads((run_dir / "summary.json").read_text())


def default_folders(cwd) -> list:
    return sorted((cwd / "runs" / "default").iterdir()) if (cwd / "runs" / "default").exists() else []


# --- Ctrl-C ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ctrl_c_checkpoints_says_how_to_resume_and_the_same_command_resumes(tmp_path):
    reference = tmp_path / "reference"
    run_experiment(tiny_cfg(*ARGS), reference)
    cwd = tmp_path / "work"
    cwd.mkdir()
    args, env = fault(interrupt_at=30, level=1)  # a real SIGINT, as Ctrl-C sends, inside level 1's ticket
    r = run_cli(*ARGS, *args, cwd=cwd, env={**ENV, **env})
    log = r.stdout + r.stderr
    assert r.returncode == PREEMPTED_EXIT, log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
    [run_dir] = default_folders(cwd)
    assert "stopped at step 30; checkpoint written; rerun the same command to resume" in log
    assert f"(it continues in {run_dir})" in log
    assert load_torch(run_dir / "levels" / "level_1" / "ticket" / "checkpoint.pt")["step"] == 30
    log_file = (run_dir / "train.log").read_text()
    assert "stopped at step 30" in log_file  # the log file says it too, and how far the run was
    assert "progress: 1/3 units done (33%); elapsed " in log_file

    r = run_cli(*ARGS, *args, cwd=cwd, env={**ENV, **env})  # the very same command
    assert r.returncode == 0, r.stdout + r.stderr
    assert default_folders(cwd) == [run_dir]
    assert "level 1 ticket: resuming from step 30" in r.stdout + r.stderr
    assert stable(summary(run_dir)) == stable(summary(reference))


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(tmp_path):
    run_dir = tmp_path / "run"
    args, env = fault(interrupt_at=30, level=1, twice=1)
    r = run_cli(*ARGS, *args, f"hydra.run.dir={run_dir}", cwd=tmp_path, env={**ENV, **env})
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == INTERRUPTED_EXIT, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(errors) == 1 and "interrupted twice: stopped at once" in errors[0]
    assert load_torch(run_dir / "levels" / "level_1" / "ticket" / "checkpoint.pt")["step"] == 20  # the last regular one


# --- the default folder ---------------------------------------------------------------------------------------------

def _root(*overrides: str):
    cfg = tiny_cfg(*overrides)
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))


@pytest.mark.slow
def test_run_id_names_the_experiment_not_the_work():
    base = run_id(_root())
    assert run_id(_root()) == base  # the same command, the same folder
    assert run_id(_root("pruning.levels=7")) == base  # more levels extend the run they find
    assert run_id(_root("pruning.target=0.05")) == base
    for extra in ("dataset.root=/elsewhere", "threads=1", "train.progress=true", "logger=wandb", "device=cpu",
                  "pruning.branches=[reinit]", "checkpoint.every=40it"):
        assert run_id(_root(extra)) == base, extra
    for other in ("optimizer.lr=0.5", "seed=1", "model=conv2", "pruning.rewind=10it", "train.duration=80it",
                  "replicas=2"):
        assert run_id(_root(other)) != base, other


# --- more levels ----------------------------------------------------------------------------------------------------

def _files(run_dir, levels) -> dict:
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for lv in levels for p in sorted((run_dir / "levels" / f"level_{lv}").rglob("*")) if p.is_file()}


@pytest.mark.parametrize("more", [["pruning.levels=3"], ["pruning.target=0.7"]])
@pytest.mark.slow
def test_more_levels_extend_a_finished_run_leaving_its_levels_untouched(tmp_path, more):
    run_dir, fresh = tmp_path / "run", tmp_path / "fresh"
    branches = "pruning.branches=[reinit]"
    run_experiment(tiny_cfg("pruning.levels=2", branches), run_dir)
    before = _files(run_dir, [0, 1])
    run_experiment(tiny_cfg(*more, branches), run_dir)
    assert _files(run_dir, [0, 1]) == before  # bit-identical, not even rewritten
    run_experiment(tiny_cfg(*more, branches), fresh)
    assert [r["level"] for r in summary(run_dir)] == [0, 1, 1, 2, 2]
    assert stable(summary(run_dir)) == stable(summary(fresh))  # as if it had asked for the levels at first
    assert OmegaConf.load(run_dir / "config.yaml").pruning == OmegaConf.load(fresh / "config.yaml").pruning


@pytest.mark.slow
def test_what_changes_a_finished_run_is_still_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_experiment(tiny_cfg("pruning.levels=3"), run_dir)
    with pytest.raises(FolderRefused, match="differs in: pruning.levels: the folder holds 3 levels and this command "
                                            "asks for 2"):
        run_experiment(tiny_cfg("pruning.levels=2"), run_dir)
    with pytest.raises(FolderRefused, match=r"differs in: optimizer.lr, pruning.levels\)"):
        run_experiment(tiny_cfg("pruning.levels=4", "optimizer.lr=0.5"), run_dir)
    one_shot = tmp_path / "one_shot"
    run_experiment(tiny_cfg("pruning.target=0.5", "pruning.one_shot=true"), one_shot)
    with pytest.raises(FolderRefused, match="one-shot pruning goes straight to pruning.target"):
        run_experiment(tiny_cfg("pruning.target=0.2", "pruning.one_shot=true"), one_shot)


# --- a refused start leaves nothing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [["train.batch_size=100000"],  # found once the data is loaded, after the lock
                                 ["optimizer.lr=-1"]])  # found by the first check
def test_a_refused_single_run_leaves_nothing_behind(tmp_path, bad):
    r = run_cli(*TINY, *bad, cwd=tmp_path, env=ENV)
    assert r.returncode == 2 and r.stderr.startswith("error:"), r.stdout + r.stderr
    assert list(tmp_path.iterdir()) == []  # not runs/, not runs/default/<id>/.lock
    named = tmp_path / "named"
    r = run_cli(*TINY, *bad, f"hydra.run.dir={named}", cwd=tmp_path, env=ENV)
    assert r.returncode == 2 and not named.exists()  # no .hydra/, no error.txt


# --- progress, cost, the answer -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cost_progress_and_answer_in_the_log_and_the_measurement_changes_nothing(tmp_path, caplog):
    caplog.set_level("INFO", logger="lottery")
    args = ["pruning.levels=3", "pruning.branches=[reinit]", "train.progress_every=0"]
    measured = run_experiment(tiny_cfg(*args, "train.estimate=true"), tmp_path / "measured")
    text = caplog.text
    assert "this run: 5 units (3 levels, ticket + reinit), 300 training steps; about " in text
    assert "ms a step" in text and "s an evaluation" in text
    for done in range(1, 6):
        assert f"progress: {done}/5 units done ({100 * done // 5}%); elapsed " in text
    assert "about 0s left" in text.splitlines()[-1] or "answer:" in text
    plain = run_experiment(tiny_cfg(*args), tmp_path / "plain")
    assert stable(measured) == stable(plain)  # the measurement changed no result and no random stream


def test_a_run_about_as_short_as_measuring_it_gets_no_measurement(tmp_path, caplog, monkeypatch):
    """Measuring takes 14 steps and one evaluation: a run of fewer than 140 steps or 10 evaluations would pay a tenth
    of itself or more for its estimate (a 100-step Conv-2 run on CIFAR-10 took 50 s instead of 29 s)."""
    from lottery.experiment import progress

    def refuse(lin):
        raise AssertionError("measured a run this short")

    monkeypatch.setattr(progress, "measure_step", refuse)
    caplog.set_level("INFO", logger="lottery")
    run_experiment(tiny_cfg("pruning=none", "train.estimate=true"), tmp_path / "short")  # 60 steps, 4 evaluations
    assert "this run: 1 unit (1 level, ticket), 60 training steps; no time estimate (measuring it would be a " \
           "tenth of the run or more)" in caplog.text


def test_the_answer_names_the_sparsest_matching_ticket_and_the_controls_there(tmp_path):
    from types import SimpleNamespace

    from lottery.experiment.progress import answer

    def rec(level, branch, acc, remaining):
        return {"level": level, "branch": branch, "test_accuracy": acc, "weights_remaining": remaining}

    records = [rec(0, "ticket", 0.980, 1.0), rec(1, "ticket", 0.979, 0.8), rec(1, "reinit", 0.975, 0.8),
               rec(2, "ticket", 0.9770, 0.64), rec(2, "reinit", 0.960, 0.64), rec(3, "ticket", 0.97, 0.512),
               rec(3, "reinit", 0.95, 0.512)]
    rep = SimpleNamespace(folder=SimpleNamespace(results=lambda: records))
    line = answer([rep], 0.005)
    assert line.startswith("answer: the sparsest ticket that matches the dense network (test accuracy 0.9800, "
                           "within 0.5 points: match_tolerance=0.005) is level 2, 64.00% of the weights remaining, "
                           "test accuracy 0.9770; there: reinit 0.9600 (-1.70 points)"), line
    assert "is level 1," in answer([rep], 0.0015)
    assert answer([rep], 0.0001).startswith("answer: no pruned ticket matches")
    assert answer([SimpleNamespace(folder=SimpleNamespace(results=lambda: records[:1]))], 0.005) is None
