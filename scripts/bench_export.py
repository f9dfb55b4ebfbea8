#!/usr/bin/env python3
"""Size and speed of exported tickets against the dense network, measured in the same run (lottery-export's parts).

    python scripts/bench_export.py --out bench_export            # real MNIST / CIFAR-10 from ../shared/data
    python scripts/bench_export.py --quick --out /tmp/b          # tiny synthetic data; what the test runs

Tickets (each trained briefly: the point is size, latency and equality, not accuracy):
  LeNet-300-100 neuron tickets keeping 50%, 25%, 12.5% of the hidden neurons   -> compact network
  Conv-2 channel tickets keeping 50%, 25% of the channels (and fc neurons)     -> compact network
  LeNet-300-100 unstructured tickets at 20%, 5%, 2%, 1% of the weights         -> CSR layers where measured faster
The dense network is trained first (Adam); a ticket is its lowest-norm rows (lottery.export.compact.lowest_norm_masks,
biases pruned with them) or its smallest weights per layer, then fine-tuned with the mask re-applied after every
step. Per ticket: dense, masked (dense kernels on the masked weights), packed (masks bit-packed + the trained kept
values, fp32: bytes only) and compact or CSR, with weights, bytes on disk, median latency (torch.utils.benchmark) at
batch 1 and 256 at --threads threads, the ratio dense/variant of each, test accuracy and the max relative output
difference to the masked network. CSR layers are chosen per layer by measurement at each batch size (so batch 1 and
batch 256 may use different layers). The crossover density of a CSR Linear against a dense one (784x300 and 300x100
at batch 1 and 256) is measured too.

Quick mode checks that everything runs (batch 16 stands in for 256: the keys stay `latency_b256_ms`, the table
header says 16); its numbers are not measurements.
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lottery import masks as M  # noqa: E402
from lottery.core.files import save_torch  # noqa: E402
from lottery.data import load_pool  # noqa: E402
from lottery.experiment import packed  # noqa: E402
from lottery.experiment.ticket import Ticket  # noqa: E402
from lottery.export import compact as C, sparse as S, table as T  # noqa: E402
from lottery.models import build_model  # noqa: E402


def data(name: str, quick: bool, root: str, n_test: int):
    if quick:
        node = {"name": "synthetic", "synthetic_shape": "mnist" if name == "mnist" else "cifar10",
                "synthetic_train": 256, "synthetic_test": 64, "val_size": 0, "augment": False}
    else:
        node = {"name": name, "root": root, "download": False, "val_size": 0, "augment": False,
                **({"verify": False} if name == "cifar10" else {})}
    pool = load_pool(node)
    return pool.x, pool.y, pool.test_x[:n_test], pool.test_y[:n_test], tuple(pool.input_shape)


def train(model, x, y, steps: int, lr: float, masks=None, batch: int = 60, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if masks is not None:
            M.apply(model, masks)
    return model.eval()


def magnitude_masks(model, density: float) -> dict:
    """Per layer, the largest |w| kept (the output layer too), the rest pruned."""
    out = {}
    for name, p in model.named_parameters():
        if p.dim() > 1:
            k = max(1, round(density * p.numel()))
            threshold = p.detach().abs().flatten().kthvalue(p.numel() - k + 1).values
            out[name] = (p.detach().abs() >= threshold).float()
    return out


def file_bytes(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def packed_bytes(model, masks, tmp: Path) -> int:
    """Bytes of the packed file holding the masks and the trained kept values (one state, fp32)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kept, total = M.count(masks)
    ticket = Ticket(level=0, masks=M.to_bool(masks), rewind_step=0, rewind_state=state, config={"seed": 0},
                    weights_remaining=kept / total, params_remaining=0.0)
    path = tmp / "packed.pt"
    save_torch(packed.pack(ticket), path)
    return path.stat().st_size


def paired_latency(model, dense, shape, batch: int, args) -> tuple[float, float]:
    """(model ms, dense ms) at `batch`: each the median of torch.utils.benchmark's repeats, measured in --rounds
    alternating rounds (model, dense, model, dense, ...), the lowest round kept. On a shared machine other processes
    only ever add time, so the lowest round is the least disturbed, and the dense baseline is measured beside each
    variant rather than once."""
    a, b = [], []
    for _ in range(args.rounds):
        a.append(T.latency_ms(model, shape, batch, args.threads, args.min_run_time, args.clock))
        if dense is not model:
            b.append(T.latency_ms(dense, shape, batch, args.threads, args.min_run_time, args.clock))
    return min(a), min(b or a)


def measure(label, variant, model, shape, tx, ty, ref, args, nbytes, weights, dense=None, lat_model_b1=None):
    """One row; `dense`: the dense network to time beside it (ratios), `lat_model_b1`: a different network for
    batch 1 (CSR chosen at batch 1)."""
    dense = dense if dense is not None else model
    b1, d1 = paired_latency(model if lat_model_b1 is None else lat_model_b1, dense, shape, 1, args)
    b256, d256 = paired_latency(model, dense, shape, args.big_batch, args)
    out = T.outputs(model, tx)
    row = {"ticket": label, "variant": variant, "weights": weights, "bytes": nbytes, "latency_b1_ms": b1,
           "latency_b256_ms": b256, "dense_b1_ms": d1, "dense_b256_ms": d256, "threads": args.threads,
           "accuracy": T.accuracy_of(out, ty), "max_rel_diff": T.max_rel_diff(out, ref) if ref is not None else 0.0}
    if lat_model_b1 is not None:
        row["accuracy_b1_net"] = T.accuracy(lat_model_b1, tx, ty)
        row["max_rel_diff"] = max(row["max_rel_diff"], T.max_rel_diff(T.outputs(lat_model_b1, tx), ref))
    if variant != "dense":
        row["speedup_b1"] = d1 / b1
        row["speedup_b256"] = d256 / b256
        row["bytes_ratio"] = nbytes / args._dense_row["bytes"]
    return row


def ticket_rows(label, dense, masks, kind, shape, x, y, tx, ty, args, tmp, lr):
    model = build_model(args._name, shape, 10)
    model.load_state_dict(dense.state_dict())
    M.apply(model, masks)
    train(model, x, y, args.finetune, lr, masks, seed=1)
    ref = T.outputs(model, tx)
    dense_row = args._dense_row
    rows = [measure(label, "masked", model, shape, tx, ty, None, args, file_bytes(model.state_dict()),
                    C.count(model, shape)["nonzero"], dense)]
    kept = M.count(masks)[0]
    rows.append({"ticket": label, "variant": "packed", "weights": kept, "bytes": packed_bytes(model, masks, tmp),
                 "threads": args.threads, "latency_b1_ms": None, "latency_b256_ms": None,
                 "bytes_ratio": packed_bytes(model, masks, tmp) / dense_row["bytes"]})
    if kind == "compact":
        small, units = C.compact(model, masks)
        path = tmp / "compact.pt2"
        C.save_exported(small, shape, path)
        loaded = torch.export.load(str(path)).module()
        row = measure(label, "compact", loaded, shape, tx, ty, ref, args, path.stat().st_size,
                      C.count(small, shape)["weights"], dense)
        row["flops"] = C.count(small, shape)["flops"]
        row["units"] = units
        rows.append(row)
    else:
        chosen = {}
        for batch in (1, args.big_batch):
            net, layers = S.choose(model, shape, batch, timer=lambda m, x: S.median_time(
                m, x, args.threads, args.min_run_time, args.clock))  # quick mode's short timings too
            chosen[batch] = (net, layers)
        net256, layers256 = chosen[args.big_batch]
        path, _ = S.save(net256, shape, tmp)
        row = measure(label, "csr", net256, shape, tx, ty, ref, args, path.stat().st_size,
                      C.count(model, shape)["nonzero"], dense, lat_model_b1=chosen[1][0])
        row["csr_layers_b1"] = [r["layer"] for r in chosen[1][1] if r["chosen"] == "csr"]
        row["csr_layers_b256"] = [r["layer"] for r in layers256 if r["chosen"] == "csr"]
        rows.append(row)
    return rows


def family(name, dataset, tickets, args, tmp, lr):
    x, y, tx, ty, shape = data(dataset, args.quick, args.data_root, args.test_images)
    torch.manual_seed(0)
    dense = train(build_model(name, shape, 10), x, y, args.steps, lr)
    args._name = name
    dense_row = measure(f"{name} dense", "dense", dense, shape, tx, ty, None, args, file_bytes(dense.state_dict()),
                        C.count(dense, shape)["weights"])
    dense_row["flops"] = C.count(dense, shape)["flops"]
    args._dense_row = dense_row
    rows = [dense_row]
    for label, make, kind in tickets:
        t0 = time.time()
        rows += ticket_rows(label, dense, make(dense), kind, shape, x, y, tx, ty, args, tmp, lr)
        print(f"{label}: {time.time() - t0:.0f} s", file=sys.stderr)
    return rows


def fmt(v, digits=4):
    return "-" if v is None else (f"{v:.{digits}g}" if isinstance(v, float) else str(v))


def markdown(rows) -> str:
    cols = ["ticket", "variant", "weights", "bytes", "bytes_ratio", "latency_b1_ms", "speedup_b1", "latency_b256_ms",
            "speedup_b256", "accuracy", "max_rel_diff"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny synthetic data, a few steps (what the test runs)")
    p.add_argument("--out", default="bench_export", help="folder for bench_export.json and .md")
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per latency measurement")
    p.add_argument("--steps", type=int, default=None, help="dense training steps")
    p.add_argument("--finetune", type=int, default=None, help="fine-tuning steps of each ticket")
    p.add_argument("--test-images", type=int, default=None)
    p.add_argument("--clock", default=None, choices=S.CLOCKS,
                   help="thread (default): CPU time of the measuring thread (with --threads 1), which a shared "
                        "machine's other processes do not inflate; wall: wall time (the quick mode's default: it "
                        "checks the machinery and the thread clock waits out the other processes)")
    p.add_argument("--rounds", type=int, default=None, help="alternating latency rounds, lowest kept (3; quick 1)")
    p.add_argument("--big-batch", type=int, default=None, help="the large batch size (256; quick mode: 16)")
    args = p.parse_args(argv)
    args.clock = args.clock or ("wall" if args.quick else "thread")
    if args.clock == "thread" and args.threads != 1:
        p.error(f"--clock thread measures one thread; got --threads {args.threads}")
    q = args.quick
    args.min_run_time = args.min_run_time or (0.01 if q else 0.3)
    args.steps = args.steps or (5 if q else 2000)
    args.finetune = args.finetune or (3 if q else 1000)
    args.test_images = args.test_images or (64 if q else 2000)
    args.big_batch = args.big_batch or (16 if q else 256)
    args.rounds = args.rounds or (1 if q else 3)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "files"
    tmp.mkdir(exist_ok=True)
    t0 = time.time()
    rows = family("lenet_300_100", "mnist", [
        *[(f"lenet neurons {k:g}%", lambda m, k=k: C.lowest_norm_masks(m, k / 100), "compact") for k in (50, 25, 12.5)],
        *[(f"lenet unstructured {d:g}%", lambda m, d=d: magnitude_masks(m, d / 100), "csr") for d in (20, 5, 2, 1)],
    ], args, tmp, 1.2e-3)
    args.steps = args.steps if q else max(args.steps // 10, 1)  # Conv-2 is ~100x LeNet's work per step
    args.finetune = args.finetune if q else max(args.finetune // 10, 1)
    rows += family("conv2", "cifar10", [
        (f"conv2 channels {k}%", lambda m, k=k: C.lowest_norm_masks(m, k / 100), "compact") for k in (50, 25)
    ], args, tmp, 2e-4)
    crossover = [S.crossover(shape, batch, threads=args.threads,  # lowest of --rounds medians, as above
                             timer=(lambda m, x: min(S.median_time(m, x, args.threads, args.min_run_time,
                                                                   args.clock) for _ in range(args.rounds))))
                 for shape in ((300, 784), (100, 300)) for batch in (1, args.big_batch)]
    result = {"rows": rows, "crossover": crossover, "threads": args.threads, "clock": args.clock, "quick": q,
              "big_batch": args.big_batch,
              "machine": {"cpu": platform.processor() or platform.machine(), "torch": str(torch.__version__),
                          "python": platform.python_version()},
              "seconds": time.time() - t0}
    (out / "bench_export.json").write_text(json.dumps(result, indent=1))
    text = markdown(rows).replace("latency_b256_ms", f"latency_b{args.big_batch}_ms").replace(
        "speedup_b256", f"speedup_b{args.big_batch}")
    text += "\nCSR against dense, one Linear with a random mask (crossover: highest density where CSR was faster):\n\n"
    text += "| shape (out x in) | batch | " + " | ".join(f"{r['density']:g}" for r in crossover[0]["rows"]) + \
            " | crossover |\n|" + "---|" * (len(crossover[0]["rows"]) + 3) + "\n"
    for c in crossover:
        text += f"| {c['shape'][0]}x{c['shape'][1]} | {c['batch']} | " + " | ".join(
            f"{r['dense_s'] / r['csr_s']:.2f}x" for r in c["rows"]) + f" | {fmt(c['crossover'])} |\n"
    text += "\n(cells: dense time / CSR time; above 1 CSR is faster)\n"
    (out / "bench_export.md").write_text(text)
    print(text)
    print(f"threads={args.threads}, clock={args.clock}, torch {torch.__version__}, {result['seconds']:.0f} s; wrote "
          f"{out / 'bench_export.json'}, {out / 'bench_export.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
