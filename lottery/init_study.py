"""`lottery-init-study`: activation and gradient variance per layer at initialization.

Reproduces the initialization figure of Understanding Deep Learning (Prince, ch. 7): a ReLU network of 50 hidden
layers with 100 units, 100-dimensional standard-normal input, one output, least-squares loss against target 0, zero
biases and weights N(0, sigma^2). Per layer it measures the variance of the pre-activations f_k in the forward pass and
of the gradients dL/df_k in the backward pass, averaged over a batch and several seeds. The closed form for ReLU,
sigma_f'^2 = D_h sigma^2 sigma_f^2 / 2, predicts a factor D_h sigma^2 / 2 per layer: flat for He's 2 / D_h, vanishing
below it and exploding above it, in both directions.

Fifty layers span more than 1e100 between the extremes, beyond float32. MLPs are therefore run by hand in float64 with
every layer rescaled to unit size and the scale carried as a logarithm; this is exact because a ReLU network with zero
biases is positively homogeneous. Other models (CNNs) run in float64 with hooks on every Linear/Conv output.
"""

from __future__ import annotations

import csv
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from lottery.config import conf_dir, register_configs
from lottery.core.ranges import at_least, positive, setting

log = logging.getLogger(__name__)

CONF_DIR = conf_dir()  # source checkout or installed package: see lottery.config.conf_dir
register_configs()  # the resolvers conf/init_study.yaml uses (lottery_dirname: shell-safe sweep job folders)
LN10 = math.log(10)


# --- building the networks ------------------------------------------------------------------------------------------


def _is_mlp(name: str) -> bool:
    from lottery.models import MODELS

    return MODELS[name].__module__ == "lottery.models.mlp"


def build(cfg):
    """The configured model (`cfg.model`: the model group's node, name and settings, as lottery-train's) with the
    study's input shape and output size."""
    from lottery.core.registry import plain
    from lottery.models import MODELS, build_model

    settings = plain(cfg.model)
    name = settings.pop("name")
    MODELS.lookup(name)  # an unknown name: one line naming the registered models
    shape = (cfg.input_dim,) if _is_mlp(name) else tuple(cfg.image_shape)
    return build_model(name, shape, cfg.outputs, **settings), shape


def conditions(cfg) -> list[dict]:
    """One init config per curve: N(0, sigma^2) for each listed variance, then each compared initializer."""
    from lottery.init import INITIALIZERS

    out = [{"name": "normal", "variance": float(v), "bias": "zero"} for v in cfg.variances]
    for name in cfg.compare:
        if name not in INITIALIZERS:
            raise ValueError(f"unknown initializer '{name}' in compare; accepted: {', '.join(sorted(INITIALIZERS))}")
        if name == "normal":
            raise ValueError("add N(0, sigma^2) curves through `variances`, not compare=[normal]")
        out.append({"name": name, "bias": "zero"})
    return out


def label(init: dict) -> str:
    return f"N(0, σ²={init['variance']:g})" if init["name"] == "normal" else init["name"]


# --- measuring ----------------------------------------------------------------------------------------------------


def _log_var(x: torch.Tensor) -> float:
    v = x.var(unbiased=False).item()
    return math.log(v) if v > 0 else -math.inf


def measure_mlp(model, x: torch.Tensor) -> tuple[list[float], list[float]]:
    """ln variance of f_k and of dL/df_k for every hidden layer k, for an lottery.models.mlp.MLP with zero biases.

    Both passes keep their tensor at unit RMS and carry the scale in `shift` (a log), so no value ever leaves the
    float64 range whatever the depth or variance.
    """
    layers = [*model.hidden, model.out]
    if any(layer.bias is not None and layer.bias.abs().max() > 0 for layer in layers):
        raise ValueError("the log-space pass needs zero biases (the study's setting); use init bias=zero")
    a, shift = x.flatten(1).double(), 0.0  # activation and ln of its scale
    fwd, masks, scales = [], [], []
    for layer in layers[:-1]:
        f = a @ layer.weight.double().T
        fwd.append(_log_var(f) + 2 * shift)
        rms = f.pow(2).mean().sqrt().item()
        if rms == 0:  # every unit dead: nothing flows further
            return fwd + [-math.inf] * (len(layers) - 1 - len(fwd)), [-math.inf] * (len(layers) - 1)
        f, shift = f / rms, shift + math.log(rms)
        masks.append(f > 0)
        scales.append(shift)
        a = torch.relu(f)
    out = a @ layers[-1].weight.double().T
    g, gshift = 2 * out, shift  # least squares against 0: dL/dout = 2 out (summed over the batch)
    bwd = []
    for layer, mask in zip(reversed(layers[1:]), reversed(masks)):
        g = (g @ layer.weight.double()) * mask
        bwd.append(_log_var(g) + 2 * gshift)
        rms = g.pow(2).mean().sqrt().item()
        if rms == 0:
            return fwd, [-math.inf] * (len(layers) - 1 - len(bwd)) + list(reversed(bwd))
        g, gshift = g / rms, gshift + math.log(rms)
    return fwd, list(reversed(bwd))


def measure_hooks(model, x: torch.Tensor) -> tuple[list[float], list[float]]:
    """ln variance of every Linear/Conv output (but the last) and of the loss gradient there, in float64."""
    model = model.double()
    acts: list[torch.Tensor] = []
    grads: dict[int, torch.Tensor] = {}
    handles = []
    weighted = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]

    def hook(module, inputs, output):
        i = len(acts)
        acts.append(output.detach())
        output.register_hook(lambda g, i=i: grads.__setitem__(i, g.detach()))

    for m in weighted[:-1]:  # the last is the output: it has no ReLU after it
        handles.append(m.register_forward_hook(hook))
    try:
        out = model(x.double())
        out.pow(2).sum().backward()
    finally:
        for h in handles:
            h.remove()
    return [_log_var(a) for a in acts], [_log_var(grads[i]) for i in range(len(acts))]


def _log_mean(logs: list[float]) -> float:
    """ln of the mean of exp(logs): the seed average, without leaving log space."""
    top = max(logs)
    if top == -math.inf or math.isnan(top):
        return top
    return top + math.log(sum(math.exp(v - top) for v in logs) / len(logs))


def predicted(model, init: dict) -> tuple[list[float], list[float]] | None:
    """Closed-form ln variances for an MLP (mean field: f_k and dL/df_k independent of the weights that follow)."""
    from lottery.init import weight_variance

    layers = [*model.hidden, model.out]
    try:
        vs = [
            weight_variance(
                init["name"],
                layer.in_features,
                layer.out_features,
                **{k: v for k, v in init.items() if k not in ("name", "bias")},
            )
            for layer in layers
        ]
    except ValueError:  # no closed form (orthogonal, custom): measured curves only
        return None
    fwd, lv = [], 0.0  # ln E[x^2] = 0 for standard-normal input
    for k, (layer, v) in enumerate(zip(layers[:-1], vs)):
        # ReLU halves E[a^2] from layer 2 on
        lv = math.log(layer.in_features * v) + lv + (0.0 if k == 0 else -math.log(2))
        fwd.append(lv)
    lout = math.log(layers[-1].in_features * vs[-1] / 2) + fwd[-1]
    g = math.log(4) + lout  # dL/dout = 2 out
    bwd = []
    for layer, v in zip(reversed(layers[1:]), reversed(vs[1:])):
        g = g + math.log(layer.out_features * v / 2)  # back through W^T (fan-out terms), then the ReLU mask halves
        bwd.append(g)
    return fwd, list(reversed(bwd))


def run_study(cfg) -> list[dict]:
    """Rows of (init, layer, pass) with the measured and predicted log10 variance, averaged over seeds."""
    if cfg.get("threads") is not None and cfg.threads < 1:
        raise ValueError(f"threads must be >= 1 (or null: 1), got {cfg.threads}")
    threads = torch.get_num_threads()
    # 100x100 matrices: extra threads only add synchronisation, which costs 20x on a busy machine (threads=null: 1)
    torch.set_num_threads(int(cfg.get("threads") or 1))
    try:
        return _run_study(cfg)
    finally:
        torch.set_num_threads(threads)


def _run_study(cfg) -> list[dict]:
    from lottery.init import initialize

    rows = []
    for init in conditions(cfg):
        fwd_runs, bwd_runs = [], []
        for seed in range(cfg.seeds):
            model, shape = build(cfg)
            initialize(model, init, seed)
            x = torch.randn(
                (cfg.batch_size, *shape), generator=torch.Generator().manual_seed(10_000 + seed), dtype=torch.float64
            )
            mlp = _is_mlp(cfg.model.name)
            with torch.set_grad_enabled(not mlp):
                f, b = measure_mlp(model, x) if mlp else measure_hooks(model, x)
            fwd_runs.append(f)
            bwd_runs.append(b)
        if not all(math.isfinite(v) for r in fwd_runs + bwd_runs for v in r):
            log.warning("%s: some layers left the float64 range (or died); they are gaps in the figure", label(init))
        pred = predicted(model, init) if _is_mlp(cfg.model.name) else None
        for pass_, runs, k in (("forward", fwd_runs, 0), ("backward", bwd_runs, 1)):
            for layer in range(len(runs[0])):
                ln = _log_mean([r[layer] for r in runs])
                rows.append(
                    {
                        "init": label(init),
                        "initializer": init["name"],
                        "sigma2": init.get("variance"),
                        "pass": pass_,
                        "layer": layer + 1,
                        "log10_variance": ln / LN10,
                        "variance": _sci(ln / LN10),
                        "predicted_log10_variance": pred[k][layer] / LN10 if pred else None,
                    }
                )
    return rows


def _sci(log10: float) -> str:
    """A variance as text from its log, exact past float64's 1e-308..1e308 where a float would read 0 or inf."""
    if not math.isfinite(log10):
        return "0" if log10 == -math.inf else str(log10)
    exp = math.floor(log10)
    return f"{10 ** (log10 - exp):.6g}e{exp:+d}"


def slope(rows: list[dict], init: str, pass_: str, skip: int = 2) -> float:
    """Measured log10 variance change per layer (least squares over the layers, the first and last `skip` left out)."""
    pts = [(r["layer"], r["log10_variance"]) for r in rows if r["init"] == init and r["pass"] == pass_]
    pts = sorted(pts)[skip : len(pts) - skip] if len(pts) > 2 * skip + 2 else sorted(pts)
    n = len(pts)
    mx, my = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def verdict(per_layer_log10: float, tol: float = 0.02) -> str:
    return "stable" if abs(per_layer_log10) <= tol else ("exploding" if per_layer_log10 > 0 else "vanishing")


# --- output ------------------------------------------------------------------------------------------------------


def write_csv(rows: list[dict], path) -> Path:
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    return path


def plot(rows: list[dict], out_dir, cfg) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    out_dir = Path(out_dir)
    inits = list(dict.fromkeys(r["init"] for r in rows))
    n_var = len(cfg.variances)
    normal_colors = plt.get_cmap("turbo")  # blue (small sigma^2) to red (large), every step visible on white
    other_colors = plt.get_cmap("Dark2")
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True)
    for ax, pass_ in zip(axes, ("forward", "backward")):
        for i, init in enumerate(inits):
            pts = sorted(
                (r["layer"], r["log10_variance"], r["predicted_log10_variance"])
                for r in rows
                if r["init"] == init and r["pass"] == pass_
            )
            color = normal_colors(0.08 + 0.84 * i / max(1, n_var - 1)) if i < n_var else other_colors(i - n_var)
            trend = verdict(slope(rows, init, "forward"))
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                "-" if i < n_var else "--",
                color=color,
                linewidth=2,
                label=f"{init}  ({trend})",
            )
            if pts and pts[0][2] is not None:
                ax.plot([p[0] for p in pts], [p[2] for p in pts], ":", color=color, linewidth=1)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"$10^{{{int(round(v))}}}$"))  # noqa: RUF046 - v may be a NumPy float: round() keeps it
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("Layer k" + ("  (the backward pass runs right to left)" if pass_ == "backward" else ""))
    axes[0].set_ylabel("Variance (log scale)")
    axes[0].set_title("Forward pass: variance of pre-activations $f_k$")
    axes[1].set_title("Backward pass: variance of gradients $\\partial L / \\partial f_k$")
    m = cfg.model
    shape = (
        f"{m.depth} hidden layers × {m.width} ReLU units" if m.name == "deep_mlp" and not m.get("hidden") else m.name
    )
    fig.suptitle(
        f"Variance through the network at initialization: {shape}\nstandard-normal input, least-squares "
        f"loss against 0, zero biases; mean over {cfg.seeds} seeds × {cfg.batch_size} inputs",
        fontsize=10.5,
    )
    handles, labels = axes[0].get_legend_handles_labels()
    if any(r["predicted_log10_variance"] is not None for r in rows):
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], linestyle=":", color="gray"))
        labels.append("closed form: × $D_h\\sigma^2/2$ per layer")
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8.5, frameon=False)
    fig.tight_layout(rect=(0, 0.05 + 0.045 * math.ceil(len(labels) / 4), 1, 1))
    paths = [out_dir / "init_study.png", out_dir / "init_study.svg"]
    with plt.rc_context({"svg.fonttype": "none"}):  # SVG text stays text: searchable, editable, smaller
        for p in paths:
            fig.savefig(p, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


@dataclass
class StudySettings:
    """The study's keys (conf/init_study.yaml) with their ranges (lottery.core.ranges), checked before it measures."""

    input_dim: int = setting(100, at_least(1))
    image_shape: list[int] = setting(lambda: [3, 32, 32], at_least(1))
    outputs: int = setting(1, at_least(1))
    variances: list[float] = setting(list, positive())
    batch_size: int = setting(1000, at_least(1))
    seeds: int = setting(10, at_least(1))


def check_study(cfg) -> None:
    """Every value of the study in range, the model's settings as lottery-train checks them, and at least one curve:
    one ValueError naming the first bad key (before any file of the study is written)."""
    from omegaconf import OmegaConf

    from lottery.config import ModelConfig
    from lottery.core.ranges import check_fields
    from lottery.core.registry import as_dict

    values = as_dict(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    check_fields(StudySettings, values)
    check_fields(ModelConfig, values.get("model") or {}, "model")
    if not values.get("variances") and not values.get("compare"):
        raise ValueError(
            "variances=[] and compare=[] leave no curve to measure; accepted: at least one variance "
            "(e.g. variances=[0.02]) or one initializer in compare"
        )


def study(cfg, out_dir) -> list[Path]:
    """Measure, then write init_study.csv and the two-panel figure into out_dir."""
    check_study(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = run_study(cfg)
    for init in dict.fromkeys(r["init"] for r in rows):
        f, b = slope(rows, init, "forward"), slope(rows, init, "backward")
        log.info(
            "%-28s forward x%-10.3g per layer, backward x%-10.3g per layer going back: %s",
            init,
            10**f,
            10**-b,
            verdict(f),
        )
    paths = [write_csv(rows, out_dir / "init_study.csv"), *plot(rows, out_dir, cfg)]
    log.info("measured in %.1fs; wrote %s", time.perf_counter() - t0, ", ".join(map(str, paths)))
    return paths


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="init_study")
def _main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        study(cfg, HydraConfig.get().runtime.output_dir)
    except ValueError as e:  # a bad value (compare=[nope], a model's own setting): one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# Keys of the study's network before it became the model group (conf/model/), and where they are now.
MOVED = {"depth": "model.depth", "width": "model.width", "hidden": "model.hidden"}


def command_line_error(args: list[str]) -> str | None:
    """What Hydra would refuse in many lines, as one: a `model=` that conf/model/ does not have, or a key that moved
    into the model group."""
    for arg in args:
        key, eq, value = arg.lstrip("+~").partition("=")
        if key in MOVED:
            return (
                f"{key} is now {MOVED[key]} (the network is a model option, as in lottery-train: model=deep_mlp "
                f"model.depth=50 model.width=100, model=mlp model.hidden=[64,64], model=conv2 ...)"
            )
        if key == "model" and eq:
            options = model_options()
            unknown = [v for v in value.split(",") if v not in options]  # a -m sweep lists several
            if "(" in value:  # Hydra's sweep functions (choice(...), glob(...)): Hydra checks those
                continue
            if options and unknown:
                return f"unknown model '{unknown[0]}'; accepted: {', '.join(options)}"
    return None


def model_options() -> list[str]:
    """The options of the model group (conf/model/*.yaml), wherever conf/ is (a checkout, or the installed package)."""
    from hydra._internal.config_repository import ConfigRepository
    from hydra._internal.utils import create_config_search_path
    from hydra.core.object_type import ObjectType

    repo = ConfigRepository(config_search_path=create_config_search_path(CONF_DIR))
    return sorted(repo.get_group_options("model", results_filter=ObjectType.CONFIG))


def main() -> None:
    """`lottery-init-study [overrides]`."""
    from lottery.core.commandline import exit_early, unknown_key

    exit_early(sys.argv[1:])
    error = command_line_error(sys.argv[1:]) or unknown_key(sys.argv[1:], CONF_DIR, "init_study")
    if error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    _main()


if __name__ == "__main__":
    main()
