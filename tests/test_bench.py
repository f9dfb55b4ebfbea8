"""The speed benchmark keeps running (a few steps on synthetic data), and torch.compile keeps masks intact."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from lottery.config import Config
from lottery.core.steps import Steps
from lottery.data import Batches, load_pool, split
from lottery.models import build_model
from lottery.training import Hooks, Network, train

from conftest import REPO

SYNTHETIC = {"name": "synthetic", "val_size": 64, "synthetic_train": 512, "synthetic_test": 64}


@pytest.mark.slow
def test_bench_quick_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--quick", "--device", "cpu",
                           "--threads", "1", "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["quick"] and results["data"] == "synthetic" and results["device"] == "cpu"
    assert results["threads"] == 1
    assert set(results["workloads"]) == {"lenet_mnist", "conv2_cifar10"}
    for wl in results["workloads"].values():
        assert set(wl["train"]) == {"project", "plain", "floor"} and set(wl["eval"]) == {"project", "plain"}
        assert all(v["samples_per_s"] > 0 for kind in ("train", "eval") for v in wl[kind].values())
        assert set(wl["train_ratios"]) == {"project/plain", "project/floor"}
        assert set(wl["eval_ratios"]) == {"project/plain"}
    assert results["startup"]["total_s"] > 0
    # the targets are listed, but not judged on synthetic data
    assert len(results["targets"]) == 5 and not any(t.get("applies", True) for t in results["targets"])
    assert "project/this" in proc.stdout and "startup" in proc.stdout


@pytest.mark.slow
def test_bench_synflow_quick_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--synflow", "--quick", "--out",
                           str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    res = results["synflow"]
    assert results["threads"] == res["threads"] == 1 and set(res["models"]) == {"lenet_300_100", "resnet20"}
    for r in res["models"].values():
        assert r["rounds"] == 20 and r["repeats"] == 1 and r["ratio"] > 0 and r["cpu_ratio"] > 0
        assert r["kept"]["project"] == round(0.01 * r["kept"]["of"]) and r["kept"]["both"] > 0
    assert [t["what"] for t in res["targets"]] == ["lenet_300_100 SynFlow reference/project",
                                                   "resnet20 SynFlow reference/project"]
    assert "ref/project" in proc.stdout and "resnet20" in proc.stdout


def _have_cxx() -> bool:
    return any(shutil.which(c) for c in ("c++", "g++", "gcc", "clang++", "clang"))


@pytest.mark.skipif(not _have_cxx(), reason="torch.compile on the CPU needs a C++ compiler (none on PATH)")
@pytest.mark.slow
def test_compile_keeps_masked_weights_exactly_zero():
    torch._dynamo.reset()
    pool = load_pool(SYNTHETIC, seed=0)
    model = build_model("mlp", pool.input_shape, pool.num_classes, hidden=[32])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    masks = {n: (torch.rand(p.shape, generator=g) < 0.2).float()
             for n, p in model.named_parameters() if n.endswith("weight")}
    cfg = OmegaConf.structured(Config)
    cfg.optimizer = {"name": "adam", "lr": 1e-2}
    cfg.train.batch_size, cfg.train.eval_every, cfg.train.progress, cfg.train.compile = 32, "5it", False, True
    from torch._dynamo.utils import counters
    counters.clear()
    batches = Batches(split(pool, 64, 0), cfg.train.batch_size, seed=0)
    (result,) = train([Network(model, masks, batches)], cfg, start=0, end=6,
                      steps=Steps.resolve(cfg, batches.steps_per_epoch))
    assert counters["stats"]["unique_graphs"] >= 1, "torch.compile did not compile anything"
    assert result["final_step"] == 6 and result["test_accuracy"] is not None
    for n, p in model.named_parameters():
        if n in masks:
            pruned = masks[n] == 0
            assert torch.all(p.detach()[pruned] == 0), n  # exactly zero, not a tiny leftover
            kept = ~pruned
            assert not torch.equal(p.detach()[kept], before[n][kept]), f"{n}: kept weights did not train"


@pytest.mark.skipif(not _have_cxx(), reason="torch.compile on the CPU needs a C++ compiler (none on PATH)")
@pytest.mark.parametrize("layout", ["stacked", "interleaved"])
def test_compiled_batched_run_keeps_masks_and_names(layout):
    """train.compile=true in a batched run: something compiles, pruned weights stay exactly zero, and every network's
    state comes back under the single model's parameter names."""
    torch._dynamo.reset()
    pool = load_pool(SYNTHETIC, seed=0)
    cfg = OmegaConf.structured(Config)
    cfg.optimizer = {"name": "adam", "lr": 1e-2}
    cfg.train.batch_size, cfg.train.duration, cfg.train.eval_every = 32, "6it", "3it"
    cfg.train.progress, cfg.train.compile = False, True
    networks, before = [], []
    for s in range(2):
        torch.manual_seed(s)
        model = build_model("mlp", pool.input_shape, pool.num_classes, hidden=[32])
        g = torch.Generator().manual_seed(s)
        masks = {n: (torch.rand(p.shape, generator=g) < 0.2).float()
                 for n, p in model.named_parameters() if n.endswith("weight")}
        before.append({n: p.detach().clone() for n, p in model.named_parameters()})
        networks.append(Network(model, masks, Batches(split(pool, 64, s), cfg.train.batch_size, seed=s), Hooks()))
    from torch._dynamo.utils import counters
    counters.clear()
    results = train(networks, cfg, start=0, steps=Steps.resolve(cfg, 448 // 32), layout=layout)
    assert counters["stats"]["unique_graphs"] >= 1, "torch.compile did not compile anything"
    assert len(results) == len(networks)
    for m, b, r in zip(networks, before, results):
        assert r["final_step"] == 6 and r["test_accuracy"] is not None
        assert m.model.state_dict().keys() == b.keys()
        for n, p in m.model.named_parameters():
            if n in m.masks:
                pruned = m.masks[n] == 0
                assert torch.all(p.detach()[pruned] == 0), n
                assert not torch.equal(p.detach()[~pruned], b[n][~pruned]), f"{n}: kept weights did not train"


@pytest.mark.slow
def test_gpu_replicas_script_dry_run(tmp_path):
    """scripts/gpu_replicas.py (the GPU check of batched replicas) runs end to end in its CPU dry mode: the replicas
    benchmark at R = 1, 2 and a two-level lth_lenet_mnist with 5 replicates and the reinit control."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_replicas.py"), "--dry", "--workloads",
                           "lenet_mnist", "--work-dir", str(tmp_path / "work"), "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                            "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    by_r = results["bench"]["replicas"]["lenet_mnist"]["by_replicas"]
    assert set(by_r) == {"1", "2"} and all(v["batched"]["samples_per_s"] > 0 for v in by_r.values())
    e = results["experiment_replicas"]
    assert e["replicates"] == 5 and e["levels"] == 2 and len(e["final_level_test_accuracy"]["reinit"]) == 5


def test_bench_quick_judges_no_target_even_on_real_data():
    """Quick mode checks that things run; its numbers measure no speed, so no target is met or MISSED there."""
    sys.path.insert(0, str(REPO / "scripts"))
    import bench
    results = {"quick": True, "data": "/real/data", "date": "d", "machine": "m", "torch": "t", "device": "cpu",
               "threads": 1, "repeats": 1, "loadavg_start": [0.0, 0.0, 0.0],
               "startup": {"import_s": 3.0, "data_s": 3.0, "first_step_s": 3.0, "total_s": 9.0, "process_wall_s": 9.5},
               "workloads": {"lenet_mnist": {"train_ratios": {"project/plain": 0.5, "project/floor": 0.1},
                                             "eval_ratios": {"project/plain": 0.1},
                                             "train": {"project": {"samples_per_s": 1, "min": 1, "max": 1}},
                                             "eval": {"project": {"samples_per_s": 1, "min": 1, "max": 1}}}}}
    results["targets"] = bench.check_targets(results, torch.device("cpu"))
    assert results["targets"] and not any(t.get("applies", True) for t in results["targets"])
    table = bench.format_table(results)
    assert "MISSED" not in table and "met" not in table.replace("measurements", "")
    assert bench.QUICK_NOTE in table and "quick mode: not a speed measurement" in table
    results["quick"] = False
    results["targets"] = bench.check_targets(results, torch.device("cpu"))
    assert "MISSED" in bench.format_table(results)  # a real run on the real data is judged


@pytest.mark.slow
def test_bench_busy_and_units_quick_run(tmp_path):
    """--busy (lottery-train next to a competing process, under PyTorch's default, the wait policy alone, lottery's
    default and threads=1) and --units (many tiny units, split by where the time goes; here next to the competing
    process) run end to end, in quick mode. The "pair" scenario is the same measurement with two runs started
    together (8 more processes, 40 s of this test): left to the benchmark itself."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--quick", "--busy", "--busy-scenarios",
                           "competitor", "--units", "--units-busy", "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    busy = results["busy"]["scenarios"]
    assert set(busy) == {"competitor"}
    for s in busy.values():
        assert set(s["unit_s"]) == {"pytorch", "passive", "default", "threads1"}
        assert all(v > 0 for v in s["unit_s"].values())
        assert s["pytorch/default"] > 0 and s["passive/default"] > 0 and s["threads1/default"] > 0
    assert results["units"]["busy"] is True and "next to a CPU-bound process" in proc.stdout
    units = results["units"]["variants"]["head threads=default"]
    assert units["units"] == 7 and units["per_unit_s"] > 0  # 3 levels: 1 + 2 x 3 units
    split = units["split_per_unit_s"]
    # from lottery's spans under torch.profiler (lottery.core.spans), nothing of the run replaced
    assert split["steps: forward and backward"] > 0 and split["steps: data"] > 0 and split["evaluation"] > 0
    assert split["steps: masking"] > 0 and split["steps: optimizer step"] > 0
    assert abs(sum(split.values()) - units["per_unit_s"]) < 1e-9  # the parts add up to the unit
    assert "pytorch/default" in proc.stdout and "per unit, by where the time goes" in proc.stdout
    assert "quick mode" in proc.stdout and "MISSED" not in proc.stdout
