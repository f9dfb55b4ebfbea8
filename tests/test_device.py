"""Issue 15 on the CPU: data order independent of the device, device validation and record, precision and
determinism switches, evaluation chunking, fused optimizers on CUDA and submitit_local GPUs. The GPU check script's
run on the CPU is in test_commands.py.

The CUDA paths themselves need a GPU: scripts/gpu_check.py runs them there. Here they are driven with the data on
the `meta` device (the code path every non-CPU device takes) and with torch's CUDA switches, which exist on CPU
builds too."""
from __future__ import annotations

import hashlib
import json
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import lottery.data as D
import lottery.data.batches as DB
import lottery.training.evaluation as E
from lottery.core import device as dev
from lottery.data import Batches, Pool, Split, draw_epoch
from lottery.experiment import run_experiment
from lottery.models import build_model
from lottery.training import EVAL_CHUNK, evaluate, make_optimizer

from conftest import CONF, fault, run_cli, stable, tiny_cfg


def indexed(device="cpu", augment=True, n=100):
    """n images whose label is their index, all of them training rows in pool order (an index is a pool row), no
    validation rows, the first 10 as test set."""
    g = torch.Generator().manual_seed(123)
    x = torch.rand(n, 3, 32, 32, generator=g) + 0.5
    y = torch.arange(n)
    pool = Pool(x.to(device), y.to(device), x[:10].to(device), y[:10].to(device), num_classes=n,
                input_shape=(3, 32, 32), augment=augment)
    return Split(pool, train_idx=torch.arange(n).to(device), val_idx=torch.arange(0).to(device))


# --- data order --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("augment,digest", [(False, "a42d2b47145ac90e"), (True, "7957cf109eccb81d")])
def test_cpu_batches_are_todays(augment, digest):
    """The first 20 batches (three epochs) of a seed, images and labels, hash to what the code before issue 15 gave
    (digests recorded with the previous lottery/data.py): CPU runs keep their data, augmented or not."""
    b = Batches(indexed(augment=augment), 16, seed=7)
    h = hashlib.sha256()
    for t in range(20):
        x, y = b.get(t)
        h.update(x.numpy().tobytes())
        h.update(y.numpy().tobytes())
    assert h.hexdigest()[:16] == digest


@pytest.mark.parametrize("augment", [False, True])
def test_batches_drawn_the_same_whatever_the_device(augment, monkeypatch):
    """With the data on `meta` (the path a GPU takes: drawn on the CPU, then copied to the data's device), the
    permutation and augmentation values sent to the device are exactly the CPU run's, epoch by epoch."""
    sent = {"cpu": [], "meta": []}
    real = D.to_device

    def spy(t, device):
        sent[torch.device(device).type].append(t.clone())
        return real(t, device)

    monkeypatch.setattr(DB, "to_device", spy)  # what Batches calls (lottery.data.batches)
    steps = [0, 3, 6, 7, 13, 14, 500, 1]  # across epochs (6 steps each), a far one (a resume), and back
    on_cpu = Batches(indexed("cpu", augment), 16, seed=7)
    on_meta = Batches(indexed("meta", augment), 16, seed=7)
    for t in steps:
        x, y = on_cpu.get(t)
        xm, ym = on_meta.get(t)
        assert xm.device.type == "meta" and xm.shape == x.shape and ym.shape == y.shape
    assert len(sent["cpu"]) == len(sent["meta"]) >= (10 if augment else 5)  # one draw per epoch change
    for a, b in zip(sent["cpu"], sent["meta"]):
        assert a.device.type == "cpu" and torch.equal(a, b)
    # and those values are what the CPU batches hold: the labels are the indices
    drawn = draw_epoch(7, 1, 100, 16, augment)
    assert torch.equal(on_cpu.get(6 + 2)[1], drawn["perm"][32:48])


def test_draw_epoch_is_cpu_only_and_leaves_global_rng():
    state = torch.get_rng_state()
    d = draw_epoch(3, 2, 1000, 60, True)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(v.device.type == "cpu" for v in d.values())
    assert d["perm"].shape == (1000,) and d["flip"].shape == (16, 60) and d["offsets"].shape == (16, 2, 60)
    assert d["flip"].dtype == torch.bool and 0 <= d["offsets"].min() and d["offsets"].max() <= 8
    assert torch.equal(d["perm"].sort().values, torch.arange(1000))


def test_to_device_on_cpu_is_a_no_op():
    t = torch.arange(5)
    assert D.to_device(t, torch.device("cpu")) is t


# --- device validation ---------------------------------------------------------------------------------------------

def test_bad_device_is_one_error_line_before_any_work(tmp_path):
    r = run_cli("dataset=synthetic", "device=cuda:7", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "cuda:7" in errors[0] and "CUDA is not available" in errors[0] and "accepted here: auto, cpu" in errors[0]
    assert not (tmp_path / "run" / "levels").exists() and not (tmp_path / "run" / "device.json").exists()


def test_bad_gpu_index_names_the_gpus_there_are(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: f"Fake GPU {i}")
    with pytest.raises(ValueError) as e:
        dev.resolve_device("cuda:7")
    msg = str(e.value)
    assert "device 'cuda:7' is not on this machine, which has 2 GPUs: cuda:0 (Fake GPU 0), cuda:1 (Fake GPU 1)" in msg
    assert "accepted here: auto, cpu, cuda, cuda:0, cuda:1" in msg and "\n" not in msg
    assert dev.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert dev.resolve_device("auto") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="unknown device 'cuda:x'"):
        dev.resolve_device("cuda:x")


def test_auto_is_cpu_here():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert dev.resolve_device("auto") == torch.device("cpu")


# --- precision and determinism ---------------------------------------------------------------------------------------

@pytest.fixture
def restore_backends():
    saved = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved[:2]
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2:4]
    torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])
    torch.utils.deterministic.fill_uninitialized_memory = saved[6]
    if saved[7] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[7]


def _switches():
    return (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
            torch.are_deterministic_algorithms_enabled())


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_configure_leaves_the_cpu_alone(precision, restore_backends):
    before = _switches()
    warnings = dev.configure(torch.device("cpu"), precision, deterministic=True)
    assert _switches() == before
    assert bool(warnings) == (precision == "tf32")


def test_configure_cuda_fp32_is_ieee_and_deterministic(restore_backends, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cuda = torch.device("cuda", 0)
    assert dev.configure(cuda, "fp32", deterministic=True) == []
    assert _switches() == ("ieee", "ieee", True, False, True)
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == dev.CUBLAS_WORKSPACE
    assert torch.get_float32_matmul_precision() == "highest"  # the new API only: PyTorch's mixing check is quiet
    dev.configure(cuda, "tf32", deterministic=False)
    assert _switches() == ("tf32", "tf32", False, True, False)


def test_bf16_before_ampere_warns(restore_backends, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    (warning,) = dev.configure(torch.device("cuda", 0), "bf16", deterministic=True)
    assert "Tesla T4" in warning and "7.5" in warning and "emulated" in warning and "train.precision=fp32" in warning
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    assert dev.configure(torch.device("cuda", 0), "bf16", deterministic=True) == []


def test_tf32_on_the_cpu_is_fp32(tmp_path):
    a = run_experiment(tiny_cfg("device=cpu", "pruning=none"), tmp_path / "a")
    b = run_experiment(tiny_cfg("device=cpu", "pruning=none", "train.precision=tf32"), tmp_path / "b")
    assert [r["test_loss"] for r in a] == [r["test_loss"] for r in b]


OPTIMIZER_NODES = {"sgd": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0},
                   "adam": {"name": "adam", "lr": 0.1, "betas": [0.9, 0.999], "weight_decay": 0.0},
                   "adamw": {"name": "adamw", "lr": 0.1, "betas": [0.9, 0.999], "weight_decay": 0.0}}


def test_optimizer_kind_per_device():
    p = [torch.zeros(3, requires_grad=True)]
    for name in ("sgd", "adam", "adamw"):
        ocfg = OmegaConf.create(OPTIMIZER_NODES[name])
        cpu = make_optimizer(p, ocfg, torch.device("cpu"))
        assert cpu.defaults["foreach"] and not cpu.defaults.get("fused")
        assert make_optimizer(p, ocfg).defaults["foreach"]  # no device: the CPU's
        cuda = make_optimizer(p, ocfg, "cuda")
        assert cuda.defaults["fused"] and not cuda.defaults.get("foreach")


# --- evaluation chunks -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["lenet_300_100", "conv2"])
@pytest.mark.slow
def test_chunked_evaluation_matches_one_forward(model, monkeypatch):
    g = torch.Generator().manual_seed(0)
    shape = (1, 28, 28) if model == "lenet_300_100" else (3, 32, 32)
    n = 2 * EVAL_CHUNK + (0 if model == "lenet_300_100" else -EVAL_CHUNK + 200)  # LeNet: 2000; Conv-2: 1200
    x, y = torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)
    net = build_model(model, shape, 10)
    assert E.eval_chunk(net, "cpu") == (1000 if model == "lenet_300_100" else 100)
    assert E.eval_chunk(net, "cuda") == 1000
    metrics = evaluate(net, x, y, 10000)
    loss, acc = metrics["loss"], metrics["accuracy"]
    assert set(metrics) == {"loss", "accuracy"}
    with torch.inference_mode():
        out = net.eval()(x)
    assert acc == (out.argmax(1) == y).sum().item() / n
    assert loss == pytest.approx(F.cross_entropy(out, y, reduction="sum").item() / n, rel=1e-6)
    assert evaluate(net, x, y, 10000) == {"loss": loss, "accuracy": acc}
    # the CPU's smaller chunks for conv models change nothing: chunks of 1000 give the same bits
    monkeypatch.setattr(E, "CPU_CONV_EVAL_CHUNK", 1000)
    assert E.eval_chunk(net, "cpu") == 1000
    assert evaluate(net, x, y, 10000) == {"loss": loss, "accuracy": acc}


# --- the device record -----------------------------------------------------------------------------------------------

def test_device_recorded_and_logged(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        records = run_experiment(tiny_cfg("device=cpu", "pruning.levels=2"), tmp_path / "run")
    info = json.loads((tmp_path / "run" / "device.json").read_text())
    assert info["type"] == "cpu" and info["torch"] == torch.__version__ and info["name"]
    assert all(r["device_info"] == info for r in records)
    assert any(m.startswith(f"run folder {tmp_path / 'run'}; device: cpu (") for m in caplog.messages)


@pytest.mark.slow
def test_checkpoint_records_device(tmp_path):
    run_dir = tmp_path / "run"
    fault_args, env = fault({"OMP_NUM_THREADS": "1"}, kill_at=30, level=0)
    r = run_cli("dataset=synthetic", "train.duration=60it", "train.eval_every=20it", "train.batch_size=32",
                "train.progress=false", "checkpoint.every=20it", "device=cpu", *fault_args,
                f"hydra.run.dir={run_dir}", cwd=tmp_path, env=env)
    assert r.returncode == -9, r.stderr
    state = torch.load(run_dir / "levels" / "level_0" / "ticket" / "checkpoint.pt", weights_only=False)
    assert state["device_info"] == json.loads((run_dir / "device.json").read_text())
    assert "device: cpu (" in r.stdout + r.stderr


GPU = {"type": "cuda", "device": "cuda:0", "name": "NVIDIA A100-SXM4-80GB", "capability": "8.0", "torch": "2.14.1",
       "cuda": "13.0", "cudnn": 91000}


def test_resume_policy():
    other_gpu = {**GPU, "name": "Tesla T4", "capability": "7.5"}
    cpu = dev.device_info(torch.device("cpu"))
    assert dev.check_resume(None, GPU, "auto") is None
    assert dev.check_resume(GPU, {**GPU, "device": "cuda:3"}, "auto") is None  # another index of the same model
    assert "Tesla T4" in dev.check_resume(GPU, other_gpu, "auto")  # warned
    assert "torch" in dev.check_resume(GPU, {**GPU, "torch": "2.15.0"}, "cuda")
    with pytest.raises(ValueError, match="device=auto now resolves to cpu"):
        dev.check_resume(GPU, cpu, "auto")
    assert "bit-identical" in dev.check_resume(GPU, cpu, "cpu")  # asked for explicitly: warned
    assert dev.check_resume(cpu, {**cpu, "cuda": None}, "auto") is None  # a CPU run ignores the build's CUDA


def test_resume_of_a_gpu_run_on_a_cpu_node(tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "device.json").write_text(json.dumps(GPU))
    with pytest.raises(ValueError, match="last ran on NVIDIA A100-SXM4-80GB"):
        run_experiment(tiny_cfg("device=auto", "pruning=none"), run_dir)
    with caplog.at_level(logging.WARNING, logger=dev.log.name):
        records = run_experiment(tiny_cfg("device=cpu", "pruning=none"), run_dir)
    assert any("continues on cpu" in m for m in caplog.messages)
    assert records[0]["device_info"]["type"] == "cpu"
    assert json.loads((run_dir / "device.json").read_text())["type"] == "cpu"


def test_deterministic_key_does_not_block_resume(tmp_path):
    """`deterministic` says how CUDA computes, not what the experiment is: a changed value resumes the folder (here it
    finds the run done and trains nothing again)."""
    first = run_experiment(tiny_cfg("device=cpu", "pruning=none"), tmp_path / "run")
    result = tmp_path / "run" / "levels" / "level_0" / "ticket" / "result.json"
    before = (result.read_bytes(), result.stat().st_mtime_ns)
    again = run_experiment(tiny_cfg("device=cpu", "pruning=none", "deterministic=false"), tmp_path / "run")
    assert stable(again) == stable(first) and len(again) == 1
    assert (result.read_bytes(), result.stat().st_mtime_ns) == before  # resumed and found done: nothing retrained


# --- submitit_local --------------------------------------------------------------------------------------------------

def test_submitit_local_gives_jobs_gpus(monkeypatch):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["launcher=submitit_local"], return_hydra_config=True)
    assert OmegaConf.select(cfg, "hydra.launcher.gpus_per_node") == dev.gpu_count()
    monkeypatch.setattr(dev, "gpu_count", lambda: 3)
    assert [dev.local_job_device(k) for k in range(5)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:0", "cuda:1"]
    monkeypatch.setattr(dev, "gpu_count", lambda: 0)
    assert dev.local_job_device(4) == "auto"
