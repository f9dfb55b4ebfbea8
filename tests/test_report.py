"""`lottery-report` on a tiny sweep laid out as Hydra writes one: two replicates of a three-level LeNet run with the
reinit control, one run with another initializer, and one job that failed before training."""
import csv
import json

import pytest
import torch

from lottery.experiment import run_experiment
from lottery.report import collect_runs, main, make_figures, write_table

from conftest import tiny_cfg

LEVEL_ARGS = ("pruning.levels=3", "pruning.branches=[reinit]", "train.duration=30it", "train.eval_every=10it")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    jobs = {"0_seed=0": ["seed=0"], "1_seed=1": ["seed=1"], "2_init=kaiming_normal": ["init=kaiming_normal"]}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: on a busy 2-core machine threads only spin against each other
    try:
        for name, overrides in jobs.items():
            run_experiment(tiny_cfg(*LEVEL_ARGS, *overrides), root / name)
    finally:
        torch.set_num_threads(threads)
    for name, overrides in jobs.items():
        (root / name / ".hydra").mkdir()
        (root / name / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (root / "3_model=nope").mkdir()
    (root / "3_model=nope" / "error.txt").write_text("ValueError: unknown model 'nope'\n\nTraceback ...\n")
    return root


def test_collect_runs_one_row_per_record_plus_failed_jobs(sweep):
    rows = collect_runs([sweep, sweep / "0_seed=0"])  # overlapping paths: each run once
    ok = [r for r in rows if "error" not in r]
    assert len(ok) == 3 * 5  # per run: level 0 ticket, then ticket + reinit at levels 1 and 2
    [failed] = [r for r in rows if "error" in r]
    assert failed["error"] == "ValueError: unknown model 'nope'" and failed["run_dir"].endswith("3_model=nope")
    summary = json.loads((sweep / "1_seed=1" / "summary.json").read_text())
    mine = [r for r in ok if r["run_dir"].endswith("1_seed=1")]
    assert [(r["level"], r["branch"], r["test_accuracy"]) for r in mine] == \
        [(s["level"], s["branch"], s["test_accuracy"]) for s in summary]
    assert mine[-1]["percent_remaining"] == pytest.approx(100 * summary[-1]["weights_remaining"])
    assert mine[-1]["density.hidden.0.weight"] == summary[-1]["layer_density"]["hidden.0.weight"]
    assert mine[0]["overrides"] == "seed=1"
    # the initializer was swept, the seed is a replicate: conditions split by init only
    assert {r["condition"] for r in ok} == {"ticket, init=xavier_normal", "reinit, init=xavier_normal",
                                           "ticket, init=kaiming_normal", "reinit, init=kaiming_normal"}
    assert not any(k.startswith("cfg.seed") for r in ok for k in r)


def test_table_round_trips(sweep, tmp_path):
    rows = collect_runs([sweep])
    path = write_table(rows, tmp_path / "t" / "runs.csv")
    with open(path) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 16
    for col in ("run_dir", "level", "branch", "condition", "replicate", "percent_remaining", "test_accuracy",
                "early_stop_test_accuracy", "early_stop_step", "density.out.weight", "cfg.init.name", "error"):
        assert col in table[0], col
    assert sorted({t["replicate"] for t in table if t["branch"] == "ticket"}) == ["0", "1"]
    assert float(table[0]["test_accuracy"]) == pytest.approx(rows[0]["test_accuracy"])


def test_figures_render_with_readable_labels(sweep, tmp_path):
    paths = make_figures(collect_runs([sweep]), tmp_path)
    names = sorted(p.name for p in paths)
    assert names == sorted(f"{s}.{e}" for s in ("lottery_ticket", "early_stop", "layer_density") for e in ("png", "svg"))
    for p in paths:
        assert p.stat().st_size > 5000
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (tmp_path / "lottery_ticket.svg").read_text()
    for text in ("Weights remaining (%, log scale)", "Test accuracy (%)", "winning ticket", "reinit control",
                 "init=kaiming_normal", "(n=2)", "64.1", "early stop"):
        assert text in svg, text
    assert "Early-stop iteration" in (tmp_path / "early_stop.svg").read_text()
    assert "hidden.0.weight" in (tmp_path / "layer_density.svg").read_text()


def test_band_is_min_to_max_over_replicates(sweep, tmp_path):
    """Replicates differ: the figure's mean and band must come from them, not from one run."""
    import matplotlib.pyplot as plt
    rows = [r for r in collect_runs([sweep]) if r.get("cfg.init.name") == "xavier_normal"]
    for r in rows:  # make the replicates disagree by a known amount
        r["test_accuracy"] = 0.5 + 0.1 * r["replicate"]
    captured = {}
    real_fill = plt.Axes.fill_between

    def spy(self, x, lo, hi, **kw):
        captured.setdefault(self, []).append((list(lo), list(hi)))
        return real_fill(self, x, lo, hi, **kw)

    plt.Axes.fill_between = spy
    try:
        make_figures(rows, tmp_path)
    finally:
        plt.Axes.fill_between = real_fill
    [final] = [v for ax, v in captured.items() if "end of training" in ax.get_title()]
    assert len(final) == 2  # ticket and reinit, each over two replicates
    for lo, hi in final:
        assert lo == pytest.approx([50.0] * len(lo)) and hi == pytest.approx([60.0] * len(hi))


def test_cli(sweep, tmp_path, capsys):
    assert main([str(sweep), "--out", str(tmp_path / "rep")]) == 0
    assert "3 runs, 1 failed jobs" in capsys.readouterr().out
    assert (tmp_path / "rep" / "runs.csv").exists() and (tmp_path / "rep" / "lottery_ticket.png").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert "no run folders" in capsys.readouterr().err
