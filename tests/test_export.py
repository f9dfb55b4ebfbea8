"""lottery-export: packed tickets (bitwise round trip, size bound, lottery-retrain accepts them), compact networks of
channel tickets (equal outputs on real test images, load without lottery), CSR layers chosen by measurement, 2:4 on
CUDA only, ONNX Runtime equality, the command line and the benchmark's quick mode."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import DATA, REPO, TINY, in_process, needs_data, run_cli, stable
from lottery import masks as M
from lottery.core.files import save_torch
from lottery.experiment import packed
from lottery.experiment.ticket import Ticket, load_ticket, save_ticket
from lottery.export import compact as C, main, nm, sparse as S, to_onnx
from lottery.models import build_model

MNIST, CIFAR = (1, 28, 28), (3, 32, 32)


def _random_ticket(name: str, shape, density: float = 0.1, seed: int = 0) -> tuple[Ticket, dict]:
    g = torch.Generator().manual_seed(seed)
    model = build_model(name, shape, 10)
    masks = {n: (torch.rand(p.shape, generator=g) < density).float()
             for n, p in model.named_parameters() if p.dim() > 1}
    M.apply(model, masks)
    rewind = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
        for b in model.buffers():
            if b.is_floating_point():
                b.add_(0.1)
    M.apply(model, masks)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    kept, total = M.count(masks)
    ticket = Ticket(level=3, masks=M.to_bool(masks), rewind_step=7, rewind_state=rewind,
                    config={"seed": 5, "model": {"name": name}}, weights_remaining=kept / total,
                    params_remaining=0.5, metrics=None)
    return ticket, trained


# --- the packed ticket ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,shape", [("lenet_300_100", MNIST), ("conv2", CIFAR), ("vgg11", CIFAR),
                                        ("resnet20", CIFAR)])
def test_packed_round_trip_bitwise_in_fp32_and_within_precision_in_fp16_with_the_size_bound(tmp_path, name, shape):
    ticket, trained = _random_ticket(name, shape)
    n_weights = sum(m.numel() for m in ticket.masks.values())
    n_kept = sum(int(m.sum()) for m in ticket.masks.values())
    n_unmasked = sum(v.numel() for k, v in ticket.rewind_state.items()
                     if k not in ticket.masks and v.is_floating_point())
    n_ints = sum(v.numel() for v in ticket.rewind_state.values() if not v.is_floating_point())  # num_batches_tracked
    for dtype, width in (("float32", 4), ("float16", 2)):
        path = tmp_path / f"{dtype}.pt"
        save_torch(packed.pack(ticket, trained, dtype), path)
        back = load_ticket(path)
        assert (back.level, back.rewind_step, back.config) == (3, 7, ticket.config)
        assert load_torch_raw(path)["seed"] == 5
        assert set(back.masks) == set(ticket.masks)
        assert all(torch.equal(back.masks[k], ticket.masks[k]) for k in ticket.masks)
        for state, original in ((back.rewind_state, ticket.rewind_state), (back.trained_state, trained)):
            assert list(state) == list(original)
            for k, v in original.items():
                assert state[k].dtype == v.dtype and state[k].shape == v.shape
                if dtype == "float32" or not v.is_floating_point():
                    # bitwise: the same bits, pruned +0.0 included
                    assert torch.equal(state[k].view(torch.int32) if v.dtype == torch.float32 else state[k],
                                       v.view(torch.int32) if v.dtype == torch.float32 else v), k
                else:
                    assert torch.allclose(state[k], v, rtol=2 ** -10, atol=6e-8), k
                    if k in ticket.masks:
                        assert not state[k][~ticket.masks[k]].any()  # pruned stay exactly zero
        # about weights/8 + width x kept values (rewind and trained) + a small header
        size = path.stat().st_size
        payload = n_weights / 8 + width * 2 * (n_kept + n_unmasked) + 8 * 2 * n_ints
        assert payload <= size <= payload + 8 * 1024 + 40 * len(ticket.rewind_state), (size, payload)
        assert size <= packed.size_bound(load_torch_raw(path))


def load_torch_raw(path):
    from lottery.core.files import load_torch
    return load_torch(path)  # the packed dict itself, not the Ticket load_ticket makes of it


def test_a_damaged_packed_ticket_is_one_line(tmp_path):
    ticket, _ = _random_ticket("lenet_300_100", MNIST)
    data = packed.pack(ticket)
    data["rewind"] = data["rewind"][:-3]
    save_torch(data, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="damaged packed ticket"):
        load_ticket(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="accepted: float32, float16"):
        packed.pack(ticket, dtype="bfloat16")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A LeNet-300-100 IMP run on synthetic data: levels 0 and 1 (level 1 prunes 20%)."""
    cwd = tmp_path_factory.mktemp("export_run")
    r = run_cli(*TINY, "model=lenet_300_100", "pruning.levels=2", "pruning.branches=[]", "hydra.run.dir=run", cwd=cwd)
    assert r.returncode == 0, r.stderr[-2000:]
    return cwd / "run"


def _export(*args, cwd):
    """`lottery-export ARGS` (in this process: tests/conftest.py's in_process)."""
    return in_process(*args, cwd=cwd, entry="lottery.export:main", returns=True)


@pytest.fixture(scope="module")
def channel_run(tmp_path_factory):
    """A LeNet-300-100 run with pruning.granularity=channel on synthetic data: level 1 keeps half of the hidden
    neurons, with masks for their biases (companions)."""
    cwd = tmp_path_factory.mktemp("channel_run")
    r = run_cli(*TINY, "model=lenet_300_100", "pruning.levels=2", "pruning.branches=[]", "pruning.granularity=channel",
                "pruning.rates.linear=0.5", "hydra.run.dir=run", cwd=cwd)
    assert r.returncode == 0, r.stderr[-2000:]
    return cwd / "run"


@pytest.fixture(scope="module")
def nm_run(tmp_path_factory):
    """A LeNet-300-100 2:4 run (pruning.granularity=nm, one shot) on synthetic data: level 1 is the 2:4 ticket."""
    cwd = tmp_path_factory.mktemp("nm_run")
    r = run_cli(*TINY, "model=lenet_300_100", "pruning.branches=[]", "pruning.granularity=nm", "pruning.n=2",
                "pruning.m=4", "pruning.one_shot=true", "hydra.run.dir=run", cwd=cwd)
    assert r.returncode == 0, r.stderr[-2000:]
    return cwd / "run"


@pytest.mark.parametrize("run", ["tiny_run", "channel_run", "nm_run"])
@pytest.mark.slow
def test_retrain_accepts_a_packed_ticket_and_trains_it_exactly_as_the_ticket_file(run, tmp_path, request):
    tiny_run = request.getfixturevalue(run)
    out = tmp_path / "exp"
    r = _export(str(tiny_run), "--level", "1", "--out", str(out), "--variants", "packed", "--rewind-only",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "packed (float32, rewind)" in r.stdout and (out / "table.md").exists()
    details = json.loads((out / "export.json").read_text())
    assert details["packed"]["bytes"] < details["packed"]["dense_state_dict_bytes"]  # 50-80% kept, one state
    results = []
    for name, ticket in (("file", tiny_run / "levels" / "level_1" / "ticket.pt"), ("packed", out / "ticket.packed.pt")):
        r = run_cli(f"ticket={ticket}", "train.progress=false", f"hydra.run.dir={name}", cwd=tmp_path,
                    entry="lottery.cli:retrain")
        assert r.returncode == 0, r.stderr[-2000:]
        results.append(stable(json.loads((tmp_path / name / "summary.json").read_text())))
    assert results[0] == results[1], [(k, a[k], b.get(k)) for a, b in zip(*results) for k in a if a[k] != b.get(k)]


def _assert_packed_round_trip(level, packed_file):
    """The packed file loads back to the level's ticket (every mask, companions included) and its trained weights,
    bitwise."""
    from lottery.core.files import load_torch
    ticket, back = load_ticket(level / "ticket.pt"), load_ticket(packed_file)
    assert set(back.masks) == set(ticket.masks) and all(torch.equal(back.masks[k], v) for k, v in ticket.masks.items())
    for state, original in ((back.rewind_state, ticket.rewind_state), (back.trained_state, load_torch(level / "final.pt"))):
        assert list(state) == list(original)
        for k, v in original.items():
            bits = (lambda t: t.view(torch.int32)) if v.dtype == torch.float32 else (lambda t: t)
            assert state[k].dtype == v.dtype and torch.equal(bits(state[k]), bits(v)), k
    return ticket


def _structured(ticket, shape) -> tuple[int, int]:
    """(weights, multiply-adds per example) of a channel ticket as lottery.training.cost counts them structured: a
    removed channel also removes the next layer's inputs it feeds."""
    from lottery.training import cost
    model = build_model(ticket.config["model"]["name"], shape, 10)
    info, masks = cost.model_info(model, shape), {k: v.float() for k, v in ticket.masks.items()}
    return (sum(cost._kept_structured(info, i, masks) for i in range(len(info.layers))),
            cost.macs(info, masks, structured=True))


def test_channel_run_exports_its_packed_ticket_bitwise_and_a_compact_network_of_its_structured_size(channel_run,
                                                                                                    tmp_path):
    out = tmp_path / "exp"
    assert main([str(channel_run), "--level", "1", "--variants", "packed,compact", "--out", str(out),
                 "--min-run-time", "0.01"]) == 0
    level = channel_run / "levels" / "level_1"
    ticket = _assert_packed_round_trip(level, out / "ticket.packed.pt")
    assert {"hidden.0.bias", "hidden.1.bias"} <= set(ticket.masks)  # the companions went through the file
    details = json.loads((out / "export.json").read_text())
    assert details["compact"]["kept_units"] == {"hidden.0": [150, 300], "hidden.1": [50, 100], "out": [10, 10]}
    weights, flops = _structured(ticket, MNIST)
    assert (details["compact"]["compact_weights"], details["compact"]["compact_flops"]) == (weights, flops) == \
        (784 * 150 + 150 * 50 + 50 * 10,) * 2
    rows = {r["variant"].split(" ")[0]: r for r in details["table"]}
    assert rows["compact"]["max_rel_diff"] < 1e-5 and rows["compact"]["accuracy"] == rows["masked"]["accuracy"]
    assert rows["packed"]["weights"] == rows["masked"]["weights"]  # weights, not the bias masks


def test_nm_run_packs_bitwise_and_2_4_says_in_one_line_it_does_not_apply_on_cpu(nm_run, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("2:4 applies on this machine")
    out = tmp_path / "exp"
    assert main([str(nm_run), "--level", "1", "--out", str(out), "--min-run-time", "0.01"]) == 0
    ticket = _assert_packed_round_trip(nm_run / "levels" / "level_1", out / "ticket.packed.pt")
    assert all(nm.is_2to4(m) for m in ticket.masks.values()) and len(ticket.masks) == 3
    notes = [line for line in capsys.readouterr().err.splitlines() if "2:4" in line]
    assert notes == ["note: 2:4 semi-structured sparsity does not apply on cpu: PyTorch's 2:4 kernels are CUDA-only "
                     "(run the export on a GPU machine)"]
    assert main([str(nm_run), "--level", "1", "--variants", "nm", "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "does not apply on cpu" in err and not (tmp_path / "never").exists()


# --- the command line ----------------------------------------------------------------------------------------------

def test_export_help(tmp_path):
    r = _export("--help", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("usage: lottery-export")
    assert "--level" in r.stdout and "--variants" in r.stdout and "packed" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["--level", "5"], "name the level to export (got --level 5); accepted: --level 0, 1"),
    ([], "name the level to export (none given); accepted: --level 0, 1"),
    (["--level", "1", "--variants", "packed,zip"], "unknown variant zip; accepted: packed, compact, csr, nm, onnx"),
    (["--level", "1", "--branch", "reinit"], "--branch 'reinit' cannot be exported"),
    (["--level", "1", "--replicate", "3"], "--replicate 3:"),
    (["--level", "1", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["--level", "1", "--threads", "0"], "--threads 0: must be an integer >= 1"),
    (["--level", "1", "--variants", "compact"], "no whole output rows or channels are pruned"),
    (["--level", "1", "--variants", "nm"], "2:4 semi-structured sparsity does not apply on cpu"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tiny_run, tmp_path, capsys, args, message):
    if "nm" in args and torch.cuda.is_available():
        pytest.skip("2:4 applies on this machine")
    out = tmp_path / "never"
    if "--dtype" in args:  # argparse's own check: its error() exits
        with pytest.raises(SystemExit) as e:
            main([str(tiny_run), *args, "--out", str(out)])
        assert e.value.code == 2
    else:
        assert main([str(tiny_run), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_an_earlier_export_is_never_overwritten(tiny_run, tmp_path, capsys):
    out = tmp_path / "exp"
    assert main([str(tiny_run), "--level", "0", "--variants", "packed", "--out", str(out), "--no-eval"]) == 0
    before = (out / "ticket.packed.pt").read_bytes()
    assert main([str(tiny_run), "--level", "1", "--variants", "packed", "--out", str(out)]) == 2
    assert "already exists; an export never overwrites an earlier one" in capsys.readouterr().err
    assert (out / "ticket.packed.pt").read_bytes() == before


def test_a_ticket_file_a_packed_ticket_and_a_replicate_are_sources_too(tiny_run, tmp_path, capsys):
    import shutil

    from lottery.export.source import resolve
    ticket_file = tiny_run / "levels" / "level_1" / "ticket.pt"
    src = resolve(ticket_file)  # its final.pt beside it: the trained weights
    assert src.trained_state is not None and src.ticket.level == 1
    out = tmp_path / "a"
    assert main([str(ticket_file), "--variants", "packed", "--out", str(out), "--no-eval"]) == 0
    again = resolve(out / "ticket.packed.pt")  # a packed ticket holds its trained weights itself
    assert all(torch.equal(again.trained_state[k], v) for k, v in src.trained_state.items())
    assert main([str(ticket_file), "--level", "1", "--out", str(tmp_path / "b")]) == 2
    assert "--level/--replicate select a level of a run folder" in capsys.readouterr().err
    parent = tmp_path / "replicas"
    shutil.copytree(tiny_run, parent / "replicate_3")
    (parent / "replicas.json").write_text(json.dumps({"replicas": [3], "folders": ["replicate_3"]}))
    assert resolve(parent, level=1, replicate=3).ticket.level == 1
    with pytest.raises(ValueError, match="is a replicas run: name one replicate .none given.; accepted: --replicate 3"):
        resolve(parent, level=1)


def test_unstructured_ticket_end_to_end_writes_the_table_and_says_what_does_not_apply(tiny_run, tmp_path, capsys):
    out = tmp_path / "exp"
    assert main([str(tiny_run), "--level", "1", "--out", str(out), "--min-run-time", "0.01"]) == 0
    captured = capsys.readouterr()
    assert "compact network not written: no whole output rows or channels are pruned" in captured.err
    if not torch.cuda.is_available():
        assert "2:4 semi-structured sparsity does not apply on cpu" in captured.err
    rows = {r["variant"]: r for r in json.loads((out / "export.json").read_text())["table"]}
    assert rows["masked"]["accuracy"] is not None and rows["masked"]["latency_b256_ms"] > 0
    assert rows["dense"]["weights"] == 784 * 300 + 300 * 100 + 100 * 10
    assert rows["masked"]["weights"] == sum(int(m.sum()) for m in load_ticket(
        tiny_run / "levels" / "level_1" / "ticket.pt").masks.values())
    text = (out / "table.md").read_text()
    assert text.startswith("| variant | weights | bytes | latency_b1_ms") and "| masked |" in text
    assert (out / "table.csv").read_text().splitlines()[0].startswith("variant,weights,bytes")


# --- compact networks of channel tickets, on real test images ---------------------------------------------------------

def _trained_channel_ticket(name, shape, x, y, keep, biases, steps=15):
    """`name` trained a few SGD steps on real images, then its lowest-norm rows pruned (lowest_norm_masks)."""
    torch.manual_seed(0)
    model = build_model(name, shape, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for i in range(steps):
        xb, yb = x[i * 32 % len(x):][:32], y[i * 32 % len(y):][:32]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    masks = C.lowest_norm_masks(model, keep, biases=biases)
    M.apply(model, masks)
    return model.eval(), masks


def _real(dataset: str, n: int):
    from lottery.data import load_pool
    pool = load_pool({"name": dataset, "root": str(DATA), "download": False, "val_size": 0, "augment": False,
                      **({"verify": False} if dataset == "cifar10" else {})})
    return pool.x[:512], pool.y[:512], pool.test_x[:n], pool.test_y[:n]


@needs_data("MNIST")
@pytest.mark.parametrize("keep,biases", [(0.25, True), (0.5, False)])
def test_compact_lenet_neuron_ticket_equals_the_masked_network_on_mnist(keep, biases):
    x, y, tx, ty = _real("mnist", 300)
    model, masks = _trained_channel_ticket("lenet_300_100", MNIST, x, y, keep, biases, steps=40)
    small, kept = C.compact(model, masks)
    assert kept["hidden.0"] == (75 if keep == 0.25 else 150, 300) and kept["hidden.1"][0] == round(keep * 100)
    assert small.hidden[0].weight.shape == (kept["hidden.0"][0], 784)
    assert small.hidden[1].weight.shape == (kept["hidden.1"][0], kept["hidden.0"][0])  # the next layer's inputs too
    _same_function(model, small, tx, ty)
    counts = C.count(small, MNIST)
    assert counts["weights"] == 784 * kept["hidden.0"][0] + kept["hidden.0"][0] * kept["hidden.1"][0] + \
        kept["hidden.1"][0] * 10 == counts["flops"]


def _same_function(model, small, tx, ty):
    with torch.no_grad():
        a, b = model(tx), small(tx)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-5
    assert int((a.argmax(1) == ty).sum()) == int((b.argmax(1) == ty).sum())  # the ticket's accuracy
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


@needs_data("cifar-10-batches-py")
@pytest.mark.parametrize("name", ["conv2", "conv4", "conv6", "vgg11"])
def test_compact_conv_and_vgg_channel_tickets_equal_the_masked_network_on_cifar10(name):
    x, y, tx, ty = _real("cifar10", 200)
    model, masks = _trained_channel_ticket(name, CIFAR, x, y, keep=0.5, biases=True, steps=3)
    small, kept = C.compact(model, masks)
    convs = [k for k in kept if "conv" in k]
    assert all(kept[k][0] == kept[k][1] // 2 for k in convs)  # biases and BatchNorm pruned too: every channel goes
    _same_function(model, small, tx, ty)
    dense, counts = C.count(model, CIFAR), C.count(small, CIFAR)
    assert counts["flops"] < 0.3 * dense["flops"]  # half the outputs and half the inputs of each conv: ~1/4


@needs_data("cifar-10-batches-py")
def test_conv_channels_with_a_constant_activation_stay_before_a_conv_and_fold_before_a_linear():
    x, y, tx, ty = _real("cifar10", 200)
    model, masks = _trained_channel_ticket("conv2", CIFAR, x, y, keep=0.5, biases=False, steps=3)
    small, kept = C.compact(model, masks)
    # convs.0 feeds a conv: a pruned filter whose bias passes ReLU is a constant the padding makes position-dependent
    alive = int((torch.relu(model.convs[0].bias[(masks["convs.0.weight"].flatten(1) == 0).all(1)]) > 0).sum())
    assert kept["convs.0"][0] == 32 + alive
    assert kept["convs.1"][0] == 32 and kept["fcs.0"][0] == 128  # before a Linear: folded into its bias
    _same_function(model, small, tx, ty)


def test_export_of_a_neuron_ticket_writes_the_compact_network_and_its_row(tiny_run, tmp_path):
    """A channel ticket by hand (lowest-norm rows of the trained LeNet pruned in the run's level 1 ticket)."""
    from lottery.core.files import load_torch
    level = tiny_run / "levels" / "level_1"
    ticket, trained = load_ticket(level / "ticket.pt"), load_torch(level / "final.pt")
    model = build_model("lenet_300_100", MNIST, 10)
    model.load_state_dict(trained)
    masks = C.lowest_norm_masks(model, 0.25)
    ticket.masks = {n: (ticket.masks[n] & masks[n].bool()) if n in masks else m for n, m in ticket.masks.items()}
    ticket.masks.update({n: m.bool() for n, m in masks.items() if n not in ticket.masks})
    for state in (ticket.rewind_state, trained):
        for n, m in ticket.masks.items():
            state[n] = state[n] * m
    folder = tmp_path / "levels" / "level_1"
    folder.mkdir(parents=True)
    save_ticket(folder / "ticket.pt", ticket)
    save_torch(trained, folder / "final.pt")
    variants = "packed,compact,onnx" if to_onnx.available() is None else "packed,compact"
    assert main([str(folder / "ticket.pt"), "--variants", variants, "--out", str(tmp_path / "exp"),
                 "--min-run-time", "0.01"]) == 0
    rows = {r["variant"]: r for r in json.loads((tmp_path / "exp" / "export.json").read_text())["table"]}
    assert rows["compact"]["max_rel_diff"] < 1e-5 and rows["compact"]["accuracy"] == rows["masked"]["accuracy"]
    assert rows["compact"]["weights"] == 784 * 75 + 75 * 25 + 25 * 10
    assert rows["compact"]["bytes"] < rows["dense"]["bytes"] / 3 and (tmp_path / "exp" / "compact.pt2").exists()
    if "onnx" in variants:
        assert rows["onnx (compact)"]["max_rel_diff"] < 1e-5


@needs_data("MNIST")
def test_lenet_channel_run_on_mnist_exports_a_compact_network_equal_on_real_test_images(tmp_path):
    """A real neuron ticket: 100 steps of LeNet-300-100 on MNIST with pruning.granularity=channel, exported from the
    run folder as a user does; the compact network gives the masked network's outputs on 300 MNIST test images."""
    r = run_cli("model=lenet_300_100", "dataset=mnist", f"dataset.root={DATA}", "dataset.download=false",
                "dataset.val_size=0", "train.duration=100it", "train.eval_every=1000it", "train.batch_size=60",
                "train.progress=false", "checkpoint.every=1000it", "train.estimate=false", "pruning.levels=2",
                "pruning.branches=[]", "pruning.granularity=channel", "pruning.rates.linear=0.5", "hydra.run.dir=run",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "exp"
    e = _export(str(tmp_path / "run"), "--level", "1", "--variants", "packed,compact", "--test-images", "300",
                "--min-run-time", "0.01", "--out", str(out), cwd=tmp_path)
    assert e.returncode == 0, e.stderr[-2000:]
    ticket = _assert_packed_round_trip(tmp_path / "run" / "levels" / "level_1", out / "ticket.packed.pt")
    details = json.loads((out / "export.json").read_text())
    rows = {r["variant"].split(" ")[0]: r for r in details["table"]}
    assert rows["compact"]["max_rel_diff"] < 1e-5 and rows["compact"]["accuracy"] == rows["masked"]["accuracy"] > 0.5
    assert (details["compact"]["compact_weights"], details["compact"]["compact_flops"]) == _structured(ticket, MNIST)


@needs_data("cifar-10-batches-py")
@pytest.mark.parametrize("name", ["conv2", "vgg11"])
@pytest.mark.slow
def test_channel_run_compact_network_equals_the_masked_one_on_cifar10_images(name, tmp_path):
    """A channel ticket of a pruning.granularity=channel run (20 steps on synthetic 3x32x32 data, level 1: 10% of the
    filters and 20% of the neurons pruned, their biases and BatchNorm entries with them) on 200 real CIFAR-10 test
    images: the compact network equals the trained masked network, at the structured weight count and FLOPs."""
    from lottery.export.source import resolve
    r = run_cli("model=" + name, "dataset=synthetic", "dataset.synthetic_shape=cifar10", "dataset.synthetic_train=256",
                "dataset.synthetic_test=64", "dataset.val_size=0", "train.duration=20it", "train.eval_every=1000it",
                "train.batch_size=16", "train.progress=false", "checkpoint.every=1000it", "train.estimate=false",
                "pruning.levels=2", "pruning.branches=[]", "pruning.granularity=channel", "hydra.run.dir=run",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    src = resolve(tmp_path / "run", level=1)
    if name == "vgg11":
        assert {"features.0.bn.weight", "features.0.bn.bias"} <= set(src.ticket.masks)
    masked = src.masked()
    small, kept = C.compact(masked, src.ticket.masks)
    assert all(k < n for path, (k, n) in kept.items() if path != "out")  # every channel-pruned layer lost units
    _, _, tx, ty = _real("cifar10", 200)
    _same_function(masked, small, tx, ty)
    counts = C.count(small, CIFAR)
    assert (counts["weights"], counts["flops"]) == _structured(src.ticket, CIFAR)


def test_resnet20_is_refused_in_one_line():
    model = build_model("resnet20", CIFAR, 10)
    with pytest.raises(C.NotCompactable) as e:
        C.chain(model)
    assert "resnet20 has no compact network here" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_compact_network_loads_in_a_fresh_process_without_lottery(tmp_path):
    torch.manual_seed(0)
    model = build_model("conv2", CIFAR, 10).eval()
    masks = C.lowest_norm_masks(model, 0.25)
    M.apply(model, masks)
    small, _ = C.compact(model, masks)
    C.save_exported(small, CIFAR, tmp_path / "compact.pt2")
    x = torch.randn(3, *CIFAR)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(x), tmp_path / "y.pt")
    _fresh_process(tmp_path, "net = torch.export.load('compact.pt2').module()")


def _fresh_process(folder, load: str):
    """Run `load` then compare net(x.pt) with y.pt in a new interpreter where `import lottery` fails."""
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "lottery" or name.startswith("lottery."):
                    raise ImportError("lottery is not installed here")
        sys.meta_path.insert(0, Block())
        import os
        sys.path = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "lottery"))]
        try:
            import lottery
            sys.exit("lottery imported")
        except ImportError:
            pass
        import torch
        {load}
        x, y = torch.load('x.pt'), torch.load('y.pt')
        out = net(x)
        assert out.shape == y.shape and float((out - y).abs().max() / y.abs().max()) < 1e-5, (out, y)
        assert not any(m.startswith("lottery") for m in sys.modules)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


# --- CSR layers -------------------------------------------------------------------------------------------------------

def _sparse_lenet(density=0.05):
    torch.manual_seed(0)
    model = build_model("lenet_300_100", MNIST, 10).eval()
    masks = {n: (torch.rand(p.shape) < density).float() for n, p in model.named_parameters() if p.dim() > 1}
    M.apply(model, masks)
    return model


def test_csr_is_chosen_per_layer_from_the_measurement(tmp_path):
    model = _sparse_lenet()
    seen = []

    def timer(module, x):  # CSR "faster" only for hidden.1; records what was timed, at which batch
        seen.append((type(module).__name__, tuple(x.shape)))
        if isinstance(module, S.CSRLinear):
            return 1.0 if module.out_features != 100 else 0.5
        return 0.8

    new, rows = S.choose(model, MNIST, 64, timer=timer)
    assert [r["chosen"] for r in rows] == ["dense", "csr", "dense"]
    assert isinstance(new.hidden[1], S.CSRLinear) and isinstance(new.hidden[0], torch.nn.Linear)
    assert ("Linear", (64, 784)) in seen and ("CSRLinear", (64, 300)) in seen and len(seen) == 6
    x = torch.randn(5, *MNIST)
    with torch.no_grad():
        assert float((new(x) - model(x)).abs().max() / model(x).abs().max()) < 1e-5
    new, rows = S.choose(model, MNIST, 64, timer=lambda m, x: 1.0 if isinstance(m, S.CSRLinear) else 0.5)
    assert [r["chosen"] for r in rows] == ["dense"] * 3 and not any(isinstance(m, S.CSRLinear) for m in new.modules())
    # the saved CSR network (TorchScript) runs without lottery
    all_csr, _ = S.choose(model, MNIST, 8, timer=lambda m, x: 0.0 if isinstance(m, S.CSRLinear) else 1.0)
    path, fmt = S.save(all_csr, MNIST, tmp_path)
    assert path.name == "csr.ts" and "TorchScript" in fmt
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(x), tmp_path / "y.pt")
    _fresh_process(tmp_path, "net = torch.jit.load('csr.ts')")


def test_latency_clocks():
    lin, x = torch.nn.Linear(64, 32), torch.randn(8, 64)
    assert 0 < S.median_time(lin, x, 1, 0.01, clock="thread") < 1 and 0 < S.median_time(lin, x, 1, 0.01) < 1
    with pytest.raises(ValueError, match="unknown clock 'cpu'; accepted: wall, thread"):
        S.median_time(lin, x, clock="cpu")
    with pytest.raises(ValueError, match="clock 'thread' measures one thread"):
        S.median_time(lin, x, threads=2, clock="thread")


def test_crossover_reports_the_highest_density_where_csr_was_faster():
    def timer(m, x):  # CSR wins below 10% density in this made-up machine
        d = int(m.weight.values().numel() if isinstance(m, S.CSRLinear) else m.weight.count_nonzero()) / (50 * 40)
        return d if isinstance(m, S.CSRLinear) else 0.1
    result = S.crossover((50, 40), 4, densities=(0.5, 0.2, 0.05, 0.01), timer=timer)
    assert result["crossover"] == 0.05 and [r["density"] for r in result["rows"]] == [0.5, 0.2, 0.05, 0.01]


# --- 2:4 and ONNX -----------------------------------------------------------------------------------------------------

def test_two_four_is_checked_and_applies_only_on_cuda():
    w = torch.tensor([[1.0, 0, 2, 0, 0, 0, 3, 4], [1, 1, 0, 0, 1, 0, 1, 0]])
    assert nm.is_2to4(w) and not nm.is_2to4(torch.ones(2, 8))
    with pytest.raises(nm.NotApplicable, match="does not apply on cpu: PyTorch's 2:4 kernels are CUDA-only"):
        nm.semi_structured(build_model("conv2", CIFAR, 10), "cpu")


@pytest.mark.skipif(to_onnx.available() is not None, reason=str(to_onnx.available()))
def test_onnx_runtime_outputs_equal_pytorchs(tmp_path):
    torch.manual_seed(0)
    model = build_model("lenet_300_100", MNIST, 10).eval()
    masks = C.lowest_norm_masks(model, 0.5)
    M.apply(model, masks)
    small, _ = C.compact(model, masks)
    to_onnx.export(small, MNIST, tmp_path / "m.onnx")
    x = torch.randn(37, *MNIST)
    with torch.no_grad():
        ref = model(x)
    got = to_onnx.run(tmp_path / "m.onnx", x)
    assert got.shape == ref.shape and float((got - ref).abs().max() / ref.abs().max()) < 1e-5


# --- the benchmark's quick mode ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_bench_export_quick(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_export.py"), "--quick", "--out", str(tmp_path)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "bench_export.json").read_text())["rows"]
    tickets = {r["ticket"] for r in rows}
    assert {"lenet neurons 50%", "lenet neurons 25%", "lenet neurons 12.5%", "conv2 channels 50%",
            "conv2 channels 25%", "lenet unstructured 20%", "lenet unstructured 1%"} <= tickets
    for r in rows:
        assert r["bytes"] > 0
        if r["variant"] != "packed":  # a file, not a network
            assert r["latency_b1_ms"] > 0 and r["latency_b256_ms"] > 0
        if r["variant"] in ("compact", "csr"):
            assert r["max_rel_diff"] < 1e-5
    assert (tmp_path / "bench_export.md").read_text().count("\n") > len(tickets)
