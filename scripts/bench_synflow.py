#!/usr/bin/env python3
"""SynFlow's iterative pruning (100 rounds, global, exponential schedule): this project against a Synaptic-Flow-style
reference, side by side.

    python scripts/bench_synflow.py                       # LeNet-300-100 and ResNet-20 to 1% density, 5 repeats
    python scripts/bench.py --synflow                     # the same table from the main benchmark
    python scripts/bench_synflow.py --quick               # 20 rounds, one repeat: checks that it runs, not speed

  reference  Synaptic-Flow's algorithm as their code runs it (github ganguli-lab/Synaptic-Flow: Layers/layers.py,
             Pruners/pruners.py SynFlow and Pruner._global_mask, prune.py prune_loop): masks are buffers multiplied
             into the weights in every forward (W = weight_mask * weight), the model in eval mode; each round takes
             the sign of every state entry and its absolute value in place, one float32 forward of an all-ones input,
             backward of the output sum, score |grad * theta|, restores the signs; then the threshold is the k-th
             smallest of all global scores (torch.kthvalue, k = (1 - density**((round+1)/rounds)) * numel) and every
             score <= threshold is pruned. Their `next(iter(dataloader))` per round (only the input's shape is used)
             is left out: the reference is their code minus its data loading, if anything faster than theirs.
  project    `lottery.pruning.prune` with pruning.criterion.name=synflow, scope=global, rounds=100 and the same target
             density, called as the experiment driver calls it (lottery.experiment.plan.prune_level): on the scoring model
             with all-ones masks, `rescore` building a fresh model with the initial state and the masks applied.

Both start from the same initial weights and prune the same tensors (every Linear and Conv weight, as Synaptic-Flow's
`masked_parameters` does). The model is built and copied outside the timed window. Variants alternate (and which
goes first), `--repeats` times each, one thread by default; the table shows median wall-clock seconds per 100 rounds,
reference/project (>= 1: the project is not slower) in wall-clock time (torch.utils.benchmark's Timer, one call per
repeat: a call is 100 rounds that change the masks, so it cannot be repeated in place) and in this thread's CPU time (less sensitive
to other processes on a shared machine), how many kept weights the two share (float32 with `<=` at the threshold
against float64 with exact counts: close, not equal), and the 1-minute load average before and after.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.benchmark import Timer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_measure import measurement, merged  # noqa: E402

from lottery import masks as M  # noqa: E402
from lottery import pruning  # noqa: E402
from lottery.config import Config  # noqa: E402
from lottery.models import build_model  # noqa: E402

MODELS = {"lenet_300_100": ((1, 28, 28), 10), "resnet20": ((3, 32, 32), 10)}
TARGET = 1.0  # reference / project: the project at least as fast


# --- the reference: Synaptic-Flow's code, on this project's modules --------------------------------------------------

class _MaskedLinear(nn.Linear):  # Layers/layers.py Linear (no bias mask: biases are not pruned)
    def forward(self, x):
        return F.linear(x, self.weight_mask * self.weight, self.bias)


class _MaskedConv2d(nn.Conv2d):  # Layers/layers.py Conv2d
    def forward(self, x):
        return self._conv_forward(x, self.weight_mask * self.weight, self.bias)


def masked_copy(model: nn.Module) -> tuple[nn.Module, list[tuple[torch.Tensor, nn.Parameter]]]:
    """A copy whose Linear and Conv2d layers carry a `weight_mask` buffer; its (mask, weight) pairs."""
    net = copy.deepcopy(model)
    pairs = []
    for mod in net.modules():
        if type(mod) in (nn.Linear, nn.Conv2d):
            mod.__class__ = _MaskedLinear if isinstance(mod, nn.Linear) else _MaskedConv2d
            mod.register_buffer("weight_mask", torch.ones_like(mod.weight))
            pairs.append((mod.weight_mask, mod.weight))
    return net, pairs


def reference_synflow(net: nn.Module, pairs, input_shape, density: float, rounds: int) -> None:
    """prune_loop(schedule='exponential', scope='global') with the SynFlow pruner; the masks are updated in place."""
    net.eval()
    x = torch.ones((1, *input_shape))
    for epoch in range(rounds):
        # SynFlow.score: linearize, forward and backward, |grad * theta|, nonlinearize
        with torch.no_grad():
            signs = {}
            for name, t in net.state_dict().items():
                signs[name] = torch.sign(t)
                t.abs_()
        torch.sum(net(x)).backward()
        scores = []
        for _, p in pairs:
            scores.append(torch.clone(p.grad * p).detach().abs_())
            p.grad.data.zero_()
        with torch.no_grad():
            for name, t in net.state_dict().items():
                t.mul_(signs[name])
        # Pruner._global_mask
        sparse = density ** ((epoch + 1) / rounds)
        global_scores = torch.cat([torch.flatten(s) for s in scores])
        k = int((1.0 - sparse) * global_scores.numel())
        if not k < 1:
            threshold, _ = torch.kthvalue(global_scores, k)
            zero, one = torch.tensor([0.0]), torch.tensor([1.0])
            for (mask, _), s in zip(pairs, scores):
                mask.copy_(torch.where(s <= threshold, zero, one))


# --- the project ------------------------------------------------------------------------------------------------------

def project_pcfg(rounds: int):
    pcfg = OmegaConf.structured(Config).pruning
    pcfg.criterion = {"name": "synflow"}
    pcfg.scope, pcfg.rounds, pcfg.exclude, pcfg.when = "global", rounds, [], "at_init"
    return pcfg


def project_synflow(name: str, state: dict, pcfg, density: float):
    """What lottery.experiment.plan.prune_level does for method=synflow with pruning.target=density, one_shot=true."""
    input_shape, classes = MODELS[name]

    def scoring_model(current):
        model = build_model(name, input_shape, classes)
        model.load_state_dict(state)
        M.apply(model, current)
        return model

    prunable = M.prunable_tensors(build_model(name, input_shape, classes), pcfg)
    masks = M.ones(build_model(name, input_shape, classes), prunable)
    model = scoring_model(masks)
    batches = itertools.repeat((torch.zeros(1, *input_shape), torch.zeros(1, dtype=torch.long)))

    def run():
        return pruning.prune(model, masks, prunable, pcfg, batches=batches, keep_fraction=density,
                             rescore=scoring_model, generator=torch.Generator().manual_seed(0))
    return run


# --- driver -----------------------------------------------------------------------------------------------------------

def _loadavg():
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def bench_model(name: str, density: float, rounds: int, repeats: int, log=print) -> dict:
    input_shape, classes = MODELS[name]
    torch.manual_seed(0)
    model = build_model(name, input_shape, classes)
    state = copy.deepcopy(model.state_dict())
    pcfg = project_pcfg(rounds)
    wall, cpu, kept = {"reference": [], "project": []}, {"reference": [], "project": []}, {}
    for rep in range(repeats):
        # alternating, and which goes first too: load drifts and the allocator's state hit both alike
        for variant in ("reference", "project")[::1 if rep % 2 == 0 else -1]:
            out: dict = {}
            if variant == "reference":  # the copy (and the project's models) made outside the timed call
                net, pairs = masked_copy(model)

                def run():
                    reference_synflow(net, pairs, input_shape, density, rounds)
                    out["masks"] = [m for m, _ in pairs]
            else:
                prune = project_synflow(name, state, pcfg, density)

                def run():
                    out["masks"] = list(prune().values())
            c0 = time.thread_time()  # this thread's CPU time of the same call, beside the library's wall clock
            m = Timer("run()", globals={"run": run}, label=f"SynFlow {name}", sub_label=variant,
                      description=f"{rounds} rounds", num_threads=torch.get_num_threads()).timeit(1)
            cpu[variant].append(measurement([time.thread_time() - c0], f"SynFlow {name} CPU", variant, "cpu"))
            wall[variant].append(m)
            kept[variant] = torch.cat([mask.flatten() != 0 for mask in out["masks"]])
            log(f"  {name} {variant} repeat {rep + 1}/{repeats}: {m.median:.3f} s "
                f"({cpu[variant][-1].median:.3f} s CPU)")
    walls = {v: merged(ms) for v, ms in wall.items()}
    cpus = {v: merged(ms) for v, ms in cpu.items()}
    med = {v: m.median for v, m in walls.items()}
    med_cpu = {v: m.median for v, m in cpus.items()}
    return {"model": name, "density": density, "rounds": rounds, "repeats": repeats,
            "seconds": {v: {"median": med[v], "per_100_rounds": med[v] * 100 / rounds, "runs": list(walls[v].times),
                            "cpu_median": med_cpu[v], "cpu_runs": list(cpus[v].times)} for v in wall},
            "ratio": med["reference"] / med["project"], "cpu_ratio": med_cpu["reference"] / med_cpu["project"],
            "kept": {"reference": int(kept["reference"].sum()), "project": int(kept["project"].sum()),
                     "both": int((kept["reference"] & kept["project"]).sum()), "of": len(kept["project"])}}


def run_bench(models=tuple(MODELS), density: float = 0.01, rounds: int = 100, repeats: int = 5, threads: int = 1,
              log=print) -> dict:
    if threads:
        torch.set_num_threads(threads)
    out = {"threads": torch.get_num_threads(), "torch": torch.__version__, "loadavg_start": _loadavg(),
           "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "models": {}}
    for name in models:
        out["models"][name] = bench_model(name, density, rounds, repeats, log)
    out["loadavg_end"] = _loadavg()
    out["targets"] = [{"what": f"{n} SynFlow reference/project", "value": r["ratio"], "target": TARGET,
                       "met": r["ratio"] >= TARGET} for n, r in out["models"].items()]
    out["table"] = format_table(out)
    return out


def format_table(out: dict) -> str:
    lines = [f"SynFlow, global, exponential schedule, {out['threads']} thread(s); 1-min load average "
             f"{out['loadavg_start']} -> {out['loadavg_end']}",
             f"{'model':<15}{'density':>8}{'rounds':>7}{'reference s/100r':>18}{'project s/100r':>16}"
             f"{'ref/project':>13}{'(CPU time)':>11}{'kept ref/proj/both':>22}"]
    for n, r in out["models"].items():
        s, k = r["seconds"], r["kept"]
        lines.append(f"{n:<15}{r['density']:>8.3g}{r['rounds']:>7}{s['reference']['per_100_rounds']:>18.3f}"
                     f"{s['project']['per_100_rounds']:>16.3f}{r['ratio']:>13.2f}{r['cpu_ratio']:>11.2f}"
                     f"{k['reference']:>10}/{k['project']}/{k['both']}")
    lines.append(f"target: ref/project >= {TARGET} on both models (wall-clock medians of {r['repeats']} alternating "
                 "repeats; CPU time: this thread's, less sensitive to other processes)")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--density", type=float, default=0.01, help="fraction of the pruned weights kept (default 0.01)")
    p.add_argument("--rounds", type=int, default=None, help="pruning rounds (default 100; quick 20)")
    p.add_argument("--repeats", type=int, default=None, help="alternating repeats per variant (default 5; quick 1)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--quick", action="store_true", help="a few rounds, one repeat: checks that it runs, not speed")
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        p.error(f"unknown model(s) {unknown}; accepted: {', '.join(MODELS)}")
    out = run_bench(models, args.density, args.rounds or (20 if args.quick else 100),
                    args.repeats or (1 if args.quick else 5), args.threads,
                    log=lambda m: print(m, file=sys.stderr, flush=True))
    print(out["table"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
