"""CPU threads: how many PyTorch uses, and how its threads wait for each other.

`set_threads(cfg)`: `threads` when set, else the CPUs SLURM gave the job, else PyTorch's default (every core).
Small models on a busy CPU are much faster with fewer threads: PyTorch's parallel regions wait for every thread, so
one core taken by another process stalls each operation (measured here: a BatchNorm on 32x4x32x32 took 23 ms with 2
threads next to a busy process, 0.27 ms with 1).
"""
from __future__ import annotations

import os


def set_threads(cfg) -> None:
    import torch
    cpus = cfg.threads or os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and str(cpus).isdigit():
        torch.set_num_threads(int(cpus))
