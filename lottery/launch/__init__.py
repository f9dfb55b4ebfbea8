"""Launching many runs: the multirun callback that writes a sweep's table (`sweep`) and what `launcher=slurm` adds to
hydra-submitit-launcher (`slurm`). Imports the report and core; the experiment knows nothing of it."""
