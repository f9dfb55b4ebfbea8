#!/usr/bin/env python3
"""Training and evaluation throughput: this project's loop against a plain PyTorch loop and a hand-written floor.

    python scripts/bench.py --data-root ../shared/data --out bench.json     # real MNIST / CIFAR-10
    python scripts/bench.py                                                 # synthetic data of the same shapes
    python scripts/bench.py --quick                                         # a few steps; what the test runs
    python scripts/bench.py --synflow                                       # SynFlow's 100 pruning rounds

Workloads: LeNet-300-100 on MNIST (batch 60, Adam 1.2e-3) and Conv-2 on CIFAR-10 (batch 60, Adam 2e-4, flip + crop
augmentation), every prunable weight masked to 20% density. Training variants, timed without any evaluation:

  project  `lottery.training.train` itself (the code every experiment runs), timed between two `at_step` hooks, so
           setup, warm-up steps and the start/end evaluations are outside the timed window;
  plain    the loop popular reimplementations write: a torchvision dataset with ToTensor/Normalize (and
           RandomCrop/RandomHorizontalFlip for CIFAR-10) transforms, a shuffling DataLoader, the same nn.Module, default
           torch.optim.Adam, `loss.item()` per step, masks multiplied in after each optimizer step;
  floor    a hand-written loop over batches already in memory as normalized tensors: forward, loss, zero_grad,
           backward, optimizer step (the optimizer the project builds); no masks, no augmentation, nothing else.

Evaluation: the project's `lottery.training.evaluate` on the validation and test splits against the plain loop's
DataLoader evaluation (batch 1000, no_grad, `.item()` per batch) of the same 15,000 samples.
Startup: a fresh interpreter, from `import lottery` through loading MNIST from disk to the first completed step.

Measurements are torch.utils.benchmark's (scripts/bench_measure.py): the plain and floor steps and both evaluations
through its Timer, the project's steps as the window between two of the loop's public `at_step` hooks, each made a
Measurement; variants run interleaved in one process, `--repeats` rounds, and merge into one Measurement each. The
table shows their medians and the ratios project/plain and project/floor, measured in the same run; Compare's table
(time per step, per evaluation) follows it. On a CUDA device the project also runs with bf16 autocast and
torch.compile, on and off, with the precision and determinism settings a run uses (lottery.core.device.configure:
fp32 is IEEE fp32, deterministic), and `check_no_syncs` counts the host-device syncs of the training loop over epoch
boundaries and a checkpoint.

Replicas (`--replicas 8`, or a list `--replicas 1,8,32,128`): aggregate training samples/s of R networks trained in one
batched loop (`lottery.training.train` with R networks, what `lottery-train replicas=R` runs) against the project's
single-run loop run R times one after another (each network its own init seed, data order and 20% random masks; the
single-run rate is measured on min(R, --single-models) of them, since R runs in sequence go at one run's rate).
Interleaved, medians of --repeats; the 1-minute load average is recorded before and after.

Busy machine (`--busy`, scripts/bench_busy.py): `lottery-train` on LeNet-300-100 alone, next to a competing CPU-bound
process, and two runs started together, each under PyTorch's threading default (what `threads: null` gave before),
lottery's default and threads=1, in fresh processes; the ratios of their times.

Tiny units (`--units`, scripts/bench_units.py): 16 levels x 3 units x 60 steps in one `lottery-train` run, per-unit
wall time (from its log) and where it goes (from lottery's torch.profiler spans: the steps' data, forward and backward,
optimizer step and masking, evaluation, everything else); `--units-base COMMIT` runs another commit the same way,
alternating, for before/after; `--units-busy` runs each next to the busy mode's competing process.

Quick mode (`--quick`) checks that everything runs, on a few steps of small data: its numbers are not speed
measurements, and no target is judged.

The loops are compared at one thread count (`--threads`, default every core) under the OpenMP wait policy of the
environment (none set: OpenMP's own), the same for every variant and for every commit `bench_compare.py` runs, so a
ratio measures the loop. lottery's own threading default (OMP_WAIT_POLICY=PASSIVE, one thread for small models) is
measured where it matters, by `--busy` (each variant a `lottery-train` process, as a user runs it). Measured on the
2-core machine with PASSIVE set here instead, LeNet-300-100 at two threads gave project/plain 2.05 against 3.40 under
OpenMP's own policy: the project's loop is many small operations, each paying a wake-up, where plain's is bound by its
DataLoader; a run does not train LeNet-300-100 that way (it gets one thread).

SynFlow (`--synflow`): 100 rounds of global SynFlow pruning of LeNet-300-100 and ResNet-20 to 1% density, the project's
`lottery.pruning.prune` against a Synaptic-Flow-style reference (their algorithm, float32, kthvalue threshold), on the
CPU, one thread unless --threads; alternating, medians of --repeats, ratio reference/project (scripts/bench_synflow.py).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.benchmark import Compare, Measurement, Timer
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms

from bench_measure import loadavg as _loadavg, measurement, merged, rate

from lottery import masks as M
from lottery.config import Config
from lottery.core.device import configure, resolve_device
from lottery.core.steps import Steps
from lottery.data import Batches, Split, load_pool, split
from lottery.data.sources import CIFAR10_STATS, MNIST_STATS, _unverified_cifar10
from lottery.models import build_model
from lottery.training import Hooks, Network, evaluate, make_optimizer, train

BATCH = 60
DENSITY = 0.2
WORKLOADS = {  # name: (model, dataset, Adam learning rate, augmentation)
    "lenet_mnist": ("lenet_300_100", "mnist", 1.2e-3, False),
    "conv2_cifar10": ("conv2", "cifar10", 2e-4, True),
}
# Targets of the speed issue, checked on the CPU (ratios are project / other).
TARGETS = {
    ("lenet_mnist", "train", "plain"): 3.0,
    ("lenet_mnist", "train", "floor"): 0.8,
    ("lenet_mnist", "eval", "plain"): 3.0,
    ("conv2_cifar10", "train", "plain"): 1.0,
}
STARTUP_TARGET_S = 5.0
# Replicas issue: batched / single-run loop x R, at R = 8 on the 2-core CPU.
REPLICA_TARGETS = {"lenet_mnist": 1.4, "conv2_cifar10": 1.0}


# --- data ----------------------------------------------------------------------------------------------------------

_STATS = {"mnist": MNIST_STATS, "cifar10": CIFAR10_STATS}


def load_split(dataset: str, root: str | None, val: int, augment: bool, device, sizes=None) -> Split:
    """The project's data for a workload: real `dataset` under `root`, or (root None) synthetic data of its shape with
    `sizes` = (training examples incl. validation, test examples); the validation split of seed 0."""
    if root is None:
        n_train, n_test = sizes
        node = {"name": "synthetic", "synthetic_shape": dataset, "synthetic_train": n_train, "synthetic_test": n_test}
    else:
        node = {"name": dataset, "root": root, "download": False, **({"verify": False} if dataset == "cifar10" else {})}
    node.update(val_size=val, augment=augment)
    return split(load_pool(node, device=device), val, 0)


def without_eval(sp: Split) -> Split:
    """`sp` with no validation examples and one test example: the evaluations train() makes at its start and end
    cost nothing (they are outside the timed windows anyway). The training rows and data order are `sp`'s."""
    return Split(replace(sp.pool, test_x=sp.pool.test_x[:1], test_y=sp.pool.test_y[:1]), sp.train_idx,
                 sp.val_idx[:0])


def train_steps(cfg, networks: list[Network], end: int, layout: str = "interleaved") -> list[dict]:
    """The project's training loop (lottery.training.train) from step 0 to `end`, durations resolved from `cfg`."""
    return train(networks, cfg, start=0, end=end, steps=Steps.resolve(cfg, networks[0].batches.steps_per_epoch),
                 layout=layout)


def adam_cfg(lr: float, batch_size: int, end: int):
    cfg = OmegaConf.structured(Config)
    cfg.optimizer = {"name": "adam", "lr": lr}
    cfg.train.batch_size, cfg.train.eval_every, cfg.train.progress = batch_size, f"{end}it", False
    return cfg

class _ImageArray(Dataset):
    """A torchvision-style dataset over uint8 arrays (synthetic runs): PIL image per sample, then the transform."""

    def __init__(self, images: np.ndarray, targets: list[int], transform):
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = self.images[i]
        img = Image.fromarray(img)  # uint8 HxW: mode "L", as torchvision's MNIST; HxWx3: RGB
        return self.transform(img), self.targets[i]


def _synthetic_images(shape, n: int, seed: int):
    g = np.random.default_rng(seed)
    c, h, w = shape
    images = g.integers(0, 256, size=(n, h, w) if c == 1 else (n, h, w, c), dtype=np.uint8)
    return images, [int(t) for t in g.integers(0, 10, size=n)]


def plain_datasets(dataset: str, root: str | None, augment: bool, val_idx, train_idx, sizes):
    """(train, val, test) torchvision datasets with the usual per-sample transforms."""
    normalize = transforms.Normalize(*_STATS[dataset])
    aug = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    train_tf = transforms.Compose([*aug, transforms.ToTensor(), normalize])
    eval_tf = transforms.Compose([transforms.ToTensor(), normalize])
    if root is None:
        shape = (1, 28, 28) if dataset == "mnist" else (3, 32, 32)
        n_train, n_test = sizes
        images, targets = _synthetic_images(shape, n_train, 1)
        test_images, test_targets = _synthetic_images(shape, n_test, 2)
        train_ds, val_ds = _ImageArray(images, targets, train_tf), _ImageArray(images, targets, eval_tf)
        test_ds = _ImageArray(test_images, test_targets, eval_tf)
    else:
        from torchvision.datasets import MNIST
        cls = MNIST if dataset == "mnist" else _unverified_cifar10()
        train_ds, val_ds = cls(root, train=True, transform=train_tf), cls(root, train=True, transform=eval_tf)
        test_ds = cls(root, train=False, transform=eval_tf)
    return Subset(train_ds, train_idx.tolist()), Subset(val_ds, val_idx.tolist()), test_ds


# --- model and masks -----------------------------------------------------------------------------------------------

def random_masks(model, density: float, seed: int) -> M.Masks:
    """Exactly `density` of every prunable weight kept, at random positions."""
    pcfg = SimpleNamespace(prune_biases=False, prune_batchnorm=False, exclude=[])
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    out = {}
    for p in M.prunable_tensors(model, pcfg):
        w = params[p.name]
        keep = torch.randperm(w.numel(), generator=g)[:round(density * w.numel())]
        m = torch.zeros(w.numel())
        m[keep] = 1
        out[p.name] = m.view_as(w).to(w.device)
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- training variants ---------------------------------------------------------------------------------------------
# Each returns a torch.utils.benchmark Measurement of `steps` training steps (times per step) after `warmup` untimed
# ones: a Timer where a step is a statement of the benchmark's own (plain, floor), else the window between two of the
# project loop's `at_step` hooks (one call of lottery.training.train is the whole loop).

def _stamper(device):
    """(stamps, stamp): stamp(k) is a hook that syncs `device` and records the time under k in stamps."""
    stamps = {}

    def stamp(k):
        def f():
            _sync(device)
            stamps[k] = time.perf_counter()
        return f
    return stamps, stamp


def _timer(stmt, device) -> Timer:
    """A Timer of `stmt()` at this process's thread count (Timer's own default is one thread); on a CUDA device the
    library's clock synchronizes at both ends of the timed window."""
    return Timer("stmt()", globals={"stmt": stmt}, num_threads=torch.get_num_threads())


def run_project(model, masks, data: Split, lr, device, warmup, steps, seed, precision="fp32",
                compile=False) -> Measurement:
    return measurement([project_seconds(model, masks, data, lr, device, warmup, steps, seed, precision, compile)],
                       "train", "project" + ("" if (precision, compile) == ("fp32", False) else
                                             f"_{precision}" + ("_compile" if compile else "")),
                       "per step", number_per_run=steps)


def project_seconds(model, masks, data: Split, lr, device, warmup, steps, seed, precision="fp32", compile=False):
    """Seconds of `steps` steps of lottery.training.train after `warmup` ones, between two of its at_step hooks."""
    end = warmup + steps
    cfg = adam_cfg(lr, BATCH, end)
    cfg.train.precision, cfg.train.compile = precision, compile
    # With one test sample and no validation ones, the two evaluations train() makes at its start and end cost
    # nothing; they are outside the timed window anyway, which runs from the hook after `warmup` steps to the one
    # after the last step.
    stamps, stamp = _stamper(device)
    hooks = Hooks(at_step={warmup: stamp(0), end: stamp(1)})
    train_steps(cfg, [Network(model, masks, Batches(without_eval(data), BATCH, seed), hooks)], end)
    return stamps[1] - stamps[0]


def check_no_syncs(model, masks, data: Split, lr, device, warmup=3, steps=20, epoch_steps=8, checkpoint_every=10,
                   batch_size=BATCH) -> dict:
    """CUDA only: count the host-device syncs the project's training loop makes between two evaluations.

    `torch.cuda.set_sync_debug_mode("warn")` is on from the hook after `warmup` steps to the one after the last
    step (no evaluation falls in between: those read their results and sync once each, by design). The training set
    is cut to `epoch_steps` batches, so the window crosses epoch boundaries (a new permutation and, with
    augmentation, that epoch's augmentation values are drawn on the CPU and copied to the device), and a checkpoint
    is written every `checkpoint_every` steps inside it. A checkpoint copies the state to the host, which is a sync
    by necessity: the mode is off from the hook after a checkpoint step until the checkpoint file is written (the
    state's copy to the host and the file), and on again for the steps after it. Everything else in the window, the
    epoch boundaries included, is counted in `syncs`."""
    import tempfile
    import warnings

    from lottery.core.files import Checkpoints
    end = warmup + steps
    cfg = adam_cfg(lr, batch_size, end)
    n = min(data.n_train, epoch_steps * batch_size)
    small = Split(data.pool, data.train_idx[:n], data.val_idx)  # the first n training rows
    spe = n // batch_size
    ckpt_steps = [k for k in range(warmup + 1, end) if checkpoint_every and k % checkpoint_every == 0]
    state = {"phase": "train"}

    def mode(m):
        torch.cuda.set_sync_debug_mode(m)

    def on():
        torch.cuda.synchronize(device)
        mode("warn")

    def before_checkpoint():
        mode("default")
        state["phase"] = "checkpoint"

    hooks = {warmup: on, end: lambda: mode("default")}
    hooks.update({k: before_checkpoint for k in ckpt_steps})
    caught_at = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = Checkpoints(Path(tmp))

        def checkpoint(s):
            ckpts.save(s)
            if state["phase"] == "checkpoint":  # back on for the steps after it
                state["phase"] = "train"
                mode("warn")

        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train_steps(cfg, [Network(model, masks, Batches(small, batch_size, 0),
                                          Hooks(at_step=hooks, checkpoint=checkpoint,
                                                checkpoint_every=checkpoint_every))], end)
                caught_at = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
        finally:
            mode("default")
    epochs = [k for k in range(warmup + 1, end) if k % spe == 0]
    return {"steps": steps, "window": [warmup, end], "epoch_boundaries": epochs, "checkpoints": ckpt_steps,
            "syncs": len(caught_at), "first": caught_at[0][:300] if caught_at else None}


def _forever(loader):
    while True:
        yield from loader


def run_plain(model, masks, loader, lr, device, warmup, steps, seed) -> Measurement:
    torch.manual_seed(seed)  # the DataLoader's shuffle and the transforms draw from the global RNG
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    params = dict(model.named_parameters())
    masked = [(params[n], m) for n, m in masks.items()]
    with torch.no_grad():
        for p, m in masked:
            p.mul_(m)
    model.train()
    batches = _forever(loader)
    running = [0.0]

    def step():
        x, y = next(batches)
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for p, m in masked:
                p.mul_(m)
        running[0] += loss.item()
    for _ in range(warmup):
        step()
    return _timer(step, device).timeit(steps)


def run_floor(model, batches, lr, device, warmup, steps, seed) -> Measurement:
    # the project's optimizer construction (Adam, foreach), so the ratio measures the loop, not the optimizer
    optimizer = make_optimizer(model.parameters(), OmegaConf.create({"name": "adam", "lr": lr, "betas": [0.9, 0.999],
                                                                     "weight_decay": 0.0}), device)
    model.train()
    i = [0]

    def step():
        x, y = batches[i[0] % len(batches)]
        i[0] += 1
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for _ in range(warmup):
        step()
    return _timer(step, device).timeit(steps)


def batched_seconds(models, masks_list, split_: Split, lr, device, warmup, steps, seeds, layout):
    """Seconds for `steps` batched steps of all `models` (`layout`: lottery.training.LAYOUTS) after `warmup` untimed
    ones."""
    end = warmup + steps
    cfg = adam_cfg(lr, BATCH, end)
    stamps, stamp = _stamper(device)
    networks = [Network(m, mk, Batches(split_, BATCH, s), Hooks()) for m, mk, s in zip(models, masks_list, seeds)]
    networks[0].hooks = Hooks(at_step={warmup: stamp(0), end: stamp(1)})
    train_steps(cfg, networks, end, layout)
    return stamps[1] - stamps[0]


def bench_replicas(name, args, device, log) -> dict:
    """Batched replicas against the single-run loop run R times (see the module docstring)."""
    from lottery.init import initialize
    from lottery.training import choose
    model_name, dataset, lr, augment = WORKLOADS[name]
    if args.data_root is None:
        n_train, n_test, val = args.synthetic_sizes[dataset]
        sp = load_split(dataset, None, val, augment, device, (n_train, n_test))
    else:
        sp = load_split(dataset, args.data_root, 5000, augment, device)
    # no evaluation inside the timed windows: an empty validation split and one test example
    data = without_eval(sp)
    pool = data.pool
    steps, warmup = args.replica_steps[name], args.warmup
    if args.layout:
        how = args.layout
    else:  # what replica_batching=auto picks on this device
        how = choose("auto", build_model(model_name, pool.input_shape, pool.num_classes), device)
    out = {"model": model_name, "dataset": dataset, "lr": lr, "augment": augment, "steps": steps, "warmup": warmup,
           "layout": how, "by_replicas": {}}
    for r_count in args.replicas:
        models, masks_list = [], []
        for seed in range(r_count):
            m = build_model(model_name, pool.input_shape, pool.num_classes)
            initialize(m, OmegaConf.create({"name": "xavier_normal"}), seed)
            m = m.to(device)
            mk = random_masks(m, DENSITY, seed)
            M.apply(m, mk)
            models.append(m)
            masks_list.append(mk)
        n_single = min(r_count, args.single_models)
        b_steps = steps["batched"]
        times = {"single": [], "batched": []}
        loads = [_loadavg()]
        for rep in range(args.repeats):
            order = ["single", "batched"] if rep % 2 == 0 else ["batched", "single"]
            for k in order:
                if k == "single":
                    times[k].append(sum(project_seconds(copy.deepcopy(models[i]), masks_list[i], data, lr, device,
                                                        warmup, steps["single"], i) for i in range(n_single)))
                else:
                    times[k].append(batched_seconds([copy.deepcopy(m) for m in models], masks_list, data, lr, device,
                                                    warmup, b_steps, list(range(r_count)), how))
            loads.append(_loadavg())
            log(f"  {name} R={r_count} ({how}) repeat {rep + 1}/{args.repeats}: single x{r_count} "
                f"{n_single * steps['single'] * BATCH / times['single'][-1]:,.0f}/s, batched "
                f"{r_count * b_steps * BATCH / times['batched'][-1]:,.0f}/s  (load {loads[-1]})")
        single = rate(measurement(times["single"], f"{name} R={r_count}", "single", "per round"),
                      n_single * steps["single"] * BATCH)
        batched = rate(measurement(times["batched"], f"{name} R={r_count}", "batched", "per round"),
                       r_count * b_steps * BATCH)
        out["by_replicas"][str(r_count)] = {
            "single": single, "batched": batched, "ratio": batched["samples_per_s"] / single["samples_per_s"],
            "single_models_timed": n_single, "loadavg": loads,
            "ratios": [r_count * b_steps / tb / (n_single * steps["single"] / ts)
                       for tb, ts in zip(times["batched"], times["single"])]}
    return out


def format_replicas(results: dict) -> str:
    lines = [f"# {results['date']}  {results['machine']}  torch {results['torch']}  device {results['device']}"
             f"  threads {results['threads']}  data {results['data']}  repeats {results['repeats']}"
             f"  load at start {results['loadavg_start']}", *([QUICK_NOTE] if results.get("quick") else []), "",
             f"{'workload':<15} {'layout':<12} {'R':>4} {'single x R /s':>14} {'batched /s':>12} {'batched/single':>15}"
             f" {'per-repeat ratios':>22}"]
    for wl, res in results["replicas"].items():
        for r, v in res["by_replicas"].items():
            lines.append(f"{wl:<15} {res['layout']:<12} {r:>4} {v['single']['samples_per_s']:>14,.0f}"
                         f" {v['batched']['samples_per_s']:>12,.0f}"
                         f" {v['ratio']:>14.2f}x  {', '.join(f'{x:.2f}' for x in v['ratios'])}")
    for c in results["targets"]:
        lines.append(f"target {c['what']:<38} {c['value']:>7.2f} (target >= {c['target']}): {_state(c)}")
    return "\n".join(lines)


# --- evaluation variants ---------------------------------------------------------------------------------------------

def eval_project(model, data: Split, device, precision="fp32") -> Measurement:
    # (the validation examples are gathered once, when a run starts: bench_workload has done it before any timing)
    def run():
        evaluate(model, *data.val(), 10000, precision)
        evaluate(model, *data.test(), 10000, precision)
    return _timer(run, device).timeit(1)


def eval_plain(model, loaders, device) -> Measurement:
    def run():
        model.eval()
        with torch.no_grad():
            for loader in loaders:
                loss, correct = 0.0, 0
                for x, y in loader:
                    x, y = x.to(device), y.to(device)
                    out = model(x)
                    loss += F.cross_entropy(out, y, reduction="sum").item()
                    correct += (out.argmax(1) == y).sum().item()
        model.train()
    return _timer(run, device).timeit(1)


# --- startup ---------------------------------------------------------------------------------------------------------

STARTUP_CODE = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from omegaconf import OmegaConf
from lottery.config import Config
from lottery.core.device import resolve_device
from lottery.core.steps import Steps
from lottery.data import Batches, load_pool, split
from lottery.init import initialize
from lottery.models import build_model
from lottery.training import Hooks, Network, train
t_import = time.perf_counter()
root, device, n_synthetic = sys.argv[1], resolve_device(sys.argv[2]), int(sys.argv[3])
cfg = OmegaConf.structured(Config)
cfg.train.progress = False
cfg.optimizer = {"name": "adam", "lr": 1.2e-3}
if root:
    node = {"name": "mnist", "root": root, "download": False, "val_size": 5000}
else:
    node = {"name": "synthetic", "synthetic_train": n_synthetic, "synthetic_test": n_synthetic // 6,
            "val_size": n_synthetic // 12}
data = split(load_pool(node, device=device), node["val_size"], 0)
t_data = time.perf_counter()
model = build_model("lenet_300_100", data.pool.input_shape, data.pool.num_classes)
initialize(model, OmegaConf.create({"name": "xavier_normal"}), 0)
model.to(device)
masks = {n: torch.ones_like(p) for n, p in model.named_parameters() if n.endswith("weight")}
stamp = {}
def first():
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the benchmarked GPU, not the current one
    stamp["t"] = time.perf_counter()
batches = Batches(data, cfg.train.batch_size, 0)
train([Network(model, masks, batches, Hooks(at_step={1: first}))], cfg, start=0, end=1,
      steps=Steps.resolve(cfg, batches.steps_per_epoch))
print(json.dumps({"import_s": t_import - t0, "data_s": t_data - t_import, "first_step_s": stamp["t"] - t_data,
                  "total_s": stamp["t"] - t0}))
"""


def measure_startup(root: str | None, device: str, n_synthetic: int = 60000) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", STARTUP_CODE, root or "", device, str(n_synthetic)],
                         capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"startup measurement failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "process_wall_s": wall}


# --- driver ----------------------------------------------------------------------------------------------------------

def _wait_policy() -> str:
    """How this process's OpenMP threads wait: the variable lottery's default set, or the environment's."""
    from lottery.core.threads import WAIT_VARIABLES
    given = [f"{v}={os.environ[v]}" for v in WAIT_VARIABLES if v in os.environ]
    return ", ".join(given) if given else "OpenMP's own"


def bench_workload(name, args, device, log):
    model_name, dataset, lr, augment = WORKLOADS[name]
    steps, warmup = args.steps[name], args.warmup
    synthetic = args.data_root is None
    if synthetic:
        n_train, n_test, val = args.synthetic_sizes[dataset]
        data = load_split(dataset, None, val, augment, device, (n_train, n_test))
    else:
        data = load_split(dataset, args.data_root, 5000, augment, device)
        n_train, n_test, val = len(data.pool.y), len(data.pool.test_y), 5000
    data.val()  # gathered once, as a run does before its first evaluation
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(0))  # the split lottery.data.split makes
    train_ds, val_ds, test_ds = plain_datasets(dataset, args.data_root, augment, perm[:val], perm[val:],
                                               (n_train, n_test))
    loader = DataLoader(train_ds, batch_size=BATCH, shuffle=True, num_workers=args.workers, drop_last=True,
                        persistent_workers=args.workers > 0)
    eval_loaders = [DataLoader(d, batch_size=1000, num_workers=args.workers) for d in (val_ds, test_ds)]

    base = build_model(model_name, data.pool.input_shape, data.pool.num_classes).to(device)
    masks = random_masks(base, DENSITY, seed=0)
    M.apply(base, masks)
    g = torch.Generator(device=device).manual_seed(0)
    floor_batches = []
    for _ in range(min(100, warmup + max(steps.values()))):
        idx = torch.randint(0, data.n_train, (BATCH,), generator=g, device=device)
        floor_batches.append(data.train_rows(idx))

    train_variants = {
        "project": lambda m, r: run_project(m, masks, data, lr, device, warmup, steps["project"], r),
        "plain": lambda m, r: run_plain(m, masks, loader, lr, device, warmup, steps["plain"], r),
        "floor": lambda m, r: run_floor(m, floor_batches, lr, device, warmup, steps["floor"], r),
    }
    if device.type == "cuda":
        for prec in ("fp32", "bf16"):
            for comp in (False, True):
                if (prec, comp) != ("fp32", False):
                    key = f"project_{prec}" + ("_compile" if comp else "")
                    steps[key] = steps["project"]
                    train_variants[key] = (lambda p, c: lambda m, r: run_project(
                        m, masks, data, lr, device, warmup, steps["project"], r, precision=p, compile=c))(prec, comp)
    eval_variants = {"project": lambda m: eval_project(m, data, device),
                     "plain": lambda m: eval_plain(m, eval_loaders, device)}
    if device.type == "cuda":
        eval_variants["project_bf16"] = lambda m: eval_project(m, data, device, "bf16")
    eval_samples = len(data.val_idx) + len(data.pool.test_y)
    eval_repeats = min(args.repeats, args.eval_repeats[name])

    def samples(kind):  # per run of a Measurement: a training step, an evaluation of both splits
        return BATCH if kind == "train" else eval_samples

    def labelled(m: Measurement, kind: str, k: str) -> Measurement:
        return measurement(m.times, f"{name} {kind}", k, "per step" if kind == "train" else "per evaluation")

    times = {("train", k): [] for k in train_variants} | {("eval", k): [] for k in eval_variants}
    for r in range(args.repeats):
        # interleaved, and the order rotates each repeat, so slow drifts in machine load hit every variant alike
        order = list(train_variants)
        order = order[r % len(order):] + order[:r % len(order)]
        for k in order:
            times[("train", k)].append(labelled(train_variants[k](copy.deepcopy(base), r), "train", k))
        if r < eval_repeats:
            order = list(eval_variants)
            order = order[r % len(order):] + order[:r % len(order)]
            for k in order:
                times[("eval", k)].append(labelled(eval_variants[k](base), "eval", k))
        log(f"  {name} repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{kind} {k} {samples(kind) / t[-1].median:,.0f}/s" for (kind, k), t in times.items()
            if len(t) == r + 1))
    out = {"model": model_name, "dataset": dataset, "lr": lr, "augment": augment, "steps": steps, "warmup": warmup,
           "eval_samples": eval_samples, "train": {}, "eval": {}}
    if device.type == "cuda":  # the loop must not wait for the GPU between evaluations
        out["sync_check"] = check_no_syncs(copy.deepcopy(base), masks, data, lr, device)
        c = out["sync_check"]
        log(f"  {name} host syncs in {c['steps']} project steps (epoch boundaries after steps "
            f"{c['epoch_boundaries']}, checkpoints after {c['checkpoints']}, not counting the checkpoints' own "
            f"copies to the host): {c['syncs']}")
    out["measurements"] = []  # for Compare's table (not written to the JSON file)
    for (kind, k), t in times.items():
        m = merged(t)
        out["measurements"].append(m)
        out[kind][k] = rate(m, samples(kind))
    for kind in ("train", "eval"):
        res = out[kind]
        out[kind + "_ratios"] = {f"project/{o}": res["project"]["samples_per_s"] / res[o]["samples_per_s"]
                                 for o in res if not o.startswith("project")}
    return out


def check_targets(results: dict, device) -> list[dict]:
    checks = []
    for (wl, kind, other), target in TARGETS.items():
        if wl in results["workloads"]:
            ratio = results["workloads"][wl][f"{kind}_ratios"][f"project/{other}"]
            checks.append({"what": f"{wl} {kind} project/{other}", "value": ratio, "target": target,
                           "met": ratio >= target})
    if "startup" in results:
        s = results["startup"]["total_s"]
        checks.append({"what": "startup import..first step (s)", "value": s, "target": STARTUP_TARGET_S,
                       "met": s < STARTUP_TARGET_S})
    if results.get("quick"):
        for c in checks:  # a few steps on small data: it runs, but it measures no speed
            c["applies"], c["why_not"] = False, "quick mode: not a speed measurement"
    elif device.type != "cpu" or results["data"] == "synthetic":
        for c in checks:  # the targets are stated for the 2-core CPU on the real data
            c["applies"], c["why_not"] = False, "n/a here"
    return checks


QUICK_NOTE = ("quick mode: a few steps on small data, to check that everything runs; the numbers below are not speed "
              "measurements and no target is judged")


def _state(c: dict) -> str:
    return ("met" if c["met"] else "MISSED") if c.get("applies", True) else c.get("why_not", "n/a here")


def format_table(results: dict) -> str:
    lines = [f"# {results['date']}  {results['machine']}  torch {results['torch']}  device {results['device']}"
             f"  threads {results['threads']} ({results.get('wait_policy')})  data {results['data']}"
             f"  repeats {results['repeats']}", *([QUICK_NOTE] if results.get("quick") else []), "",
             f"{'workload':<15} {'kind':<6} {'variant':<22} {'samples/s':>12} {'min':>11} {'max':>11}"
             f" {'project/this':>13}"]
    for wl, res in results["workloads"].items():
        for kind in ("train", "eval"):
            proj = res[kind]["project"]["samples_per_s"]
            for k, v in res[kind].items():
                lines.append(f"{wl:<15} {kind:<6} {k:<22} {v['samples_per_s']:>12,.0f} {v['min']:>11,.0f}"
                             f" {v['max']:>11,.0f} {proj / v['samples_per_s']:>12.2f}x")
    for wl, res in results["workloads"].items():
        if "sync_check" in res:
            c = res["sync_check"]
            lines.append(f"{wl}: host-device syncs in {c['steps']} project training steps crossing epoch boundaries "
                         f"after steps {c['epoch_boundaries']} and checkpoints after {c['checkpoints']} (their own "
                         f"copies to the host excluded): {c['syncs']}"
                         + (f" (first: {c['first']})" if c["first"] else ""))
    if "startup" in results:
        s = results["startup"]
        what = "MNIST from disk" if results["data"] != "synthetic" else "synthetic MNIST-shaped data"
        lines += ["", f"startup (fresh interpreter, {what}): import {s['import_s']:.2f}s + data "
                      f"{s['data_s']:.2f}s + first step {s['first_step_s']:.2f}s = {s['total_s']:.2f}s "
                      f"(process wall {s['process_wall_s']:.2f}s)"]
    lines.append("")
    load = results["loadavg_start"]  # (the benchmark's own threads raise the load once it runs)
    if load and load[0] > 0.5 * os.cpu_count() and results["device"] == "cpu":
        lines += [f"warning: the machine was busy at the start (1-minute load average {load[0]} on {os.cpu_count()} "
                  "cores): other processes share the cores, and torch's intra-op threads slow down badly then", ""]
    for c in results["targets"]:
        lines.append(f"target {c['what']:<38} {c['value']:>7.2f} (target {'<' if 'startup' in c['what'] else '>='}"
                     f" {c['target']}): {_state(c)}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=None, help="folder with MNIST/raw and cifar-10-batches-py (default: "
                                                     "synthetic data of the same shapes)")
    p.add_argument("--out", default="bench.json", help="JSON results file (default: bench.json)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda[:N]")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved repeats per variant (default 5; --busy and --units 3; quick 1)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    p.add_argument("--lenet-steps", type=int, default=None,
                   help="timed steps for LeNet, project and floor (default 1000; the plain loop a quarter; quick 4)")
    p.add_argument("--conv2-steps", type=int, default=None, help="timed steps for Conv-2 (default 20 on a CPU, "
                                                                 "500 on a GPU; quick 2)")
    p.add_argument("--eval-repeats", type=int, default=None,
                   help="evaluation repeats (default: --repeats, but 3 for Conv-2 on a CPU: ~20 s each)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before each timing (default 10; quick 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for every variant (default: PyTorch's, every core)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the plain loop (default 0)")
    p.add_argument("--no-startup", action="store_true", help="skip the startup measurement")
    p.add_argument("--quick", action="store_true", help="a few steps on small data: checks that it runs, not speed")
    p.add_argument("--replicas", default=None,
                   help="replicas mode: R or a list R1,R2,... batched networks against the single-run loop run R "
                        "times (the other benchmarks are skipped)")
    p.add_argument("--layout", default=None, choices=["stacked", "interleaved"],
                   help="replicas mode: how the batched networks train (lottery.training.LAYOUTS; default: what "
                        "replica_batching=auto picks on the device)")
    p.add_argument("--single-models", type=int, default=8,
                   help="replicas mode: how many of the R single runs are timed (default 8)")
    p.add_argument("--busy", action="store_true",
                   help="busy-machine mode: lottery-train next to a competing process and two runs together, under "
                        "PyTorch's threading default, lottery's and threads=1 (scripts/bench_busy.py)")
    p.add_argument("--busy-steps", type=int, default=None, help="busy mode: training steps per run (default 1000; "
                                                                 "quick 5)")
    p.add_argument("--busy-scenarios", default="quiet,competitor,pair",
                   help="busy mode: comma-separated, of quiet, competitor, pair")
    p.add_argument("--units", action="store_true",
                   help="tiny-units mode: 16 levels x 3 units x 60 steps, time per unit and where it goes (lottery's "
                        "torch.profiler spans) "
                        "(scripts/bench_units.py)")
    p.add_argument("--units-base", default=None, help="tiny-units mode: also run this commit, alternating")
    p.add_argument("--units-threads", default="default",
                   help="tiny-units mode: comma-separated thread settings, `default` (nothing set) or a count")
    p.add_argument("--units-busy", action="store_true",
                   help="tiny-units mode: each run next to a competing CPU-bound process (as --busy's competitor)")
    p.add_argument("--synflow", action="store_true",
                   help="SynFlow mode: 100-round SynFlow pruning against a Synaptic-Flow-style reference on the CPU, "
                        "one thread unless --threads (scripts/bench_synflow.py; the other benchmarks are skipped)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    configure(device, "fp32", deterministic=True)  # what a run does (bf16 variants add autocast on top)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = device.type == "cpu"
    q = args.quick
    asked_repeats = args.repeats
    args.repeats = args.repeats or (1 if q else 5)
    args.warmup = args.warmup if args.warmup is not None else (2 if q else 10)
    lenet = args.lenet_steps or (4 if q else 1000)
    conv2 = args.conv2_steps or (2 if q else 20 if cpu else 500)
    # the plain LeNet loop is ~5x slower: a quarter of the steps keeps its share of the run's time reasonable
    # (on a GPU the plain Conv-2 loop is bound by its PIL transforms too: a fifth of the steps)
    args.steps = {"lenet_mnist": {"project": lenet, "floor": lenet, "plain": max(1, lenet // 4)},
                  "conv2_cifar10": {"project": conv2, "floor": conv2, "plain": conv2 if cpu else max(1, conv2 // 5)}}
    args.eval_repeats = {"lenet_mnist": args.eval_repeats or args.repeats,
                         "conv2_cifar10": args.eval_repeats or (min(3, args.repeats) if cpu else args.repeats)}
    # synthetic (train incl. validation, test, validation) sizes; the real ones when not quick
    args.synthetic_sizes = ({"mnist": (600, 200, 100), "cifar10": (600, 200, 100)} if q else
                            {"mnist": (60000, 10000, 5000), "cifar10": (50000, 10000, 5000)})
    # replicas mode: batched steps and single-run steps per timing (a single run is timed on this many steps each)
    lenet_r = args.lenet_steps or (3 if q else 200)
    conv2_r = args.conv2_steps or (2 if q else 10 if cpu else 200)
    args.replica_steps = {"lenet_mnist": {"single": lenet_r, "batched": lenet_r},
                          "conv2_cifar10": {"single": conv2_r, "batched": conv2_r}}
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        p.error(f"unknown workload(s) {unknown}; accepted: {', '.join(WORKLOADS)}")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    results = {"date": datetime.date.today().isoformat(),
               "machine": f"{os.cpu_count()}-core {platform.machine()} CPU" + (f", {gpu}" if gpu else ""),
               "processor": platform.processor(), "torch": torch.__version__, "python": platform.python_version(),
               "device": str(device), "threads": torch.get_num_threads(),
               "data": "synthetic" if args.data_root is None else os.path.abspath(args.data_root),
               "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
               "quick": q, "repeats": args.repeats, "batch_size": BATCH, "density": DENSITY,
               "plain_workers": args.workers, "loadavg_start": _loadavg(), "workloads": {},
               "wait_policy": _wait_policy()}
    if args.busy or args.units:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        args.repeats = asked_repeats or (1 if q else 3)
        if args.busy:
            from bench_busy import run_busy
            log(f"busy machine: {args.busy_scenarios}")
            results["busy"] = run_busy(args, log)
        if args.units:
            from bench_units import run_units
            log("tiny units")
            results["units"] = run_units(args, log)
        results["loadavg_end"] = _loadavg()
        results["table"] = "\n\n".join([*([QUICK_NOTE] if q else []),
                                        *(results[k]["table"] for k in ("busy", "units") if k in results)])
        print(results["table"])
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
            log(f"wrote {args.out}")
        return results
    if args.synflow:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_synflow import run_bench
        results["synflow"] = run_bench(rounds=20 if q else 100, repeats=args.repeats, threads=args.threads or 1,
                                       log=log)
        results["threads"], results["table"] = results["synflow"]["threads"], results["synflow"]["table"]
        if q:
            results["table"] = QUICK_NOTE + "\n" + results["table"]
            for c in results["synflow"]["targets"]:
                c["applies"], c["why_not"] = False, "quick mode: not a speed measurement"
        print(results["table"])
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
            log(f"wrote {args.out}")
        return results
    if args.replicas is not None:
        try:
            args.replicas = [int(r) for r in str(args.replicas).split(",")]
        except ValueError:
            p.error(f"--replicas takes a count or a comma-separated list of counts, got {args.replicas!r}")
        results["replicas"] = {}
        for wl in workloads:
            log(f"{wl}: replicas {args.replicas}")
            results["replicas"][wl] = bench_replicas(wl, args, device, log)
        results["loadavg_end"] = _loadavg()
        results["targets"] = [
            {"what": f"{wl} R=8 batched/single", "value": res["by_replicas"]["8"]["ratio"],
             "target": REPLICA_TARGETS[wl], "met": res["by_replicas"]["8"]["ratio"] >= REPLICA_TARGETS[wl],
             "applies": device.type == "cpu" and results["data"] != "synthetic" and not q,
             "why_not": "quick mode: not a speed measurement" if q else "n/a here"}
            for wl, res in results["replicas"].items() if "8" in res["by_replicas"]]
        results["table"] = format_replicas(results)
        print(results["table"])
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
            log(f"wrote {args.out}")
        return results
    measured = []
    for wl in workloads:
        log(f"{wl}: loading data and warming up")
        results["workloads"][wl] = bench_workload(wl, args, device, log)
        measured += results["workloads"][wl].pop("measurements")
    if not args.no_startup:
        log("startup: fresh interpreter")
        runs = [measure_startup(args.data_root, args.device, 1200 if q else 60000) for _ in range(1 if q else 3)]
        results["startup"] = {k: measurement([r[k] for r in runs], "startup", k, "seconds").median
                              for k in runs[0]} | {"runs": runs}
    results["loadavg_end"] = _loadavg()
    results["targets"] = check_targets(results, device)
    table = format_table(results)
    results["table"] = table
    print(table)
    compare = Compare(measured)  # torch.utils.benchmark's table: medians per step and per evaluation
    compare.trim_significant_figures()
    print("\n" + str(compare))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        log(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
