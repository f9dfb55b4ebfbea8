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


# --- the aggregated table --------------------------------------------------------------------------------------------

REPLICAS_ARGS = ("replicas=3", "pruning.levels=3", "pruning.branches=[reinit]", "model=mlp", "model.hidden=[16]",
                 "train.duration=6it", "train.eval_every=2it", "checkpoint.every=6it")


@pytest.fixture(scope="module")
def replicas_run(tmp_path_factory):
    """Three replicates batched in one process: short training, so their accuracies differ."""
    root = tmp_path_factory.mktemp("replicas") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_experiment(tiny_cfg(*REPLICAS_ARGS), root)
    finally:
        torch.set_num_threads(threads)
    return root


def _expected(run, metrics):
    """{(level, branch): {metric: (mean, std, n)}} computed here from the replicates' own summaries."""
    import statistics
    values = {}
    for seed in (0, 1, 2):
        for rec in json.loads((run / f"replicate_{seed}" / "summary.json").read_text()):
            for m in metrics:
                values.setdefault((rec["level"], rec["branch"]), {}).setdefault(m, []).append(rec[m])
    return {key: {m: (sum(v) / len(v), statistics.stdev(v), len(v)) for m, v in by_m.items()}
            for key, by_m in values.items()}


def test_aggregate_table_is_mean_std_and_count_over_replicates(replicas_run, tmp_path):
    metrics = ("test_accuracy", "early_stop_test_accuracy", "early_stop_step")
    expected = _expected(replicas_run, metrics)
    assert len({v["test_accuracy"][0] for v in expected.values()}) > 1  # the replicates disagree: a real check
    assert any(v["test_accuracy"][1] > 0 for v in expected.values())
    assert main([str(replicas_run), "--out", str(tmp_path)]) == 0
    with open(tmp_path / "aggregate.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(int(r["level"]), r["branch"]) for r in table] == [(0, "ticket"), (1, "ticket"), (2, "ticket"),
                                                               (1, "reinit"), (2, "reinit")]
    assert set(expected) == {(int(r["level"]), r["branch"]) for r in table}
    for r in table:
        want = expected[(int(r["level"]), r["branch"])]
        assert r["n"] == "3" and r["diverged"] == "0"
        for m in metrics:
            mean, std, n = want[m]
            assert float(r[f"{m}_mean"]) == pytest.approx(mean, abs=1e-12), (r["level"], r["branch"], m)
            assert float(r[f"{m}_std"]) == pytest.approx(std, abs=1e-12), (r["level"], r["branch"], m)
            assert int(r[f"{m}_n"]) == n
        summary = json.loads((replicas_run / "replicate_0" / "summary.json").read_text())
        wr = {(s["level"], s["branch"]): s["weights_remaining"] for s in summary}[(int(r["level"]), r["branch"])]
        assert float(r["weights_remaining"]) == pytest.approx(wr, rel=1e-3)
    # the same numbers, formatted: percent, mean ± std, in Markdown and as a booktabs tabular
    md = (tmp_path / "aggregate.md").read_text().splitlines()
    header = next(line for line in md if line.startswith("| Branch"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:3] == ["Branch", "Level", "Weights (%)"] and "Test acc. (%)" in cols and cols[-1] == "n"
    body = [[c.strip() for c in line.strip("|").split("|")] for line in md[md.index(header) + 2:]]
    assert len(body) == 5
    for cells in body:
        mean, std, _ = expected[(int(cells[1]), cells[0])]["test_accuracy"]
        shown_mean, shown_std = cells[cols.index("Test acc. (%)")].split(" ± ")
        decimals = len(shown_mean.split(".")[1]) if "." in shown_mean else 0
        assert float(shown_mean) == pytest.approx(100 * mean, abs=0.51 * 10 ** -decimals)
        assert float(shown_std) == pytest.approx(100 * std, abs=0.51 * 10 ** -decimals)
        assert cells[-1] == "3"
    tex = (tmp_path / "aggregate.tex").read_text()
    for text in ("\\begin{tabular}", "\\toprule", "\\midrule", "\\bottomrule", "Test acc. (\\%)", "\\pm",
                 "Weights (\\%)", "$n$"):
        assert text in tex, text
    rows = [line for line in tex.splitlines() if line.endswith("\\\\") and line.startswith(("ticket", "reinit"))]
    assert len(rows) == 5 and all(line.count("&") == len(cols) - 1 for line in rows)


def test_aggregate_single_replicate_has_no_std_and_takes_every_listed_metric(sweep, tmp_path):
    """n=1: the std is empty, not 0. Any listed metric a record has is aggregated (the cost columns another
    developer adds, lmc's instabilities); columns no record has are not there."""
    from lottery.report import aggregate
    rows = [r for r in collect_runs([sweep]) if r.get("level") is not None]
    for r in rows:
        r["cost_steps"] = 30 * (r["level"] + 1) + r["replicate"]
        r["cost_flops"] = 1.5e9 * (r["level"] + 1) * (1 + r["replicate"])
    [lost] = [r for r in rows if r["condition"] == "ticket, init=xavier_normal" and r["level"] == 2
              and r["replicate"] == 1]
    lost.update(diverged=True, test_accuracy=None)  # a diverged unit: counted, without an accuracy
    table = aggregate(rows)
    by_key = {(r["condition"], r["level"]): r for r in table}
    diverged = by_key[("ticket, init=xavier_normal", 2)]
    assert (diverged["n"], diverged["diverged"], diverged["test_accuracy_n"]) == (2, 1, 1)
    assert diverged["test_accuracy_mean"] == [r for r in rows if r["condition"] == "ticket, init=xavier_normal"
                                              and r["level"] == 2 and r["replicate"] == 0][0]["test_accuracy"]
    one = by_key[("ticket, init=kaiming_normal", 2)]
    assert one["n"] == 1 and one["test_accuracy_std"] is None and one["cost_steps_std"] is None
    two = by_key[("reinit, init=xavier_normal", 1)]
    assert two["n"] == 2
    assert two["cost_steps_mean"] == pytest.approx(60.5) and two["cost_steps_std"] == pytest.approx(2 ** -0.5)
    assert two["cost_flops_mean"] == pytest.approx(4.5e9) and two["cost_flops_std"] == pytest.approx(3e9 * 2 ** -0.5)
    assert "instability_test_mean" not in two and "cost_flops_n" in two
    assert two["cfg.init.name"] == "xavier_normal"
    from lottery.report.aggregate import write_latex, write_markdown
    md = write_markdown(table, tmp_path / "aggregate.md").read_text()
    assert "Training FLOPs (x10^9)" in md and "Settings" in md and "init=kaiming_normal" in md
    row = next(line for line in md.splitlines() if line.startswith("| ticket | init=kaiming_normal | 2 "))
    assert row.split("|")[-2].strip() == "1" and " ± " not in row  # one replicate: the mean alone
    cells = next(line for line in md.splitlines() if line.startswith("| ticket | init=xavier_normal | 2 ")).split("|")
    assert cells[5].strip().endswith(" (n=1)") and " ± " not in cells[5] and cells[-2].strip() == "2"
    tex = write_latex(table, tmp_path / "aggregate.tex").read_text()
    assert "$\\times 10^{9}$" in tex and "init=kaiming\\_normal" in tex and "\\addlinespace" in tex
