"""The initialization study against the lecture's closed form: each ReLU layer multiplies the variance of the
pre-activations (forward) and of their gradients (backward) by D_h sigma^2 / 2, so He's sigma^2 = 2 / D_h is flat."""
import csv
import math

import pytest
import torch
from omegaconf import OmegaConf

from lottery import init_study as D
from lottery.init import initialize

from conftest import REPO, in_process, make_cfg


def study_cfg(model: str = "deep_mlp", **overrides):
    """The study's config as lottery-init-study composes it; depth, width and hidden are the model's settings."""
    cfg = make_cfg(f"model={model}", config_name="init_study")
    cfg.seeds, cfg.batch_size = 3, 400  # enough for a per-layer slope within 1%
    for k, v in overrides.items():
        OmegaConf.update(cfg, f"model.{k}" if k in D.MOVED else k, v)
    return cfg


@pytest.mark.parametrize("depth,width", [(50, 100), (50, 40)])
def test_per_layer_ratio_matches_closed_form(depth, width):
    he = 2 / width
    variances = [he / 20, he / 2, he, 5 * he, 50 * he]  # the lecture's 0.001 ... 1.0 for width 100
    rows = D.run_study(study_cfg(depth=depth, width=width, variances=variances))
    for v in variances:
        init = D.label({"name": "normal", "variance": v})
        expected = math.log10(width * v / 2)
        # forward: f_k grows by the ratio with k; backward: dL/df_k grows by it going back, so falls with k
        assert D.slope(rows, init, "forward") == pytest.approx(expected, abs=0.025)
        assert D.slope(rows, init, "backward") == pytest.approx(-expected, abs=0.025)
    flat = D.label({"name": "normal", "variance": he})
    for pass_ in ("forward", "backward"):
        values = [r["log10_variance"] for r in rows if r["init"] == flat and r["pass"] == pass_]
        # a few-fold drift over all layers from finite width, against 15 decades for sigma^2 = he / 2
        assert max(values) - min(values) < 1.5


def test_first_layer_and_prediction_follow_the_input_dimension():
    rows = D.run_study(study_cfg(depth=10, input_dim=30, variances=[0.02]))
    first = next(r for r in rows if r["pass"] == "forward" and r["layer"] == 1)
    assert first["log10_variance"] == pytest.approx(math.log10(30 * 0.02), abs=0.05)  # D_in sigma^2, var(x) = 1
    for r in rows:
        if r["pass"] == "forward":
            assert r["log10_variance"] == pytest.approx(r["predicted_log10_variance"], abs=0.15)


def test_log_space_pass_equals_plain_float64_autograd():
    """The rescaled hand-written pass is the autograd answer, not an approximation of it."""
    model, _ = D.build(study_cfg(depth=6))
    initialize(model, {"name": "normal", "variance": 0.1, "bias": "zero"}, 0)
    x = torch.randn(200, 100, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fwd, bwd = D.measure_mlp(model, x)
    ref_fwd, ref_bwd = D.measure_hooks(model, x)
    assert fwd == pytest.approx(ref_fwd, abs=1e-9) and bwd == pytest.approx(ref_bwd, abs=1e-9)


def test_values_beyond_float64_stay_exact_in_log_space():
    # 200 layers at sigma^2 = 1: variance 50^200 ~ 1e340 forward and ~1e680 backward, past float64's 1.8e308
    rows = D.run_study(study_cfg(depth=200, variances=[1.0, 0.001], seeds=2, batch_size=200))
    for r in rows:
        assert math.isfinite(r["log10_variance"])
        assert int(r["variance"].split("e")[1]) == math.floor(r["log10_variance"])  # the table's text is exact too
    big = D.label({"name": "normal", "variance": 1.0})
    top = max(r["log10_variance"] for r in rows if r["init"] == big)
    assert top > 600
    assert D.slope(rows, big, "forward") == pytest.approx(math.log10(50), abs=0.025)
    small = D.label({"name": "normal", "variance": 0.001})
    assert min(r["log10_variance"] for r in rows if r["init"] == small) < -400  # below float64's 1e-308 too


def test_compared_initializers_and_a_cnn():
    rows = D.run_study(study_cfg(variances=[], compare=["kaiming_normal", "xavier_normal", "pytorch_default"]))
    assert D.verdict(D.slope(rows, "kaiming_normal", "forward")) == "stable"
    assert D.slope(rows, "xavier_normal", "forward") == pytest.approx(math.log10(0.5), abs=0.025)  # 2/(100+100)
    assert D.slope(rows, "pytorch_default", "forward") == pytest.approx(math.log10(1 / 6), abs=0.025)  # 1/(3 fan_in)

    rows = D.run_study(study_cfg(model="conv2", image_shape=[3, 16, 16], variances=[0.02], seeds=1, batch_size=4,
                                 compare=["kaiming_normal"]))
    layers = {r["layer"] for r in rows}
    assert layers == {1, 2, 3, 4}  # 2 convs + 2 hidden linears; the output layer has no ReLU after it
    assert all(math.isfinite(r["log10_variance"]) for r in rows)


def test_unknown_initializer_is_named():
    with pytest.raises(ValueError, match="nope"):
        D.run_study(study_cfg(compare=["nope"]))


def test_hydra_app_writes_table_and_figure(tmp_path):
    """The default study (only fewer seeds) through its Hydra entry point: every curve goes the way it should."""
    out = tmp_path / "study"
    proc = in_process(f"hydra.run.dir={out}", "seeds=3", cwd=REPO, entry="lottery.init_study:main")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("init_study.csv", "init_study.png", "init_study.svg"):
        assert (out / name).stat().st_size > 1000
    with open(out / "init_study.csv") as f:
        rows = [{**r, "layer": int(r["layer"]), "log10_variance": float(r["log10_variance"])} for r in csv.DictReader(f)]
    assert len(rows) == 5 * 50 * 2
    want = {0.001: "vanishing", 0.01: "vanishing", 0.02: "stable", 0.1: "exploding", 1.0: "exploding"}
    for v, trend in want.items():
        init = D.label({"name": "normal", "variance": v})
        assert D.verdict(D.slope(rows, init, "forward")) == trend
        assert D.verdict(-D.slope(rows, init, "backward")) == trend  # read right to left


def run_study_app(*args: str, tmp_path):
    """`lottery-init-study ARGS` (in this process: tests/conftest.py's in_process)."""
    return in_process(*args, cwd=tmp_path, entry="lottery.init_study:main")


def test_any_model_of_the_model_group_through_the_entry_point(tmp_path):
    """`model=conv2` is the model group's option, as in lottery-train (it once failed: "Could not override 'model'")."""
    out = tmp_path / "conv2"
    proc = run_study_app("model=conv2", "image_shape=[3,16,16]", "seeds=1", "batch_size=4", "variances=[0.02]",
                         "compare=[kaiming_normal]", f"hydra.run.dir={out}", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "init_study.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["init"] for r in rows} == {"kaiming_normal", D.label({"name": "normal", "variance": 0.02})}
    assert {int(r["layer"]) for r in rows} == {1, 2, 3, 4}  # Conv-2: 2 convs + 2 hidden linears
    assert (out / "init_study.png").stat().st_size > 1000

    # a model's own setting is model.<key>: resnet20 at width 4 is another network than at 16
    out = tmp_path / "resnet"
    proc = run_study_app("model=resnet20", "model.width=4", "image_shape=[3,8,8]", "seeds=1", "batch_size=2",
                         "variances=[0.02]", f"hydra.run.dir={out}", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model:\n  name: resnet20\n  width: 4" in (out / ".hydra" / "config.yaml").read_text()


@pytest.mark.parametrize("arg, message", [
    ("model=resnet99", "error: unknown model 'resnet99'; accepted: conv2, conv4, conv6, deep_mlp, lenet_300_100, mlp"),
    ("model=conv2,nope", "error: unknown model 'nope'; accepted: conv2"),
    ("depth=20", "error: depth is now model.depth"),
    ("width=50", "error: width is now model.width"),
    ("compare=[nope]", "error: unknown initializer 'nope' in compare; accepted: kaiming_normal"),
])
def test_bad_command_line_is_one_line(arg, message, tmp_path):
    proc = run_study_app(arg, "seeds=1", "batch_size=4", f"hydra.run.dir={tmp_path / 'out'}", tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "out" / "init_study.csv").exists()


def test_help_lists_the_study_options_not_lottery_train_groups(tmp_path):
    proc = run_study_app("--help", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("lottery-init-study [overrides]")
    for option in ("model=NAME", "variances=[...]", "compare=[...]", "input_dim=N", "image_shape=[C,H,W]", "seeds=N"):
        assert option in text
    models = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
    listed = text.split("model=NAME", 1)[1].split("variances=", 1)[0]
    assert all(m in listed for m in models), listed  # every option of conf/model/ is named
    assert "pruning:" not in text and "optimizer:" not in text and "launcher:" not in text  # lottery-train's groups


@pytest.mark.parametrize("overrides, message", [
    ({"seeds": 0}, "seeds must be >= 1, got 0"),
    ({"variances": []}, "variances=[] and compare=[] leave no curve to measure"),
    ({"variances": [float("nan")]}, "variances entries must be > 0, got nan"),
    ({"variances": [float("inf")]}, "variances entries must be > 0, got inf"),
    ({"variances": [0.02, -1.0]}, "variances entries must be > 0, got -1.0 (entry 1 of [0.02, -1.0])"),
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ({"depth": 0}, "model.depth must be >= 1, got 0"),
    ({"width": -3}, "model.width must be >= 1, got -3"),
    ({"input_dim": 0}, "input_dim must be >= 1, got 0"),
])
def test_bad_study_values_are_one_line_before_anything_is_written(tmp_path, overrides, message):
    """Issue 28: these were tracebacks, or exit 0 with NaN curves labelled "vanishing"."""
    out = tmp_path / "out"
    with pytest.raises(ValueError) as e:
        D.study(study_cfg(**overrides), out)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    assert not out.exists()
