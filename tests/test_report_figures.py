"""`lottery-report`'s figures stay readable at any number of lines: a method keeps one colour in every figure, branches
differ by line style, legends sit outside the axes in sections and never show two entries alike; the instability
legend shows its dashes; equal layer densities stay visible; condition labels name only settings that matter.

The run folders here are written by hand (config.yaml and summary.json, as lottery-train leaves them), so many
conditions cost nothing to train."""
import json
import re

import pytest
from omegaconf import OmegaConf

from lottery.report import collect_runs, make_figures, make_lmc_figures
from lottery.report.style import HANDLE_LENGTH, PALETTE

LENET_LAYERS = ("hidden.0.weight", "hidden.1.weight", "out.weight")
CONV2_LAYERS = ("convs.0.weight", "convs.1.weight", "fcs.0.weight", "fcs.1.weight", "out.weight")


def write_run(path, *, seed=0, model="lenet_300_100", shape="mnist", criterion="magnitude", when="after_training",
              one_shot=False, from_dense=False, levels=3, branches=(), init="xavier_normal", rates=None,
              branch_settings=None, layers=LENET_LAYERS, density=None, accuracy=None, lmc=False):
    """A finished run folder: config.yaml and summary.json, one record per level and branch."""
    cfg = {"name": "default", "seed": seed, "model": {"name": model}, "dataset": {"name": "synthetic",
                                                                                  "synthetic_shape": shape},
           "init": {"name": init}, "branch": branch_settings or {},
           "pruning": {"criterion": {"name": criterion}, "scope": "layerwise", "when": when, "one_shot": one_shot,
                       "from_dense": from_dense, "rewind": "0", "levels": levels, "target": None, "rate": 0.2,
                       "rates": rates or {"linear": 0.2, "conv": 0.1, "output": 0.1}, "branches": list(branches)}}
    path.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(cfg), path / "config.yaml")
    records = []
    accuracy = accuracy or (lambda level, branch: 0.9 - 0.01 * level - 0.02 * len(branch) / 5 + 0.001 * seed)
    for level in range(levels):
        for branch in ["ticket"] + ([b for b in branches] if level else []):
            rec = {"level": level, "branch": branch, "replicate": seed, "weights_remaining": 0.8 ** level,
                   "test_accuracy": accuracy(level, branch), "early_stop_step": 100 + 10 * level,
                   "early_stop_test_accuracy": accuracy(level, branch), "model": model, "dataset": "synthetic",
                   "layer_density": (density or {}).get(level) or {n: 0.8 ** level for n in layers},
                   "diverged": False}
            if lmc and branch == "lmc":
                rec.update(lmc_steps=[0], instability_test=1.0, instability_train=0.5,
                           instability_by_step={"0": {"test": 1.0, "train": 0.5}})
            records.append(rec)
    (path / "summary.json").write_text(json.dumps(records))
    return path


@pytest.fixture
def figures(monkeypatch):
    """{stem: figure} of every figure the report saves (kept open for the test to inspect)."""
    import lottery.report.figures as F
    import lottery.report.lmc as L
    caught = {}
    real = F.save

    def spy(fig, out_dir, stem):
        fig.canvas.draw()  # layout done: legend and axes extents are final
        caught[stem] = fig
        return real(fig, out_dir, stem)

    monkeypatch.setattr(F, "save", spy)
    monkeypatch.setattr(L, "save", spy)
    return caught


def _entries(legend):
    """[(text, handle)] of a legend, section titles left out."""
    return [(t.get_text(), h) for t, h in zip(legend.get_texts(), legend.legend_handles)
            if t.get_fontweight() not in ("bold", 700)]


def _look(h):
    return (h.get_color(), h.get_marker() if h.get_marker() not in (None, "None", "") else None,
            repr(h._unscaled_dash_pattern))


def _strip(text: str) -> str:
    return re.sub(r" \((n=[^)]*|ceiling|floor)\)", "", text)


METHODS = [("imp", "magnitude", "after_training", False, False), ("oneshot", "magnitude", "after_training", True, True),
           ("random", "random", "at_init", False, True), ("mi", "magnitude_init", "at_init", False, True),
           ("snip", "snip", "at_init", False, True), ("grasp", "grasp", "at_init", False, True),
           ("synflow", "synflow", "at_init", False, True)]
ABLATIONS = ("layer_shuffle", "reinit", "invert")


@pytest.mark.slow
def test_every_method_keeps_its_colour_and_legends_are_sections_outside_the_axes(tmp_path, figures):
    """The pruning-at-init comparison: 7 methods x (ticket + 3 ablations) = 28 lines, which today's report drew with
    a 28-entry legend in a 10-colour cycle. Now: 7 colours (one per method, the same in every figure) and 4 line
    styles (one per branch), each in its own legend section."""
    for name, crit, when, one_shot, from_dense in METHODS:
        for seed in (0, 1):
            write_run(tmp_path / "runs" / f"{name}_{seed}", seed=seed, criterion=crit, when=when, one_shot=one_shot,
                      from_dense=from_dense, branches=() if name == "imp" else ABLATIONS)
    rows = collect_runs([tmp_path / "runs"])
    make_figures(rows, tmp_path / "rep")
    assert {"lottery_ticket", "early_stop", "methods", "ablations", "layer_density"} <= set(figures)
    colours = {}  # method -> colour, over every figure
    for stem in ("lottery_ticket", "early_stop", "methods", "ablations"):
        fig = figures[stem]
        [legend] = fig.legends
        titles = [t.get_text() for t in legend.get_texts() if t.get_fontweight() in ("bold", 700)]
        entries = _entries(legend)
        looks = [_look(h) for _, h in entries]
        assert len(set(looks)) == len(looks), (stem, entries)  # no two entries alike
        methods = [(_strip(text), h) for text, h in entries if _strip(text) in {r["method"] for r in rows}]
        assert len(methods) == (6 if stem == "ablations" else 7), stem  # IMP has no ablations
        assert len({h.get_color() for _, h in methods}) == len(methods), stem  # never one colour for two methods
        for m, h in methods:
            assert colours.setdefault(m, h.get_color()) == h.get_color(), (stem, m)
        if stem != "methods":
            assert titles == ["Pruning method (colour)", "Branch (line style)"], stem
            assert len(entries) == len(methods) + 4 + (stem == "ablations"), [t for t, _ in entries]  # + dense line
            styles = {t: _look(h)[2] for t, h in entries if not h.get_color() in colours.values() and "dense" not in t}
            assert len(styles) == 4 and len(set(styles.values())) == 4, styles
            assert styles["ticket (each method's mask)"] == repr((0, None))  # the ticket solid, controls dashed
        # every line drawn has its method's colour and its branch's line style
        for ax in fig.axes:
            for line in ax.get_lines():
                text = line.get_label()
                if not text.startswith("_") or text.startswith("_child"):
                    continue
                method = _strip(text[1:]).split(": ")[-1]
                assert line.get_color() == colours[method], (stem, text)
                is_ticket = ": " not in text
                assert (line._unscaled_dash_pattern == (0, None)) == is_ticket, (stem, text)
        # the legend lies outside every axes
        box = legend.get_window_extent()
        for ax in fig.axes:
            if ax.get_visible():
                a = ax.get_window_extent()
                assert box.x0 >= a.x1 - 1 or box.y1 <= a.y0 + 1, (stem, box, a)


    # a report of two of these methods draws them in the same colours as the whole comparison
    figures.clear()
    make_figures(collect_runs([tmp_path / "runs" / name for name in ("imp_0", "snip_0", "snip_1")]), tmp_path / "two")
    entries = _entries(figures["lottery_ticket"].legends[0])
    two = {_strip(text): h.get_color() for text, h in entries if _strip(text) in colours}
    assert two == {m: colours[m] for m in ("IMP (magnitude), original init", "SNIP at init")}


def test_more_conditions_than_colours_add_markers_and_no_entry_repeats(tmp_path, figures):
    n = len(PALETTE) + 4
    for i in range(n):
        write_run(tmp_path / "runs" / f"init_{i:02d}", init=f"init{i:02d}", branches=("reinit",))
    make_figures(collect_runs([tmp_path / "runs"]), tmp_path / "rep")
    fig = figures["lottery_ticket"]
    [legend] = fig.legends
    entries = _entries(legend)
    groups = [(t, h) for t, h in entries if t.startswith("init=")]
    assert len(groups) == n
    looks = [(h.get_color(), h.get_marker()) for _, h in groups]
    assert len(set(looks)) == n  # colour and marker together tell every condition apart
    lines = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_label().startswith("_")
             and not ln.get_label().startswith("_child")]
    drawn = [(ln.get_color(), ln.get_marker(), repr(ln._unscaled_dash_pattern)) for ln in lines]
    assert len(lines) == 2 * 2 * n and len(set(drawn)) == 2 * n  # two panels, each line a look of its own
    # the same layer densities under every initializer (layerwise rates): one panel, not n
    [ax] = [a for a in figures["layer_density"].axes if a.get_visible()]
    assert f"{n} conditions with the same densities: init=init00, ..., init=init{n - 1}" in ax.get_title()


def test_instability_legend_shows_that_train_is_dashed(tmp_path, figures):
    rows = [{"run_dir": str(tmp_path), "model": "m", "dataset": "d", "branch": "lmc", "condition": "lmc",
             "level": lv, "percent_remaining": 100 * 0.8 ** lv, "lmc_steps": [0, 100, 500],
             **{f"instability_{s}_k{k}": 0.1 * lv + k / 1000 + (s == "train") for s in ("test", "train")
                for k in (0, 100, 500)}} for lv in range(3)]
    make_lmc_figures(rows, tmp_path / "rep")
    fig = figures["instability"]
    for ax in fig.axes:
        legend = ax.get_legend()
        entries = dict(_entries(legend))
        test, train = entries["test"], entries["train"]
        assert test._unscaled_dash_pattern == (0, None)
        offset, dashes = train._unscaled_dash_pattern
        assert dashes, "train drawn solid in the legend"
        # the handle is long enough to show at least two dashes and gaps
        period = sum(dashes) * train.get_linewidth()
        assert legend.handlelength * legend.prop.get_size() >= 2 * period
        assert legend.handlelength == HANDLE_LENGTH
        dashed = [ln for ln in ax.get_lines() if ln._unscaled_dash_pattern == train._unscaled_dash_pattern]
        solid = [ln for ln in ax.get_lines() if ln._unscaled_dash_pattern == (0, None) and len(ln.get_xdata()) > 1
                 and ln.get_color() != "k"]
        assert len(dashed) == len(solid) > 0  # every line drawn once per split


def test_layer_density_shows_layers_with_equal_rates(tmp_path, figures):
    density = {lv: {"hidden.0.weight": 0.8 ** lv, "hidden.1.weight": 0.8 ** lv, "out.weight": 0.8 ** lv + 0.001 * lv}
               for lv in range(3)}
    write_run(tmp_path / "run", density=density)
    make_figures(collect_runs([tmp_path / "run"]), tmp_path / "rep")
    [ax] = [a for a in figures["layer_density"].axes if a.get_visible()]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"hidden.0.weight = hidden.1.weight", "out.weight", "all prunable weights"}
    shared, out = lines["hidden.0.weight = hidden.1.weight"], lines["out.weight"]
    # nearly equal lines: apart sideways, another marker and colour
    assert all(abs(a - b) > 0.05 for a, b in zip(shared.get_xdata(), out.get_xdata()))
    assert shared.get_marker() != out.get_marker() and shared.get_color() != out.get_color()
    assert "equal densities share a line" in ax.get_legend().get_title().get_text()
    legend_box, axes_box = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend_box.x0 >= axes_box.x1 - 1  # beside the axes, hiding no line


@pytest.mark.slow
def test_condition_labels_name_only_the_settings_that_matter(tmp_path, figures):
    """A per-kind rate only for models with that layer kind, a branch's settings only for that branch's records, and
    a dense-only run is the dense network, not a winning ticket."""
    runs = tmp_path / "runs"
    for conv in (0.1, 0.3):
        rates = {"linear": 0.2, "conv": conv, "output": 0.1}
        write_run(runs / f"lenet_{conv}", rates=rates, branches=("reinit", "lmc"), lmc=True,
                  branch_settings={"lmc": {"points": int(conv * 100)}})
        write_run(runs / f"conv2_{conv}", model="conv2", shape="cifar10", rates=rates, layers=CONV2_LAYERS,
                  branches=("reinit",))
    rows = collect_runs([runs])
    conditions = {(r["model"], r["branch"], r["condition"]) for r in rows}
    lenet, conv2 = "dataset.synthetic_shape=mnist, model=lenet_300_100", "dataset.synthetic_shape=cifar10, model=conv2"
    assert conditions == {
        ("lenet_300_100", "ticket", f"ticket, {lenet}"), ("lenet_300_100", "reinit", f"reinit, {lenet}"),
        ("lenet_300_100", "lmc", f"lmc, branch.lmc.points=10, {lenet}"),
        ("lenet_300_100", "lmc", f"lmc, branch.lmc.points=30, {lenet}"),
        ("conv2", "ticket", f"ticket, {conv2}, pruning.rates.conv=0.1"),
        ("conv2", "ticket", f"ticket, {conv2}, pruning.rates.conv=0.3"),
        ("conv2", "reinit", f"reinit, {conv2}, pruning.rates.conv=0.1"),
        ("conv2", "reinit", f"reinit, {conv2}, pruning.rates.conv=0.3")}
    make_figures(rows, tmp_path / "rep")
    texts = [t.get_text() for t in figures["lottery_ticket"].legends[0].get_texts()]
    assert "pruning.rates.conv=0.1 (n=1)" in texts and "pruning.rates.conv=0.3 (n=1)" in texts
    assert not any("model=" in t or "synthetic_shape" in t or "branch.lmc" in t for t in texts)  # panel titles
    svg = (tmp_path / "rep" / "lottery_ticket.svg").read_text()
    assert "lenet_300_100 on synthetic" in svg and "conv2 on synthetic" in svg

    dense = write_run(tmp_path / "dense" / "run", levels=1)
    rows = collect_runs([dense])
    assert rows[0]["condition"] == "ticket" and rows[0]["_dense_only"]
    make_figures(rows, tmp_path / "rep_dense")
    svg = (tmp_path / "rep_dense" / "lottery_ticket.svg").read_text()
    assert "dense network (n=1)" in svg and "winning ticket" not in svg
    md_rows = collect_runs([dense, runs / "lenet_0.1"])  # beside a pruned run, the same line: a winning ticket
    figures.clear()
    make_figures([r for r in md_rows if r["branch"] == "ticket"], tmp_path / "rep_mixed")
    texts = [t.get_text() for t in figures["lottery_ticket"].legends[0].get_texts()]
    assert texts == ["winning ticket (IMP mask, original init) (n=1)"]


def test_unknown_model_keeps_per_kind_rates(tmp_path):
    """A user's model this process cannot build: a differing per-kind rate may matter, so it stays in the label."""
    for conv in (0.1, 0.3):
        write_run(tmp_path / f"r{conv}", model="my_own_net", rates={"linear": 0.2, "conv": conv, "output": 0.1})
    conditions = {r["condition"] for r in collect_runs([tmp_path])}
    assert conditions == {"ticket, pruning.rates.conv=0.1", "ticket, pruning.rates.conv=0.3"}
