#!/usr/bin/env python3
"""One-off GPU acceptance check (issue 15): does a GPU run keep the promises of docs/gpus.md? Prints a PASS/FAIL table.

    python scripts/gpu_check.py --data-root ../shared/data          # on a machine with a GPU: about 2-5 minutes
    python scripts/gpu_check.py                                     # synthetic data of MNIST / CIFAR-10 shapes
    python scripts/gpu_check.py --device cpu                        # dry run of the CPU-runnable checks

Checks (each row of the table; exit status 1 if any FAILs):
  device            the device resolved for `auto` and what is recorded (GPU name, capability, torch, CUDA, cuDNN)
  bad_device        `lottery-train device=cuda:<N>` with N = the number of GPUs: exit 2 and one `error:` line that
                    names the GPUs there are, before any work
  batches_cpu       the batch indices and augmentation of a seed, with the data on the device, equal the CPU's
                    (over three epochs, with and without augmentation)
  fp32_conv         with train.precision=fp32, cuDNN convolutions (forward, and the weight and input gradients) and a
                    cuBLAS matmul are within 3e-5 (relative RMS error) of a float64 reference; TF32 shows ~3e-4.
                    The
                    `tf32` row shows the error with train.precision=tf32 for comparison (large on Ampere and newer)
  fused_optimizer   the optimizer built for the device is fused (CUDA) / foreach (CPU)
  eval_chunks       `evaluate` (chunks of eval_chunk(): EVAL_CHUNK, Conv-2 on a CPU CPU_CONV_EVAL_CHUNK) against one
                    unchunked forward of 2.5 chunks: same accuracy, loss within 1e-6 (relative)
  <model>_repeat    a short IMP run (2 levels, a control) twice with one seed through the CLI: summary.json and the
                    trained weights identical
  <model>_resume    the same run SIGKILLed inside level 1 and started again: summary.json identical to the uninterrupted
                    run, and the device recorded in every record and in the checkpoint
  <model>_no_sync   (CUDA) no host-device sync in the training loop between evaluations, over several epoch boundaries
                    and two checkpoints (their own copies to the host excepted): scripts/bench.py check_no_syncs
  bf16              (CUDA) a short bf16 Conv-2 run ends with exit 0; pre-Ampere GPUs get a warning at start
  compile           (CUDA) a short train.compile=true Conv-2 run trains with fp32 set through the new API
  semi_structured   (CUDA) lottery-export's 2:4 variant: Conv-2 with 2:4 masks on its Linear layers, converted with
                    torch.sparse.to_sparse_semi_structured (fp16) where the shape is accepted; outputs within 1e-2
                    (relative) of the fp16 masked network, and both timed at batch 256 (median, torch.utils.benchmark)
models: LeNet-300-100 on MNIST, Conv-2 on CIFAR-10 with augmentation (real data with --data-root, else synthetic).
Writes --out (default gpu_check.json) with every measured value.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lottery.data import Batches, Pool, Split  # noqa: E402
from lottery.core.device import configure, device_info, resolve_device  # noqa: E402

ROWS: list[dict] = []
_CLOCK = [time.perf_counter()]


def row(name: str, status: str, detail: str, **values) -> None:
    now = time.perf_counter()
    ROWS.append({"check": name, "status": status, "detail": detail, "seconds": round(now - _CLOCK[0], 2), **values})
    _CLOCK[0] = now
    print(f"  {status:<5} {name:<18} {detail}", file=sys.stderr, flush=True)


def check(name):
    """Run one check; an exception is a FAIL with its last line, not the end of the script. `name` may hold {0}:
    the check's first argument (the model)."""
    def wrap(fn):
        def run(*a, **kw):
            _CLOCK[0] = time.perf_counter()
            try:
                fn(*a, **kw)
            except Exception as e:  # noqa: BLE001
                row(name.format(*a), "FAIL", f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}",
                    traceback=traceback.format_exc()[-3000:])
        return run
    return wrap


def cli(*args: str, cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    extra = dict(env or {})  # its PYTHONPATH goes after the repository's
    paths = [str(REPO), *([extra.pop("PYTHONPATH")] if extra.get("PYTHONPATH") else []),
             os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra, "PYTHONPATH": os.pathsep.join(paths)}
    code = "import sys; sys.argv[0] = 'lottery-train'; from lottery.cli import train; train()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def fault(**spec) -> tuple[list[str], dict]:
    """(arguments, environment) of a run that hits a fault once: the test suite's fault injection (tests/plugins/
    faults.py, a callback loaded with imports=[faults]), e.g. fault(kill_at=30, level=1, branch="ticket")."""
    return ["imports=[faults]"], {"PYTHONPATH": str(REPO / "tests" / "plugins"),
                                  "LOTTERY_FAULT": ",".join(f"{k}={v}" for k, v in spec.items())}


# --- checks ----------------------------------------------------------------------------------------------------------

@check("device")
def check_device(device):
    info = device_info(device)
    row("device", "INFO", ", ".join(f"{k}={v}" for k, v in info.items() if v is not None), info=info)


@check("bad_device")
def check_bad_device(tmp: Path):
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    t0 = time.perf_counter()
    r = cli("dataset=synthetic", f"device=cuda:{n}", f"hydra.run.dir={tmp / 'bad_device'}", cwd=tmp)
    seconds = time.perf_counter() - t0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    names_gpus = all(torch.cuda.get_device_name(i) in errors[0] for i in range(n)) if errors and n else bool(errors)
    ok = r.returncode == 2 and len(errors) == 1 and names_gpus and "Traceback" not in r.stderr
    no_work = not (tmp / "bad_device" / "levels").exists()
    row("bad_device", "PASS" if ok and no_work else "FAIL",
        f"device=cuda:{n}: exit {r.returncode} in {seconds:.1f}s, {errors[0] if errors else r.stderr[-300:]!r}",
        stderr=r.stderr[-2000:])


def _indexed(n, shape, augment, device) -> Split:
    """n images whose label is their index, all of them training rows (in pool order), the first 10 as test set."""
    g = torch.Generator().manual_seed(123)
    x = torch.rand(n, *shape, generator=g) + 0.5
    y = torch.arange(n)
    pool = Pool(x.to(device), y.to(device), x[:10].to(device), y[:10].to(device), num_classes=n, input_shape=shape,
                augment=augment)
    return Split(pool, train_idx=torch.arange(n).to(device), val_idx=torch.arange(0).to(device))


@check("batches_cpu")
def check_batches(device):
    details = []
    ok = True
    for augment in (False, True):
        n, bs = 1000, 60
        ref = Batches(_indexed(n, (3, 32, 32), augment, "cpu"), bs, seed=11)
        dev = Batches(_indexed(n, (3, 32, 32), augment, device), bs, seed=11)
        steps = list(range(3 * ref.steps_per_epoch)) + [12345]
        same_idx = all(torch.equal(ref.get(t)[1], dev.get(t)[1].cpu()) for t in steps)
        same_x = all(torch.equal(ref.get(t)[0], dev.get(t)[0].cpu()) for t in steps)
        ok &= same_idx and same_x
        details.append(f"augment={augment}: indices {'equal' if same_idx else 'DIFFER'}, images "
                       f"{'equal' if same_x else 'DIFFER'} over {len(steps)} steps")
    row("batches_cpu", "PASS" if ok else "FAIL", "; ".join(details))


FP32_LIMIT = 3e-5  # relative RMS error; IEEE fp32 showed 2e-7 to 4e-6 on the CPU, TF32 (emulated on the CPU) 2.9e-4


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS error relative to the reference's RMS: robust to the occasional large element, unlike a max ratio."""
    ref = ref.detach().cpu()
    return ((a.detach().double().cpu() - ref).square().mean().sqrt() / ref.square().mean().sqrt()).item()


def _conv_errors(device) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 64, 32, 32, generator=g)
    w = torch.randn(64, 64, 3, 3, generator=g) / 24
    a = torch.randn(512, 1024, generator=g)
    b = torch.randn(1024, 512, generator=g)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y64 = F.conv2d(x64, w64, padding=1)
    y64.square().sum().backward()
    xd, wd = x.to(device).requires_grad_(), w.to(device).requires_grad_()
    y = F.conv2d(xd, wd, padding=1)
    y.square().sum().backward()
    return {"conv_forward": _rel(y.detach(), y64.detach()), "conv_weight_grad": _rel(wd.grad, w64.grad),
            "conv_input_grad": _rel(xd.grad, x64.grad),
            "matmul": _rel(a.to(device) @ b.to(device), a.double() @ b.double())}


@check("fp32_conv")
def check_fp32(device, deterministic=True):
    configure(device, "fp32", deterministic)
    fp32 = _conv_errors(device)
    worst = max(fp32.values())
    row("fp32_conv", "PASS" if worst < FP32_LIMIT else "FAIL",
        "relative RMS error vs float64: " + ", ".join(f"{k} {v:.1e}" for k, v in fp32.items())
        + f" (limit {FP32_LIMIT:.0e})", errors=fp32)
    if device.type == "cuda":
        configure(device, "tf32", deterministic)
        try:
            tf32 = _conv_errors(device)
        finally:
            configure(device, "fp32", deterministic)
        cap = torch.cuda.get_device_capability(device)
        seen = tf32["conv_forward"] > FP32_LIMIT
        row("tf32", "INFO", "train.precision=tf32 for comparison: " + ", ".join(f"{k} {v:.1e}" for k, v in tf32.items())
            + (" (compute capability < 8.0: no TF32 on this GPU)" if cap[0] < 8 else
               f" (TF32 {'shows' if seen else 'does NOT show'} above the fp32 limit: the fp32 check "
               f"{'can' if seen else 'may not'} tell them apart)"), errors=tf32)


@check("fused_optimizer")
def check_fused(device):
    from omegaconf import OmegaConf

    from lottery.training import make_optimizer
    p = [torch.zeros(3, device=device, requires_grad=True)]
    kinds = {}
    own = {"sgd": {"momentum": 0.9, "nesterov": False}, "adam": {"betas": [0.9, 0.999]},
           "adamw": {"betas": [0.9, 0.999]}}
    for name in ("sgd", "adam", "adamw"):
        o = make_optimizer(p, OmegaConf.create({"name": name, "lr": 0.1, "weight_decay": 0.0, **own[name]}), device)
        kinds[name] = "fused" if o.defaults.get("fused") else "foreach" if o.defaults.get("foreach") else "default"
    want = "fused" if device.type == "cuda" else "foreach"
    row("fused_optimizer", "PASS" if set(kinds.values()) == {want} else "FAIL", f"{kinds} (want {want})")


@check("eval_chunks")
def check_eval_chunks(device):
    from lottery.models import build_model
    from lottery.training import eval_chunk, evaluate
    g = torch.Generator().manual_seed(1)
    model = build_model("conv2", (3, 32, 32), 10).to(device)
    chunk = eval_chunk(model, device)  # EVAL_CHUNK; Conv-2 on a CPU: CPU_CONV_EVAL_CHUNK
    n = 2 * chunk + chunk // 2  # two whole chunks and a partial one
    x = torch.randn(n, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    metrics = evaluate(model, x, y, 10000)
    loss, acc = metrics["loss"], metrics["accuracy"]
    model.eval()
    with torch.inference_mode():
        out = model(x).float()
        ref_loss = F.cross_entropy(out, y, reduction="sum").item() / len(x)
        ref_acc = (out.argmax(1) == y).float().mean().item()
    rel = abs(loss - ref_loss) / abs(ref_loss)
    ok = round(acc * n) == round(ref_acc * n) and rel < 1e-6
    row("eval_chunks", "PASS" if ok else "FAIL", f"chunks of {chunk} vs one forward of {len(x)}: accuracy "
        f"{acc:.4f} vs {ref_acc:.4f}, loss relative difference {rel:.1e} (limit 1e-6)")


def _weights(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): torch.load(p, map_location="cpu", weights_only=False)
            for p in sorted(run_dir.glob("levels/*/final.pt"))}


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a.values(), b.values()))


@check("{0}_repeat")
def check_runs(name: str, args: list[str], tmp: Path, device, kill_at: int):
    base = [*args, f"device={device}", "train.progress=false", "seed=3"]
    runs = {}
    for k in ("a", "b"):
        t0 = time.perf_counter()
        r = cli(*base, f"hydra.run.dir={tmp / name / k}", cwd=tmp)
        if r.returncode != 0:
            raise RuntimeError(f"run {k} failed (exit {r.returncode}): {r.stderr[-1500:]}")
        runs[k] = time.perf_counter() - t0
    a, b = (_results(tmp / name / k) for k in ("a", "b"))
    same = a == b and _same_weights(_weights(tmp / name / "a"), _weights(tmp / name / "b"))
    acc = ", ".join(f"L{r['level']} {r['branch']} {r['test_accuracy']:.4f}" for r in a)
    row(f"{name}_repeat", "PASS" if same else "FAIL",
        f"two runs, seed 3 ({runs['a']:.0f}s, {runs['b']:.0f}s): summary.json and weights "
        f"{'identical' if same else 'DIFFER'}; test accuracy {acc}")

    # kill inside level 1 (after a checkpoint), start again with the same command
    fault_args, fault_env = fault(kill_at=kill_at, level=1, branch="ticket")
    run_dir = tmp / name / "killed"
    r = cli(*base, *fault_args, f"hydra.run.dir={run_dir}", cwd=tmp, env=fault_env)
    killed = r.returncode == -9
    ckpt = run_dir / "levels" / "level_1" / "ticket" / "checkpoint.pt"
    ckpt_device = torch.load(ckpt, map_location="cpu", weights_only=False).get("device_info") if ckpt.exists() else None
    r = cli(*base, *fault_args, f"hydra.run.dir={run_dir}", cwd=tmp, env=fault_env)
    if r.returncode != 0:
        raise RuntimeError(f"resumed run failed (exit {r.returncode}): {r.stderr[-1500:]}")
    c = _results(run_dir)
    resumed = "resuming from step" in r.stdout + r.stderr
    want = device_info(device)
    recorded = all(rec.get("device_info", {}).get("name") == want["name"] and rec["device_info"]["type"] == want["type"]
                   for rec in c) and (ckpt_device or {}).get("name") == want["name"]
    ok = killed and resumed and c == a and recorded
    row(f"{name}_resume", "PASS" if ok else "FAIL",
        f"SIGKILL at step {kill_at} of level 1 ({'killed' if killed else f'exit {r.returncode}, NOT killed'}), "
        f"{'resumed from its checkpoint' if resumed else 'NOT resumed from a checkpoint'}: summary.json "
        f"{'identical' if c == a else 'DIFFERS'}; device recorded in records and checkpoint: "
        f"{'yes' if recorded else 'NO'} ({want['name']})")


def _results(run_dir: Path) -> list[dict]:
    """summary.json's records without what differs between two runs of one computation (the unit's wall time)."""
    return [{k: v for k, v in rec.items() if k != "wall_time_s"}
            for rec in json.loads((run_dir / "summary.json").read_text())]


@check("{0}_no_sync")
def check_no_sync(name: str, model_name: str, dataset: str, data_root, augment: bool, device):
    import bench
    from lottery.models import build_model
    if data_root:
        data = bench.load_split(dataset, data_root, 5000, augment, device)
    else:
        data = bench.load_split(dataset, None, 100, augment, device, (1000, 200))
    model = build_model(model_name, data.pool.input_shape, data.pool.num_classes).to(device)
    masks = bench.random_masks(model, 0.2, 0)
    c = bench.check_no_syncs(model, masks, data, 1e-3, device, warmup=3, steps=30, epoch_steps=8,
                             checkpoint_every=10)
    ok = c["syncs"] == 0 and len(c["epoch_boundaries"]) >= 2 and c["checkpoints"]
    row(f"{name}_no_sync", "PASS" if ok else "FAIL",
        f"{c['syncs']} host-device syncs in steps {c['window'][0]}..{c['window'][1]} (epoch boundaries after "
        f"{c['epoch_boundaries']}, checkpoints after {c['checkpoints']}, their own copies excepted)"
        + (f"; first: {c['first']}" if c["first"] else ""), result=c)


@check("bf16")
def check_bf16(tmp: Path, device):
    r = cli("dataset=synthetic", "model=conv2", "dataset.synthetic_shape=cifar10", "train.duration=40it",
            "train.eval_every=20it", "pruning=none", "train.precision=bf16", f"device={device}",
            "train.progress=false", f"hydra.run.dir={tmp / 'bf16'}", cwd=tmp)
    warned = "bf16 is emulated" in r.stderr + r.stdout
    ok = r.returncode == 0
    acc = json.loads((tmp / "bf16" / "summary.json").read_text())[0]["test_accuracy"] if ok else None
    row("bf16", "PASS" if ok else "FAIL", f"exit {r.returncode}, test accuracy {acc}"
        + ("; warned: pre-Ampere GPU, bf16 emulated" if warned else "") + ("" if ok else f": {r.stderr[-500:]}"))


@check("compile")
def check_compile(tmp: Path, device):
    """torch.compile under the new fp32_precision API: PyTorch's legacy `allow_tf32` getters raise once the new API
    is used, and parts of inductor still read them; a short compiled Conv-2 run must train."""
    t0 = time.perf_counter()
    r = cli("dataset=synthetic", "model=conv2", "dataset.synthetic_shape=cifar10", "train.duration=30it",
            "train.eval_every=15it", "pruning=none", "train.compile=true", f"device={device}", "train.progress=false",
            f"hydra.run.dir={tmp / 'compile'}", cwd=tmp)
    ok = r.returncode == 0
    acc = json.loads((tmp / "compile" / "summary.json").read_text())[0]["test_accuracy"] if ok else None
    row("compile", "PASS" if ok else "FAIL", f"train.compile=true, fp32: exit {r.returncode} in "
        f"{time.perf_counter() - t0:.0f}s, test accuracy {acc}" + ("" if ok else f": {r.stderr[-800:]}"))


@check("semi_structured")
def check_semi_structured(device):
    from torch.utils import benchmark

    from lottery import masks as M
    from lottery.export import nm
    from lottery.models import build_model
    torch.manual_seed(0)
    model = build_model("conv2", (3, 32, 32), 10).eval()
    masks = {}
    for name, p in model.named_parameters():
        if p.dim() == 2:  # 2:4 along the input dim: the 2 largest of every 4 kept
            groups = p.detach().abs().reshape(p.shape[0], -1, 4)
            keep = torch.zeros_like(groups).scatter_(-1, groups.topk(2, dim=-1).indices, 1.0)
            masks[name] = keep.reshape(p.shape)
    M.apply(model, masks)
    sparse, layers = nm.semi_structured(model, device)
    dense = model.half().to(device).eval()
    x = torch.randn(256, 3, 32, 32, device=device).half()
    with torch.no_grad():
        a, b = dense(x).float(), sparse(x).float()
        err = float((a - b).abs().max() / a.abs().max())
        times = {k: benchmark.Timer("m(x)", globals={"m": m, "x": x}).blocked_autorange(min_run_time=1).median
                 for k, m in (("dense_fp16", dense), ("semi_structured", sparse))}
    converted = [r["layer"] for r in layers if r["chosen"] == "2:4"]
    ok = err < 1e-2 and bool(converted)
    row("semi_structured", "PASS" if ok else "FAIL",
        f"2:4 layers {converted}, others {[(r['layer'], r['chosen']) for r in layers if r['chosen'] != '2:4']}; "
        f"max rel diff {err:.1e}; batch 256: dense fp16 {times['dense_fp16'] * 1e3:.3f} ms, 2:4 "
        f"{times['semi_structured'] * 1e3:.3f} ms ({times['dense_fp16'] / times['semi_structured']:.2f}x)",
        layers=layers, max_rel_diff=err, seconds_per_batch=times)


# --- driver ----------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cuda[:N] | cpu (cpu: dry run of the checks that can run)")
    p.add_argument("--data-root", default=None, help="folder with MNIST/raw and cifar-10-batches-py (default: "
                                                     "synthetic data of the same shapes)")
    p.add_argument("--out", default="gpu_check.json", help="JSON with every row (default gpu_check.json)")
    p.add_argument("--quick", action="store_true", help="shorter runs (the CPU dry run: under 2 minutes on a CPU)")
    p.add_argument("--only", default=None, help="comma-separated checks to run (device, bad_device, batches_cpu, "
                                                "fp32_conv, fused_optimizer, eval_chunks, lenet, conv2, bf16, compile, "
                                                "semi_structured)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    t_start = time.perf_counter()
    print(f"gpu_check on {device}", file=sys.stderr)
    if device.type != "cuda":
        print("warning: not a CUDA device; the CUDA-only checks are skipped (this is a dry run)", file=sys.stderr)
    configure(device, "fp32", True)

    def schedule(steps):  # 2 levels and a control; evaluations and checkpoints inside; the kill after a checkpoint
        every = steps // 3 if args.quick else steps // 6  # quick: fewer checkpoints (Conv-2's are 52 MB)
        return [f"train.duration={steps}it", f"train.eval_every={steps // 3}it", f"checkpoint.every={every}it",
                "pruning.levels=2", "pruning.branches=[reinit]"], steps // 2 + 3

    common, kill_lenet = schedule(60 if args.quick else 300)
    conv_common, kill_conv2 = schedule(12 if args.quick else 300)
    if device.type == "cpu":
        # Tiny models on a CPU: extra threads only wait for each other, and next to a busy process every parallel
        # region waits for the slowest core (docs/benchmarks.md: 10-60x slower), which is how the quick mode's Conv-2
        # runs once hit their 600 s time-out. One thread, in this process and in every run it starts.
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
        common.append("threads=1")
        conv_common.append("threads=1")
    if args.data_root:
        root = str(Path(args.data_root).resolve())
        lenet = ["model=lenet_300_100", "dataset=mnist", f"dataset.root={root}", *common]
        conv2 = ["model=conv2", "dataset=cifar10", f"dataset.root={root}", "dataset.verify=false", *conv_common]
    else:
        # a tiny MLP in the quick (CPU dry) run: it checks the machinery, not LeNet
        lenet = ["model=mlp", "model.hidden=[64]"] if args.quick else ["model=lenet_300_100"]
        lenet += ["dataset=synthetic", *common]
        conv2 = ["model=conv2", "dataset=synthetic", "dataset.synthetic_shape=cifar10", "dataset.augment=true",
                 *conv_common]
        if args.quick:  # the machinery, not Conv-2's accuracy: 3 units x 12 steps of 8 images. They learn nothing,
            # and IMP stops rather than prune a level from an at-chance one (exit 4): from_dense prunes level 1 from
            # the same trained dense weights and goes on
            conv2 += ["dataset.synthetic_train=100", "dataset.synthetic_test=16", "dataset.val_size=16",
                      "train.batch_size=8", "pruning.from_dense=true"]

    only = set(args.only.split(",")) if args.only else None

    def wanted(name):
        return only is None or name in only

    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, fn in [("device", lambda: check_device(device)), ("bad_device", lambda: check_bad_device(tmp)),
                         ("batches_cpu", lambda: check_batches(device)), ("fp32_conv", lambda: check_fp32(device)),
                         ("fused_optimizer", lambda: check_fused(device)),
                         ("eval_chunks", lambda: check_eval_chunks(device))]:
            if wanted(name):
                fn()
        for name, model, dataset, cli_args, kill, augment in [
                ("lenet", "lenet_300_100", "mnist", lenet, kill_lenet, False),
                ("conv2", "conv2", "cifar10", conv2, kill_conv2, True)]:
            if wanted(name):
                check_runs(name, cli_args, tmp, device, kill)
                if cuda:
                    check_no_sync(name, model, dataset, args.data_root, augment, device)
                else:
                    row(f"{name}_no_sync", "SKIP", "needs a CUDA device")
        if wanted("bf16"):
            check_bf16(tmp, device) if cuda else row("bf16", "SKIP", "needs a CUDA device")
        if wanted("compile"):
            check_compile(tmp, device) if cuda else row("compile", "SKIP", "needs a CUDA device")
        if wanted("semi_structured"):
            check_semi_structured(device) if cuda else row("semi_structured", "SKIP",
                                                           "needs a CUDA device (PyTorch's 2:4 kernels are CUDA-only)")

    total = time.perf_counter() - t_start
    failed = [r["check"] for r in ROWS if r["status"] == "FAIL"]
    lines = [f"# gpu_check {time.strftime('%Y-%m-%d %H:%M')} on {device}"
             f" ({device_info(device)['name']}), torch {torch.__version__}, CUDA {torch.version.cuda}, "
             f"data {'real: ' + args.data_root if args.data_root else 'synthetic'}", "",
             f"{'status':<6} {'check':<18} {'s':>6}  detail"]
    for r in ROWS:
        lines.append(f"{r['status']:<6} {r['check']:<18} {r.get('seconds', 0):>6.1f}  {r['detail']}")
    lines += ["", f"{'FAIL: ' + ', '.join(failed) if failed else 'PASS: all checks that ran'} "
                  f"({len(ROWS)} rows, {total:.0f}s)"]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": str(device), "seconds": total, "rows": ROWS,
                                              "table": table}, indent=2, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
