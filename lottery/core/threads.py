"""CPU threads: how many PyTorch uses, and how its threads wait for each other.

PyTorch runs each operation on the CPU as an OpenMP parallel region, and its threads wait for each other at the
region's end. By default (no OMP_WAIT_POLICY) the GNU OpenMP runtime that PyTorch's Linux wheels load lets a waiting
thread spin for about 300,000 iterations (milliseconds) before it sleeps. On a quiet machine that saves a wake-up per
operation; next to any other busy process (another run, a test suite, a browser) the spinning threads take the cores
the thread being waited for needs, and every operation stalls: measured on the 2-core development machine, a LeNet-300-100
step took 10-60x longer with 2 threads next to one busy process than alone. Two defaults, each applied only where the
user has not chosen:

- `default_wait_policy()`, called by the entry points (lottery-train, lottery-retrain) before torch is imported, since
  OpenMP reads its environment once, when torch loads it: OMP_WAIT_POLICY=PASSIVE unless the environment already says
  how OpenMP threads wait (OMP_WAIT_POLICY, or the GNU and Intel runtimes' own GOMP_SPINCOUNT and KMP_BLOCKTIME).
  The variable is inherited by the processes a run starts (submitit's local jobs), which then leave it as it is.
- `set_threads(cfg)`: `threads` when set, else the CPUs SLURM gave the job, else every core.

lottery-report does no tensor arithmetic and lottery-init-study runs on one thread, so neither needs the default.
"""
from __future__ import annotations

import os
import sys
from typing import MutableMapping, Optional

# What says how OpenMP threads wait: the standard variable, and the GNU (libgomp) and Intel (libiomp) runtimes' own.
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
DEFAULT_WAIT = ("OMP_WAIT_POLICY", "PASSIVE")


def default_wait_policy(environ: Optional[MutableMapping[str, str]] = None) -> Optional[str]:
    """Set lottery's OpenMP wait policy in the environment (`os.environ`) unless one of WAIT_VARIABLES is set there
    (the user's choice stands, even an empty value) or torch is already imported (too late: the OpenMP runtime read
    the environment when torch loaded it; the variable would then only reach child processes). Returns what it set
    ("OMP_WAIT_POLICY=PASSIVE"), or None."""
    env = os.environ if environ is None else environ
    if "torch" in sys.modules or any(v in env for v in WAIT_VARIABLES):
        return None
    name, value = DEFAULT_WAIT
    env[name] = value
    return f"{name}={value}"


def set_threads(cfg) -> None:
    import torch
    cpus = cfg.threads or os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and str(cpus).isdigit():
        torch.set_num_threads(int(cpus))


def describe() -> str:
    """This process's CPU threads and how they wait, for a log line ("2 CPU threads, OMP_WAIT_POLICY=PASSIVE")."""
    import torch
    given = [f"{v}={os.environ[v]}" for v in WAIT_VARIABLES if v in os.environ]
    return f"{torch.get_num_threads()} CPU threads, " + (", ".join(given) if given else "OpenMP's own wait policy")
