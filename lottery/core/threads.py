"""CPU threads: how PyTorch's threads wait for each other, and how many there are.

PyTorch runs an operation on the CPU as an OpenMP parallel region, whose threads wait for each other at its end. With
OMP_WAIT_POLICY unset, the GNU OpenMP runtime that PyTorch's Linux wheels load lets a waiting thread spin 300,000
times (milliseconds) before it sleeps. Alone on a machine that saves a wake-up per operation; next to any other busy
process (another run, a test suite, a browser) the spinning threads hold the cores that the thread being waited for
needs, and every operation stalls. Measured on a 2-core machine (docs/benchmarks.md): LeNet-300-100 with 2
threads ran 10-60x slower next to one busy process than alone. Two defaults, each only where the user has not chosen:

- How threads wait: `default_wait_policy()`, called first by the entry points (lottery-train, lottery-retrain and
  `python -m lottery`: lottery.cli's `_main`, in a module that does not load torch when imported) before torch is
  imported, since OpenMP reads its environment once, when torch loads it; importing lottery as a library changes
  no environment variable:
  OMP_WAIT_POLICY=PASSIVE (a waiting thread sleeps at once) unless the environment already says how OpenMP threads
  wait (OMP_WAIT_POLICY, or the GNU and Intel runtimes' own GOMP_SPINCOUNT and KMP_BLOCKTIME). The variable is
  inherited by the processes a run starts (submitit's local jobs), which then keep it as it is. lottery-report does
  no tensor arithmetic and lottery-init-study runs on one thread, so neither needs it.
- How many threads: `set_threads(cfg, step_flops)` sets and returns them (`Threads`): `threads` when set, else
  the CPUs SLURM gave the job, else every core, except for a model whose training step is small (below
  SMALL_STEP_FLOPS; `step_flops` from lottery.training.cost), which gets one thread for training, in a SLURM job
  too: a sleeping thread costs a wake-up per operation, more than a second core gives back on operations that
  small (LeNet-300-100 at batch 60 ran 1.3-1.6x
  faster on one thread than on two passive ones, alone on the machine, and at least as fast next to other work),
  while Conv-2 ran 1.6x faster on two. Replicas trained stacked (one large step for R networks) pass no step size
  and keep every core. Evaluation of a whole split is a few large operations: `evaluation_threads(n)`, with the
  `Threads.evaluation` the session passes to the training loop, gives it every core (a SLURM job's CPUs) back.
  A spin count between the two policies did not help: with two threads and GOMP_SPINCOUNT=10,000, LeNet-300-100
  was 1.2x faster than one thread alone but 2.8x (next to a busy process) to 3.4x (two runs) slower beside work.

`describe()` says what a process ended up with, for its log.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass

# What says how OpenMP threads wait: the standard variable, and the GNU (libgomp) and Intel (libiomp) runtimes' own.
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
DEFAULT_WAIT = ("OMP_WAIT_POLICY", "PASSIVE")
# Dense FLOPs of one training step (lottery.training.cost.step_flops: 3 forward passes, batch included) below which
# `threads: null` means one thread. LeNet-300-100 at batch 60: 9.6e7; Conv-2 on CIFAR-10 at batch 60: 1.6e10.
SMALL_STEP_FLOPS = 1e9


def default_wait_policy(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Set lottery's OpenMP wait policy in the environment (`os.environ`) unless one of WAIT_VARIABLES is set there
    (the user's choice stands, even an empty value) or torch is already imported (too late: the OpenMP runtime read
    the environment when torch loaded it; the variable would only reach child processes). Returns what it set
    ("OMP_WAIT_POLICY=PASSIVE"), or None."""
    env = os.environ if environ is None else environ
    if "torch" in sys.modules or any(v in env for v in WAIT_VARIABLES):
        return None
    name, value = DEFAULT_WAIT
    env[name] = value
    return f"{name}={value}"


def _slurm_cpus() -> int | None:
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return int(slurm) if slurm.isdigit() and int(slurm) > 0 else None


def _small_step(cfg, step_flops: float | None) -> bool:
    """Whether `threads: null` means one thread for training here: no `threads` given, a training step below
    SMALL_STEP_FLOPS, and OpenMP threads that sleep while they wait. A SLURM job counts too: its CPUs are its own,
    but the wait policy its submitting command set is inherited, and sleeping threads cost the same wake-ups there
    (LeNet-300-100 as a job of 2 CPUs: 3.00 s a 500-step unit on both, 2.10 s this way, docs/benchmarks.md)."""
    return not cfg.threads and step_flops is not None and step_flops < SMALL_STEP_FLOPS and passive_wait()


def default_threads(cfg, step_flops: float | None = None) -> int | None:
    """The thread count `set_threads` sets for training: `threads`, else 1 for a small training step (`_small_step`),
    else SLURM_CPUS_PER_TASK, else None (PyTorch's default: every core). With a spinning wait policy (set by the user)
    two threads do pay on small steps, on a quiet machine."""
    if cfg.threads:
        return int(cfg.threads)
    if _small_step(cfg, step_flops):
        return 1
    return _slurm_cpus()


@dataclass(frozen=True)
class Threads:
    """What `set_threads` chose: the training thread count it set (None: PyTorch's default stays), and the count
    evaluation gets where small training steps got one thread (None: evaluation keeps the training count). The
    session keeps it and passes `evaluation` to the training loop; nothing is kept in this module."""

    training: int | None = None
    evaluation: int | None = None


def set_threads(cfg, step_flops: float | None = None) -> Threads:
    """Set PyTorch's thread count (`default_threads`) and return what was chosen. Where small training steps got one
    thread, its `evaluation` is SLURM's count or the count there was before, for `evaluation_threads`."""
    import torch

    cores = _slurm_cpus() or torch.get_num_threads()
    evaluation = cores if _small_step(cfg, step_flops) and cores > 1 else None
    n = default_threads(cfg, step_flops)
    if n is not None:
        torch.set_num_threads(n)
    return Threads(n, evaluation)


@contextlib.contextmanager
def evaluation_threads(n: int | None) -> Iterator[None]:
    """`n` threads (a `Threads.evaluation`) while a split is evaluated, where set_threads gave small training steps
    one thread; None changes nothing. Evaluation is a few large operations (LeNet-300-100 on 10,000 examples: 1.9x
    faster on two threads that sleep while they wait than on one; logits and loss bit-identical on the development
    machine), so the wake-ups it pays are few."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def passive_wait() -> bool:
    """Whether this process's OpenMP threads sleep as soon as they wait (OMP_WAIT_POLICY=PASSIVE, GOMP_SPINCOUNT=0 or
    KMP_BLOCKTIME=0)."""
    env = os.environ
    if "GOMP_SPINCOUNT" in env:
        return env["GOMP_SPINCOUNT"].strip() == "0"
    if "KMP_BLOCKTIME" in env and "OMP_WAIT_POLICY" not in env:
        return env["KMP_BLOCKTIME"].strip() == "0"
    return env.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def describe() -> str:
    """This process's CPU threads and how they wait, for a log line ("1 CPU thread, OMP_WAIT_POLICY=PASSIVE")."""
    import torch

    n = torch.get_num_threads()
    given = [f"{v}={os.environ[v]}" for v in WAIT_VARIABLES if v in os.environ]
    return f"{n} CPU thread{'s' if n > 1 else ''}, " + (", ".join(given) if given else "OpenMP's own wait policy")
