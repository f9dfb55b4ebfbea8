"""`lottery-export TICKET_OR_RUN [--level L] [--replicate S] [--out DIR] ...`: a ticket as files that are really
smaller, and networks that may be faster, with a table of their size, speed and accuracy.

- `source`: what is exported (a ticket file, a packed ticket, or a run folder's level) and its masked networks;
- `lottery.experiment.packed`: the packed ticket (bit-packed masks, kept values only), read back by `load_ticket`;
- `compact`: the physically smaller network of a channel/neuron ticket, saved with torch.export;
- `sparse`: CSR Linear layers where measured faster than dense at the given batch size;
- `nm`: 2:4 semi-structured Linear layers on a CUDA GPU;
- `to_onnx`: the ONNX file, checked with ONNX Runtime (optional extra `lottery[export]`);
- `table`: latency (torch.utils.benchmark, median), bytes, accuracy; table.csv and table.md.

Imports experiment, data, models, masks and core; nothing imports it (pyproject lists its entry point).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

VARIANTS = ("packed", "compact", "csr", "nm", "onnx")
DTYPES = ("float32", "float16")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as the other entry points' errors (argparse prints the usage too)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="lottery-export",
        description="Export a ticket: a packed ticket file (bit-packed masks, only the surviving weights; "
        "lottery-retrain accepts it), the compact network of a channel/neuron ticket "
        "(torch.export, loads without lottery), CSR linear layers where measured faster, 2:4 "
        "semi-structured layers on a CUDA GPU, and ONNX; with a table (table.csv, table.md) of "
        "weights, bytes on disk, latency at batch 1 and 256 and test accuracy per variant.",
    )
    p.add_argument("source", help="a ticket file (levels/level_<L>/ticket.pt, or a packed ticket) or a run folder")
    p.add_argument("--level", type=int, help="the level to export (with a run folder)")
    p.add_argument("--replicate", type=int, help="the replicate's seed (with a replicas run's folder)")
    p.add_argument(
        "--branch",
        default="ticket",
        help="what to export of the level: only 'ticket' (the level's trained ticket) keeps masks and trained weights",
    )
    p.add_argument(
        "--out",
        help="output folder, which must not exist yet (default: <run>/exports/level_<L> for a "
        "run folder, <ticket file>.export next to a ticket file)",
    )
    p.add_argument(
        "--variants",
        default="all",
        help=f"comma-separated, of {', '.join(VARIANTS)}; 'all' (default): every one that applies to the ticket",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="width of the packed ticket's stored values (float16 halves them, within fp16 precision)",
    )
    p.add_argument(
        "--rewind-only",
        action="store_true",
        help="pack only what retraining needs (masks and rewind weights), not the trained weights",
    )
    p.add_argument("--batch", type=int, default=256, help="batch size the CSR layers are chosen for (default 256)")
    p.add_argument("--threads", type=int, default=1, help="threads of every latency measurement (default 1)")
    p.add_argument(
        "--clock",
        default="wall",
        choices=("wall", "thread"),
        help="latency as wall time (default) or as the CPU time of the measuring thread (--threads 1 "
        "only; on a shared machine it leaves out the time other processes had the CPU)",
    )
    p.add_argument(
        "--min-run-time",
        type=float,
        default=0.5,
        help="seconds each latency measurement repeats for (torch.utils.benchmark; median reported)",
    )
    p.add_argument("--data-root", help="folder holding the dataset (overrides the ticket's dataset.root)")
    p.add_argument("--test-images", type=int, default=0, help="test images for accuracy and equality (0: all)")
    p.add_argument("--no-eval", action="store_true", help="no accuracy or output checks (no dataset needed)")
    return p


def main(argv=None) -> int:
    from lottery.core.commandline import quick_exit

    quick_exit()
    args = parser().parse_args(argv)
    try:
        return _export(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {str(e).strip(chr(34) + chr(39))}", file=sys.stderr)
        return 2


def _variants(text: str) -> list[str]:
    asked = [v.strip() for v in text.split(",") if v.strip()]
    if asked == ["all"]:
        return list(VARIANTS)
    bad = [v for v in asked if v not in VARIANTS]
    if bad or not asked:
        raise ValueError(
            f"--variants {text!r}: unknown variant {bad[0] if bad else '(none)'}; accepted: "
            f"{', '.join(VARIANTS)} or all"
        )
    return asked


def _default_out(args, src) -> Path:
    path = Path(args.source).expanduser()
    if path.is_file():
        return path.with_name(path.name + ".export")
    rep = f"replicate_{args.replicate}_" if args.replicate is not None else ""
    return path / "exports" / f"{rep}level_{args.level}"


def _export(args) -> int:
    import torch

    from lottery.core.files import save_torch
    from lottery.experiment import packed
    from lottery.experiment.ticket import load_ticket
    from lottery.export import compact as C, nm, sparse as S, table as T, to_onnx
    from lottery.export.compact import NotCompactable
    from lottery.export.source import resolve

    wanted = _variants(args.variants)
    every = args.variants.strip() == "all"
    for name, value, low in (
        ("--batch", args.batch, 1),
        ("--threads", args.threads, 1),
        ("--test-images", args.test_images, 0),
    ):
        if value < low:
            raise ValueError(f"{name} {value}: must be an integer >= {low}")
    if args.clock == "thread" and args.threads != 1:
        raise ValueError(f"--clock thread measures one thread; got --threads {args.threads} (accepted: 1)")
    src = resolve(args.source, args.level, args.replicate, args.branch)
    out = Path(args.out).expanduser() if args.out else _default_out(args, src)
    if out.exists():
        raise ValueError(
            f"--out {out} already exists; an export never overwrites an earlier one: give another --out or remove it"
        )
    networks = [v for v in wanted if v != "packed"]
    if networks and src.trained_state is None:
        if not every:
            raise ValueError(
                f"{src.where} holds no trained weights, which --variants {','.join(networks)} need; "
                f"export the run folder's level (its final.pt), or --variants packed"
            )
        notes = [f"note: {src.where} holds no trained weights: only the packed ticket is written"]
        wanted, networks = ["packed"], []
    else:
        notes = []
    if "onnx" in wanted and to_onnx.available():
        if not every:
            raise ValueError(to_onnx.available())
        notes.append(f"note: {to_onnx.available()}")
        wanted.remove("onnx")
    if "compact" in wanted:  # decided from the masks alone, so a refusal comes before anything is written
        try:
            removed = C.removed_units(src.build(), src.ticket.masks)
            if not any(removed.values()):
                raise NotCompactable(
                    "no whole output rows or channels are pruned: the compact network would be the "
                    "masked one (an unstructured ticket: see the csr variant)"
                )
        except NotCompactable as e:
            if not every:
                raise
            notes.append(f"note: compact network not written: {e}")
            wanted.remove("compact")
    if "nm" in wanted and not torch.cuda.is_available():
        message = (
            "2:4 semi-structured sparsity does not apply on cpu: PyTorch's 2:4 kernels are CUDA-only (run the "
            "export on a GPU machine)"
        )
        if not every:
            raise nm.NotApplicable(message)
        notes.append(f"note: {message}")
        wanted.remove("nm")
    torch.set_num_threads(args.threads)
    shape = src.input_shape()
    test_x = test_y = None
    if not args.no_eval and networks:
        from lottery.data import load_pool

        node = src.dataset_node()
        if args.data_root:
            node["root"] = args.data_root
        node["download"] = False
        pool = load_pool(node, seed=(src.ticket.config or {}).get("seed") or 0)
        n = args.test_images or len(pool.test_y)
        test_x, test_y = pool.test_x[:n].float(), pool.test_y[:n]

    out.mkdir(parents=True)
    details: dict = {
        "source": src.where,
        "model": src.model_name,
        "level": src.ticket.level,
        "weights_remaining": src.ticket.weights_remaining,
        "threads": args.threads,
        "torch": str(torch.__version__),
    }
    rows = []
    masked = src.masked() if src.trained_state is not None else None
    dense = src.dense_like()
    mt = args.min_run_time
    acc = (lambda m: T.accuracy(m, test_x, test_y)) if test_x is not None and test_y is not None else (lambda m: None)
    ref = T.outputs(masked, test_x) if masked is not None and test_x is not None else None

    def diff(m):
        return T.max_rel_diff(T.outputs(m, test_x), ref) if ref is not None and test_x is not None else None

    def loaded_row(variant: str, weights: int, path: Path, loaded: torch.nn.Module) -> dict:
        """The row of a network variant written to `path` and loaded back from it (timed, checked on the images)."""
        return T.row(
            variant,
            weights,
            path.stat().st_size,
            loaded,
            shape,
            args.threads,
            acc(loaded),
            diff(loaded),
            file=path.name,
            min_run_time=mt,
            clock=args.clock,
        )

    counts_dense = C.count(dense, shape)
    compact_net = None
    rows.append(
        T.row(
            "dense",
            counts_dense["weights"],
            T.state_bytes(dense),
            dense if networks else None,
            shape,
            args.threads,
            None,
            min_run_time=mt,
            clock=args.clock,
        )
    )
    if masked is not None:
        rows.append(
            T.row(
                "masked",
                C.count(masked, shape)["nonzero"],
                T.state_bytes(masked),
                masked,
                shape,
                args.threads,
                acc(masked),
                0.0 if ref is not None else None,
                min_run_time=mt,
                clock=args.clock,
            )
        )

    if "packed" in wanted:
        data = packed.pack(src.ticket, None if args.rewind_only else src.trained_state, args.dtype)
        path = out / "ticket.packed.pt"
        save_torch(data, path)
        back = load_ticket(path)  # the file as a user reads it
        exact = args.dtype == "float32"
        same = all(
            torch.equal(back.rewind_state[k], v.float())
            if exact
            else torch.allclose(back.rewind_state[k].float(), v.float(), rtol=1e-3, atol=1e-4)
            for k, v in src.ticket.rewind_state.items()
        )
        if not same:
            raise RuntimeError(f"the packed ticket {path} does not load back to the ticket's weights")
        details["packed"] = {
            "bytes": path.stat().st_size,
            "bound": packed.size_bound(data),
            "dtype": args.dtype,
            "dense_state_dict_bytes": T.state_bytes(dense),
            "with_trained": data["trained"] is not None,
        }
        # the weights of the Linear and Conv layers, as the masked row counts them: a channel ticket's bias and
        # BatchNorm masks are not weights, and an unmasked layer (the classifier of a channel ticket) keeps them all
        kept = sum(
            int(src.ticket.masks[k].sum()) if k in src.ticket.masks else v.numel()
            for k, v in src.ticket.rewind_state.items()
            if k.endswith("weight") and v.dim() > 1
        )
        what = "rewind" if data["trained"] is None else "rewind+trained"
        rows.append(
            T.row(
                f"packed ({args.dtype}, {what})",
                kept,
                path.stat().st_size,
                None,
                shape,
                args.threads,
                None,
                file=path.name,
            )
        )

    if "compact" in wanted:
        assert masked is not None  # every network variant needs the trained weights (refused above without them)
        small, kept_units = C.compact(masked, src.ticket.masks)
        compact_net = small
        path = out / "compact.pt2"
        C.save_exported(small, shape, path)
        loaded: torch.nn.Module = torch.export.load(str(path)).module()  # the file as a user loads it
        counts = C.count(small, shape)
        details["compact"] = {
            "kept_units": kept_units,
            **{f"compact_{k}": v for k, v in counts.items()},
            **{f"dense_{k}": v for k, v in counts_dense.items()},
            "format": "torch.export",
        }
        rows.append(loaded_row("compact", counts["weights"], path, loaded))

    if "csr" in wanted:
        assert masked is not None
        chosen, layers = S.choose(masked, shape, args.batch, threads=args.threads, clock=args.clock)
        details["csr"] = {"batch": args.batch, "layers": layers}
        if any(r["chosen"] == "csr" for r in layers):
            path, fmt = S.save(chosen, shape, out)
            loaded = S.load(path)
            details["csr"]["format"] = fmt
            rows.append(loaded_row(f"csr (batch {args.batch})", C.count(masked, shape)["nonzero"], path, loaded))
        else:
            notes.append(
                f"note: no linear layer was faster as CSR at batch {args.batch} (measured per layer, see "
                f"export.json): no csr network written"
            )

    if "nm" in wanted:  # on a CUDA device only (refused or noted above otherwise)
        assert masked is not None
        half, layers = nm.semi_structured(masked, "cuda")
        details["nm"] = {"layers": layers, "device": torch.cuda.get_device_name()}
        if test_x is not None:
            with torch.no_grad():
                got = torch.cat(
                    [half(test_x[i : i + 500].half().cuda()).float().cpu() for i in range(0, len(test_x), 500)]
                )
            assert ref is not None and test_y is not None  # both come with test_x and the masked network
            details["nm"]["max_rel_diff_fp16"] = T.max_rel_diff(got, ref)
            details["nm"]["accuracy"] = T.accuracy_of(got, test_y)

    if "onnx" in wanted:
        path = out / "model.onnx"
        small_or_masked = "compact" if compact_net is not None else "masked"
        net = compact_net if compact_net is not None else masked
        assert net is not None
        to_onnx.export(net, shape, path)
        x = test_x if test_x is not None else torch.randn(64, *shape, generator=torch.Generator().manual_seed(0))
        got = torch.cat([to_onnx.run(path, x[i : i + 500]) for i in range(0, len(x), 500)])
        expected = T.outputs(net, x)
        details["onnx"] = {"of": small_or_masked, "max_rel_diff_vs_pytorch": T.max_rel_diff(got, expected)}
        rows.append(
            T.row(
                f"onnx ({small_or_masked})",
                C.count(net, shape)["weights"] if small_or_masked == "compact" else C.count(net, shape)["nonzero"],
                path.stat().st_size,
                None,
                shape,
                args.threads,
                T.accuracy_of(got, test_y) if test_y is not None else None,
                T.max_rel_diff(got, ref) if ref is not None else None,
                file=path.name,
            )
        )

    written = T.write(rows, out)
    (out / "export.json").write_text(json.dumps({**details, "notes": notes, "table": rows}, indent=1))
    for note in notes:
        print(note, file=sys.stderr)
    print(
        f"{src.where}: {args.threads} thread(s), latency = median of torch.utils.benchmark repeats "
        f"({'wall time' if args.clock == 'wall' else 'CPU time of the measuring thread'})"
    )
    print(T.markdown(rows), end="")
    print(
        "wrote "
        + ", ".join(
            str(p) for p in [*sorted(out.glob("*.pt*")), *sorted(out.glob("*.onnx")), *written, out / "export.json"]
        )
    )
    return 0
