"""The device a run trains on, and how it computes there.

- `resolve_device`: `auto`, `cpu`, `cuda`, `cuda:N`, `mps` to a torch.device, with one-line errors that name the
  GPUs this machine has (`check_device` does the same without touching CUDA more than needed, for validation);
- `configure`: precision (`fp32` is true IEEE fp32 on CUDA: TF32 off for cuDNN convolutions and cuBLAS matmuls;
  `tf32` turns TF32 on; `bf16` is autocast) and determinism (on CUDA by default: deterministic cuDNN algorithms, no
  benchmark autotuning, a fixed cuBLAS workspace, `torch.use_deterministic_algorithms(True, warn_only=True)`);
  nothing changes on the CPU, whose results are deterministic already;
- `device_info`: what the run really ran on (device type, GPU name, compute capability, torch, CUDA and cuDNN
  versions), stored in checkpoints, in every result record and in `<run>/device.json`;
- `check_resume`: what a restart on other hardware does (see `check_resume`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# cuBLAS needs a fixed workspace to be deterministic (see PyTorch's "Reproducibility" notes); it reads this once,
# when the process first uses cuBLAS, so `configure` sets it before any work (unless the user already set it).
CUBLAS_WORKSPACE = ":4096:8"


# --- which device ----------------------------------------------------------------------------------------------------


def _cuda_devices() -> list[str]:
    """'cuda:0 (NVIDIA A100-SXM4-80GB)', ... for every GPU this process can see (CUDA_VISIBLE_DEVICES applies)."""
    if not torch.cuda.is_available():
        return []
    return [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def _accepted_here() -> str:
    names = ["auto", "cpu"]
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n:
        names += ["cuda", *(f"cuda:{i}" for i in range(n))]
    if _mps_available():
        names.append("mps")
    return ", ".join(names)


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when present, else the CPU) or an explicit device that must exist on this machine.

    Raises ValueError with one line naming the devices there are, e.g. for cuda:7 on a two-GPU machine."""
    name = str(name).strip()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device '{name}'; accepted here: {_accepted_here()}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device '{name}' was asked for but CUDA is not available on this machine (no GPUs "
                f"visible); accepted here: {_accepted_here()}"
            )
        n = torch.cuda.device_count()
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= n:
            raise ValueError(
                f"device '{name}' is not on this machine, which has {n} GPU{'s' * (n != 1)}: "
                f"{', '.join(_cuda_devices())} (indices count the GPUs in CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); accepted here: "
                f"{_accepted_here()}"
            )
        return torch.device("cuda", index)
    if dev.type == "mps" and not _mps_available():
        raise ValueError(f"device '{name}' was asked for but MPS is not available; accepted here: {_accepted_here()}")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device '{name}'; accepted here: {_accepted_here()}")
    return dev


def check_device(name: str) -> None:
    """Validation before any work: the same errors as `resolve_device`."""
    resolve_device(name)


def gpu_count() -> int:
    """GPUs this process can see (0 without CUDA): `launcher=submitit_local` gives its jobs this many."""
    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken driver means: no GPUs to hand out
        return 0


def local_gpus() -> int:
    """`hydra.launcher.gpus_per_node` of launcher=submitit_local: every GPU this machine lets the launcher see.

    submitit's local executor sets CUDA_VISIBLE_DEVICES=0..N-1 for its jobs, replacing the launching shell's value:
    a shell restricted to other GPUs (CUDA_VISIBLE_DEVICES=2,3) gets the first N instead, so say so."""
    n = gpu_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if n and visible is not None and visible.replace(" ", "") != ",".join(map(str, range(n))):
        log.warning(
            "launcher=submitit_local: submitit gives its jobs CUDA_VISIBLE_DEVICES=%s, not this shell's %s",
            ",".join(map(str, range(n))),
            visible,
        )
    return n


def local_job_device(job_num) -> str:
    """`launcher=submitit_local`: job n of a sweep trains on GPU n mod (number of GPUs), or `auto` without GPUs.

    submitit's local executor shows every job the same first `gpus_per_node` GPUs; spreading jobs over them by job
    number is what gives each job its own GPU (as long as there are at least as many GPUs as parallel jobs)."""
    n = gpu_count()
    if n == 0:
        return "auto"
    try:
        k = int(job_num)
    except (TypeError, ValueError):
        k = 0
    return f"cuda:{k % n}"


# --- how it computes -------------------------------------------------------------------------------------------------


def configure(device: torch.device, precision: str = "fp32", deterministic: bool = True) -> list[str]:
    """Set PyTorch's process-wide precision and determinism switches for a run on `device`; returns warnings.

    CUDA only (the CPU is left exactly as it was, so CPU results do not change):
      fp32  cuDNN convolutions and cuBLAS matmuls in IEEE fp32 (PyTorch 2.14 runs cuDNN convolutions in TF32 by
            default on Ampere and newer GPUs);
      tf32  both in TF32 (about 1e-3 relative error per product; faster on Ampere and newer);
      bf16  autocast to bfloat16 (applied by the training loop); fp32 parts stay IEEE fp32.
    Only the `fp32_precision` API is used: mixing it with the legacy `allow_tf32` flags makes PyTorch raise.
    """
    warnings: list[str] = []
    if device.type != "cuda":
        if precision == "tf32":
            warnings.append(f"train.precision=tf32 has no effect on {device.type}; computing in fp32")
        return warnings
    tf32 = "tf32" if precision == "tf32" else "ieee"
    torch.backends.cudnn.conv.fp32_precision = tf32  # type: ignore[attr-defined]  # in torch, not in its stubs
    torch.backends.cuda.matmul.fp32_precision = tf32
    if deterministic:
        if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        # warn_only: an op without a deterministic CUDA version warns (once) instead of stopping the run
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Filling every new tensor with NaN guards against reading uninitialized memory (a bug, not a source of
        # nondeterminism in correct code) and costs a kernel per allocation: off.
        torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]  # not in stubs
    else:
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
        torch.use_deterministic_algorithms(False)
    if precision == "bf16":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            warnings.append(
                f"train.precision=bf16 on {torch.cuda.get_device_name(device)} (compute capability "
                f"{major}.{minor}, older than Ampere's 8.0): this GPU has no bfloat16 units, so bf16 is "
                f"emulated (slower than fp32) and some cuDNN convolutions may refuse it; use "
                f"train.precision=fp32 on this GPU"
            )
    return warnings


def device_info(device: torch.device) -> dict:
    """What a run ran on: stored in checkpoints, result records and <run>/device.json."""
    info = {
        "type": device.type,
        "device": str(device),
        "name": None,
        "capability": None,
        "torch": str(torch.__version__),
        "cuda": torch.version.cuda,
        "cudnn": None,
    }  # plain str: weights_only
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        info.update(
            name=torch.cuda.get_device_name(index), capability=f"{major}.{minor}", cudnn=torch.backends.cudnn.version()
        )
    elif device.type == "cpu":
        info["name"] = _cpu_name()
    return info


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(info: dict, precision: str = "fp32", deterministic: bool = True) -> str:
    """One line for the log: where and how this run computes."""
    if info["type"] == "cuda":
        where = (
            f"{info['device']} ({info['name']}, compute capability {info['capability']}), torch {info['torch']},"
            f" CUDA {info['cuda']}, cuDNN {info['cudnn']}"
        )
        how = {"fp32": "fp32 (TF32 off)", "tf32": "tf32", "bf16": "bf16 autocast"}.get(precision, precision)
        how += ", deterministic" if deterministic else ", nondeterministic (deterministic=false)"
    else:
        where = f"{info['device']} ({info['name']}), torch {info['torch']}"
        how = {"bf16": "bf16 autocast"}.get(precision, "fp32")
    return f"device: {where}; precision {how}"


# --- the record, and restarts on other hardware ----------------------------------------------------------------------

# What must match for a resumed run to continue bit-identically.
_SAME_RESULTS = ("type", "name", "torch", "cuda", "cudnn")


def differences(old: dict | None, new: dict) -> list[str]:
    """The fields of _SAME_RESULTS that differ (on the CPU the build's CUDA and cuDNN versions do not matter)."""
    if not old:
        return []
    keys: tuple[str, ...]
    if "cuda" in (old.get("type"), new.get("type")):
        keys = _SAME_RESULTS
    else:  # CPU kernels split their sums by thread, so the count matters (folders from before it was recorded: not)
        keys = ("type", "name", "torch") + (("threads",) if "threads" in old and "threads" in new else ())
    # replicas trained another way (stacked, interleaved, sequential) sum in another order: round-off differs
    keys += ("batching",) if "batching" in old and "batching" in new else ()
    return [k for k in keys if old.get(k) != new.get(k)]


def _short(info: dict) -> str:
    if info.get("type") == "cuda":
        return f"{info.get('name')} (torch {info.get('torch')}, CUDA {info.get('cuda')}, cuDNN {info.get('cudnn')})"
    threads = f", {info['threads']} threads" if "threads" in info else ""
    batching = f", replicas {info['batching']}" if "batching" in info else ""
    return f"{info.get('type')} (torch {info.get('torch')}{threads}{batching})"


def check_resume(old: dict | None, new: dict, requested: str) -> str | None:
    """Compare the device a run folder last ran on with this start's; returns a warning, raises to refuse.

    Refused: `device=auto` that would continue a GPU run on another device type (a requeue onto a node without a
    GPU would otherwise train on the CPU, silently and typically 10-100x slower). Asking for the device explicitly
    (`device=cpu`) continues it there. Warned: any other change (another GPU model, torch, CUDA or cuDNN version,
    or an explicit change of device type): the run continues correctly but is no longer bit-identical to an
    uninterrupted run; refusing would make every requeue of a SLURM job onto another GPU type fail."""
    diff = differences(old, new)
    if not diff:
        return None
    assert old is not None  # differences() finds none without an old record
    if "type" in diff and str(requested).strip() == "auto":
        raise ValueError(
            f"this run folder last ran on {_short(old)} and device=auto now resolves to {new['type']}; "
            f"refusing to continue silently on other hardware. Run it where a {old['type']} device is, "
            f"or pass device={new['type']} to continue on {new['type']} deliberately"
        )
    return (
        f"this run folder last ran on {_short(old)} and continues on {_short(new)} (differs in "
        f"{', '.join(diff)}): results stay valid, but are no longer bit-identical to an uninterrupted run; "
        f"each result record's device_info says where it finished"
    )


def setup(cfg) -> tuple[torch.device, dict, list[str], str]:
    """Resolve the run's device and configure precision and determinism; returns (device, device_info, warnings, a
    line saying where and how the run computes). Logs nothing itself: a run logs once it owns its folder."""
    device = resolve_device(cfg.device)
    precision = cfg.train.precision
    deterministic = bool(cfg.get("deterministic", True))
    warnings = configure(device, precision, deterministic)
    info = device_info(device)
    return device, info, warnings, describe(info, precision, deterministic)


def check_folder(run_dir: Path, info: dict, requested: str) -> str | None:
    """Compare the device a run folder last ran on (`<run_dir>/device.json`) with this start's: raise to refuse, or
    return a warning (`check_resume`). Writes and logs nothing: the caller records `info` once every check passed."""
    path = Path(run_dir) / "device.json"
    from lottery.core.files import load_json

    old = load_json(path, expect=dict) if path.exists() or path.is_symlink() else None  # damaged: one line (Damaged)
    return check_resume(old, info, requested)
