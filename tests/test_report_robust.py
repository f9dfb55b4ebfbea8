"""`lottery-report` reads what it can: a damaged or foreign run folder is one warning line naming the file, and every
other run is still reported; a run that used a branch or criterion this process does not know is labelled by its
name, and `--imports` loads the module that registers it."""
import csv
import json
import os
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from lottery.experiment import run_experiment
from lottery.report import collect_runs, main, make_lmc_figures

from conftest import REPO, run_cli, tiny_cfg

PLUGINS = REPO / "tests" / "plugins"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("base") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_experiment(tiny_cfg("pruning.levels=2", "pruning.branches=[reinit]", "train.duration=20it",
                                "train.eval_every=10it", "checkpoint.every=10it"), run)
    finally:
        torch.set_num_threads(threads)
    return run


def _copy(run, dest, seed=None):
    shutil.copytree(run, dest)
    if seed is not None:  # another replicate, as far as the report can tell
        cfg = OmegaConf.load(dest / "config.yaml")
        cfg.seed = seed
        OmegaConf.save(cfg, dest / "config.yaml")
    return dest


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


def _table(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_truncated_and_empty_summaries_are_one_warning_each_and_the_rest_is_reported(base_run, tmp_path, capsys):
    root = tmp_path / "sweep"
    good, truncated, empty = (_copy(base_run, root / name, seed) for name, seed in
                              (("0_seed=0", 0), ("1_seed=1", 1), ("2_seed=2", 2)))
    text = (truncated / "summary.json").read_text()
    (truncated / "summary.json").write_text(text[: len(text) // 2])  # a write cut off
    (empty / "summary.json").write_text("")
    out = tmp_path / "rep"
    assert main([str(root), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    warnings = _warnings(captured.err)
    assert len(warnings) == 2, captured.err
    assert str(truncated / "summary.json") in warnings[0] and "not valid JSON" in warnings[0]
    assert str(empty / "summary.json") in warnings[1] and "empty file" in warnings[1]
    assert "1 runs" in captured.out and "2 unreadable run folders" in captured.out
    table = _table(out / "runs.csv")
    assert [(t["level"], t["branch"]) for t in table if t["run_dir"] == str(good)] == \
        [("0", "ticket"), ("1", "ticket"), ("1", "reinit")]
    errors = {t["run_dir"]: t["error"] for t in table if t["error"]}
    assert set(errors) == {str(truncated), str(empty)}
    assert errors[str(empty)] == "unreadable summary.json: empty file"
    assert {t["n"] for t in _table(out / "aggregate.csv")} == {"1"}  # the good run alone
    for name in ("aggregate.md", "aggregate.tex", "lottery_ticket.png", "early_stop.png", "layer_density.png"):
        assert (out / name).exists(), name


def test_foreign_and_damaged_files_anywhere_in_a_run_folder(base_run, tmp_path, capsys):
    root = tmp_path / "runs"
    bad_config = _copy(base_run, root / "bad_config", 1)
    (bad_config / "config.yaml").write_text("model: [unclosed\n  name: : :\n")
    bad_overrides = _copy(base_run, root / "bad_overrides", 2)
    (bad_overrides / ".hydra").mkdir()
    (bad_overrides / ".hydra" / "overrides.yaml").write_text("- a: [\n")
    foreign = _copy(base_run, root / "foreign", 3)
    (foreign / "summary.json").write_text(json.dumps({"accuracy": 0.9, "epochs": 3}))  # another tool's summary
    partial = _copy(base_run, root / "partial", 4)
    records = json.loads((partial / "summary.json").read_text())
    del records[1]["weights_remaining"]
    records[2]["test_accuracy"] = "n/a"  # not a number: no point, no crash
    records[2]["layer_density"] = "dense"
    (partial / "summary.json").write_text(json.dumps(records))
    binary = _copy(base_run, root / "binary", 5)
    (binary / "summary.json").write_bytes(b"\x80\x81\xfe\xff" * 10)
    out = tmp_path / "rep"
    assert main([str(root), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    warnings = _warnings(captured.err)
    expected = {bad_config / "config.yaml": "reported without its settings",
                bad_overrides / ".hydra" / "overrides.yaml": "overrides left empty",
                foreign / "summary.json": "not a list of records",
                partial / "summary.json": "1 of 3 records lack level, branch, weights_remaining; left out",
                binary / "summary.json": "the run has no results"}
    assert len(warnings) == len(expected), captured.err
    for path, text in expected.items():
        [line] = [w for w in warnings if str(path) + ":" in w]
        assert text in line, line
    assert "not drawn" not in captured.err
    table = _table(out / "runs.csv")
    runs = {t["run_dir"] for t in table if t["level"]}
    assert runs == {str(bad_config), str(bad_overrides), str(partial)}
    assert [t["branch"] for t in table if t["run_dir"] == str(partial)] == ["ticket", "reinit"]
    assert (out / "lottery_ticket.png").exists() and (out / "aggregate.md").exists()


def test_damaged_lmc_curves_leave_the_other_figures(tmp_path):
    run = tmp_path / "run"
    (run / "levels" / "level_1" / "lmc").mkdir(parents=True)
    (run / "levels" / "level_1" / "lmc" / "result.json").write_text('{"curves": {"0": {"alpha": [0, 0.5')
    rows = [{"run_dir": str(run), "model": "m", "dataset": "d", "branch": "lmc", "condition": "lmc", "level": lv,
             "percent_remaining": 100 * 0.8 ** lv, "lmc_steps": [0], "instability_test_k0": 1.0 + lv,
             "instability_train_k0": 0.5} for lv in (0, 1)]
    warned = []
    written = make_lmc_figures(rows, tmp_path / "rep", warn=warned.append)
    assert {p.name for p in written} == {"lmc_path.png", "lmc_path.svg", "instability.png", "instability.svg"}
    [line] = warned
    assert str(run / "levels" / "level_1" / "lmc" / "result.json") in line and "unreadable" in line


def test_no_readable_run_is_an_error_but_the_table_of_errors_is_written(base_run, tmp_path, capsys):
    run = _copy(base_run, tmp_path / "only")
    (run / "summary.json").write_text("[{")
    assert main([str(run), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert len(_warnings(err)) == 1 and "error: no run below" in err
    assert _table(tmp_path / "rep" / "runs.csv")[0]["error"].startswith("unreadable summary.json: not valid JSON")


# --- a user's branches and criteria ----------------------------------------------------------------------------------

def _plugin_run(base_run, dest):
    """A run as `lottery-train imports=[my_lottery_ext] pruning.criterion.name=smallest_kept
    pruning.branches=[other_data,two_copies]` leaves it (its records rewritten from a plain run)."""
    run = _copy(base_run, dest, 0)
    cfg = OmegaConf.load(run / "config.yaml")
    cfg.pruning.criterion = {"name": "smallest_kept"}
    cfg.pruning.branches = ["other_data", "two_copies"]
    cfg.imports = ["my_lottery_ext"]
    OmegaConf.save(cfg, run / "config.yaml")
    records = json.loads((run / "summary.json").read_text())
    for r in records:
        if r["branch"] == "reinit":
            r["branch"] = "other_data"
    records.append({**records[0], "branch": "two_copies", "copies": 2, "mean_copy_accuracy": 0.5})
    (run / "summary.json").write_text(json.dumps(records))
    return run


def test_unknown_branch_and_criterion_are_named_by_name_beside_other_runs(base_run, tmp_path, capsys, monkeypatch):
    from lottery.branches import BRANCHES
    from lottery.pruning import CRITERIA
    for name in ("other_data", "two_copies"):  # as in a process that never imported my_lottery_ext
        monkeypatch.delitem(BRANCHES, name, raising=False)
    monkeypatch.delitem(CRITERIA, "smallest_kept", raising=False)
    root = tmp_path / "sweep"
    _copy(base_run, root / "plain")
    plugin = _plugin_run(base_run, root / "plugin")
    assert main([str(root), "--out", str(tmp_path / "rep")]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and not _warnings(captured.err), captured.err
    assert ("note: branches other_data, two_copies and criterion smallest_kept not registered here: labelled by name "
            "(lottery-report --imports my_lottery_ext gives their labels)") in captured.err
    rows = collect_runs([root])
    assert {r["method"] for r in rows if r["run_dir"] == str(plugin)} == {"IMP (smallest_kept), original init"}
    written = {p.name for p in (tmp_path / "rep").iterdir()}
    assert {"methods.png", "ablations.png", "lottery_ticket.png", "aggregate.md"} <= written
    svg = (tmp_path / "rep" / "ablations.svg").read_text()
    assert "other_data" in svg and "smallest_kept" in svg
    assert "| IMP (smallest_kept), original init | other_data |" in (tmp_path / "rep" / "aggregate.md").read_text()


@pytest.mark.slow
def test_imports_option_loads_the_users_labels(base_run, tmp_path, capsys):
    root = tmp_path / "sweep"
    _copy(base_run, root / "plain")
    _plugin_run(base_run, root / "plugin")
    env = {"PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")])}
    rep = run_cli(str(root), "--imports", "my_lottery_ext", "--out", str(tmp_path / "rep"),
                  entry="lottery.report:main", cwd=tmp_path, env=env)
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert "note:" not in rep.stderr and "warning" not in rep.stderr, rep.stderr
    svg = (tmp_path / "rep" / "lottery_ticket.svg").read_text()
    assert "ticket trained on another data order" in svg  # the label my_lottery_ext registers
    assert "two copies of the ticket on two data orders" in svg
    assert main([str(root), "--imports", "no_such_module_here", "--out", str(tmp_path / "rep2")]) == 2
    # the console script's exit status is main's return value (a new process, as a user runs it)
    bad = run_cli(str(root), "--imports", "no_such_module_here", "--out", str(tmp_path / "rep2"),
                  entry="lottery.report:main", cwd=tmp_path, process=True)
    assert bad.returncode == 2 and "cannot be imported" in bad.stderr, bad.stderr[-2000:]
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: --imports entry 'no_such_module_here' cannot be imported")
    assert not (tmp_path / "rep2").exists()
