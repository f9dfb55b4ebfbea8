"""`launcher=slurm` and `launcher=submitit_local`: hydra-submitit-launcher's launchers with the safeguards of
lottery/launch/slurm.py (a job that ends without a result is counted, not a traceback).

Hydra takes launcher classes only from the `hydra_plugins` package; the logic lives in lottery/launch/slurm.py.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Sequence

from hydra.core.singleton import Singleton
from hydra.types import HydraContext
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("lottery")


class _EachJobWaited:
    """The parent's launch (hydra-submitit-launcher 1.2), except that it waits for each job on its own: a job that
    ended without a result (killed, cancelled, out of memory) is recorded as failed in its folder and the sweep goes
    on to write its summary and say how many jobs failed, where the parent stops at the first one with a traceback.
    A job that stopped after its checkpoint (exit 75: SIGTERM, or SIGUSR2 where nobody requeues it) is recorded as
    stopped, resumable by rerunning the sweep."""

    _EXECUTOR: str
    # set by hydra-submitit-launcher's launcher this class is mixed into (declared here for the type checker)
    config: DictConfig | None
    params: dict[str, Any]
    hydra_context: HydraContext | None

    if TYPE_CHECKING:
        def __call__(self, *args: Any) -> JobReturn: ...  # the launcher's: what each job runs

    def _prepare(self) -> dict:
        return {}

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        from lottery.launch import slurm

        assert self.config is not None and len(job_overrides) > 0
        init_params = self._prepare()

        init_keys = {"submitit_folder", "max_num_timeout"}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, folder=self.params["submitit_folder"], **init_params)
        baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in baseparams else f"{self._EXECUTOR}_{k}": v
                                      for k, v in self.params.items() if k not in init_keys})

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))

        job_params: List[Any] = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*job_params))

        returns = []
        for idx, (overrides, job) in enumerate(zip(job_overrides, jobs), start=initial_job_idx):
            try:
                returns.append(job.results()[0])
            except Exception as e:  # noqa: BLE001 - cancelled, killed, out of memory: this job fails, not the sweep
                run_dir = self._job_dir(overrides, idx, job.job_id)
                stopped = slurm.record_failure(run_dir, job, e)
                log.error("job %s (#%d) %s: recorded in %s", job.job_id, idx,
                          "stopped after its checkpoint (rerun the sweep to resume it)" if stopped
                          else "ended without a result", run_dir / "error.txt")
                returns.append(JobReturn(overrides=list(overrides), working_dir=str(run_dir),
                                         status=JobStatus.COMPLETED, _return_value=None))
        return returns

    def _job_dir(self, overrides: Sequence[str], idx: int, job_id: str) -> Path:
        assert self.hydra_context is not None and self.config is not None  # set by the launcher's setup
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = idx
            cfg.hydra.job.id = job_id
        return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)


class LotterySlurmLauncher(_EachJobWaited, SlurmLauncher):
    """`launcher=slurm`: every job waited on its own (above); job states come from squeue when sacct does not
    answer; requests no node of the partition can meet are warned about."""

    def _prepare(self) -> dict:
        from lottery.launch import slurm
        error = slurm.cluster_error()
        if error:  # one line, not submitit's traceback; the sweep folder made for it goes again
            import sys

            from lottery.launch.checks import CREATED
            print(f"error: {error}", file=sys.stderr)
            if CREATED:  # a sweep folder made for this command holds only Hydra's multirun.yaml and the sweep lock
                from lottery.cli import SWEEP_LOCK
                assert self.config is not None  # set by the launcher's setup
                for name in ("multirun.yaml", SWEEP_LOCK):
                    (Path(str(self.config.hydra.sweep.dir)) / name).unlink(missing_ok=True)
            for d in reversed(CREATED):
                try:
                    d.rmdir()
                except OSError:
                    pass
            sys.exit(slurm.NO_CLUSTER_EXIT)
        slurm.warn_if_unsatisfiable(self.params)
        slurm.use_queue_watcher()
        return {"slurm_max_num_timeout": self.params["max_num_timeout"]}


class LotteryLocalLauncher(_EachJobWaited, LocalLauncher):
    """`launcher=submitit_local`: every job waited on its own (above)."""
