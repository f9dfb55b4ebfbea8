"""What `launcher=slurm` adds to hydra-submitit-launcher's SLURM launcher (hydra_plugins/lottery_slurm).

- Job states without `sacct`: submitit learns that a job has ended only from `sacct`. Where accounting is off
  (`sacct` fails) or hangs, a job that ends without a result (cancelled, killed at its time limit, out of memory)
  would be waited for forever. `QueueWatcher` calls `sacct` with a time limit and, when it fails, asks the controller
  with `squeue --states=all`; a job the controller no longer lists has ended too.
- A job that ended without a result (cancelled, failed outside Python) fails only itself: its folder gets `error.txt`
  and the sweep goes on to its table, as for a job whose run raised (lottery/cli.py).
- Before submitting: a warning when no node of the partition can ever give what a job asks for (CPUs, memory,
  GPUs, time), since SLURM would keep such a job pending without end.
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
from pathlib import Path

log = logging.getLogger("lottery")

# Exit status of `launcher=slurm` where no SLURM controller answers: EX_UNAVAILABLE.
NO_CLUSTER_EXIT = 69
SQUEUE_TIMEOUT_S = 30
SACCT_TIMEOUT_S = 60  # an accounting database slower than this is skipped for one poll: squeue answers instead
POLL_DELAY_S = 60  # job states are polled at 2, 4, 8, ... s after a submission, then at least this often
GONE = "NOT_IN_QUEUE"  # our state for a job the controller no longer knows (ended more than MinJobAge ago)


def cluster_error() -> str | None:
    """Why no job can be submitted from here (no SLURM commands, or a controller that does not answer), else None."""
    import shutil

    missing = [c for c in ("sbatch", "srun", "squeue") if shutil.which(c) is None]
    if missing:
        return (
            f"launcher=slurm needs a SLURM cluster, but {', '.join(missing)} is not on PATH here (not a SLURM "
            f"login node?); run there, or use launcher=local or launcher=submitit_local on this machine"
        )
    try:
        r = subprocess.run(
            ["squeue", "--noheader", "--user", "nobody"],
            capture_output=True,
            text=True,
            timeout=SQUEUE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return (
            f"launcher=slurm: the SLURM controller did not answer squeue in {SQUEUE_TIMEOUT_S} s; check that "
            f"slurmctld is up (scontrol ping), or use launcher=local"
        )
    if r.returncode != 0:
        detail = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        return (
            f"launcher=slurm: the SLURM controller cannot be reached (squeue: {detail}); check scontrol ping, or "
            f"use launcher=local"
        )
    return None


def _queue_watcher_class():
    from submitit.slurm.slurm import SlurmInfoWatcher

    class QueueWatcher(SlurmInfoWatcher):
        """submitit's sacct watcher, with squeue as the fallback when sacct fails or takes too long."""

        _warned = False

        def update(self) -> None:
            command = self._make_command()
            if command is None:
                return
            self._num_calls += 1
            try:
                out = subprocess.run(command, capture_output=True, timeout=SACCT_TIMEOUT_S, check=True).stdout
                self._info_dict.update(self.read_info(out))
            except (subprocess.SubprocessError, OSError) as e:
                if not self._warned:
                    stderr = getattr(e, "stderr", None)  # a CalledProcessError's
                    detail = stderr.decode(errors="replace").strip() if stderr else e
                    log.warning("sacct did not answer (%s); job states come from squeue instead", detail)
                    self._warned = True
                self._info_dict.update(self._from_queue({x.split("_")[0] for x in self._registered - self._finished}))
            self._last_status_check = time.time()
            for job_id in self._registered - self._finished:
                if self.is_done(job_id, mode="cache"):
                    self._finished.add(job_id)

        def _from_queue(self, array_ids: set[str]) -> dict[str, dict[str, str]]:
            return queue_states(array_ids, self._registered - self._finished)

    return QueueWatcher


def queue_states(array_ids, registered) -> dict[str, dict[str, str]]:
    """States of the given jobs from the controller (`squeue --states=all`, one line per array task). A registered
    job it does not list has left the queue: ended, and forgotten after MinJobAge. If squeue itself fails (controller
    unreachable), nothing is known and nothing is reported as ended."""
    cmd = ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T", "--jobs", ",".join(sorted(array_ids))]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=SACCT_TIMEOUT_S, check=False)
    except (subprocess.SubprocessError, OSError) as e:
        log.warning("squeue failed too (%s); job states unknown for now", e)
        return {}
    if r.returncode != 0 and "Invalid job id" not in r.stderr:  # that one means: none of them is known any more
        log.warning("squeue failed too (%s); job states unknown for now", r.stderr.strip())
        return {}
    states = {}
    for line in r.stdout.splitlines():
        job_id, _, state = line.strip().partition("|")
        if state:
            states[job_id] = {"JobID": job_id, "State": state}
    for job_id in registered:
        if job_id not in states:
            states[job_id] = {"JobID": job_id, "State": GONE}
    return states


def use_queue_watcher() -> None:
    """Make every SlurmJob of this process use QueueWatcher (submitit keeps one watcher on the class)."""
    from submitit.slurm.slurm import SlurmJob

    if type(SlurmJob.watcher).__name__ != "QueueWatcher":
        SlurmJob.watcher = _queue_watcher_class()(delay_s=POLL_DELAY_S)


def register_launcher() -> None:
    """Make the classes of `launcher=slurm` and `launcher=submitit_local` known to Hydra. Hydra finds launchers by
    listing the hydra_plugins namespace, which misses hydra_plugins/lottery_slurm in an editable install (setuptools'
    import hook imports it but lists nothing), so it is registered by hand too; without the slurm extra there is
    nothing to register."""
    try:
        from hydra_plugins.lottery_slurm import LotteryLocalLauncher, LotterySlurmLauncher
    except ImportError:
        return
    from hydra.core.plugins import Plugins

    Plugins.instance().register(LotterySlurmLauncher)
    Plugins.instance().register(LotteryLocalLauncher)


# --- resources ---------------------------------------------------------------------------------------------------


def _minutes(limit: str) -> float:
    """SLURM time limit ('infinite', 'MM', 'HH:MM:SS', 'D-HH:MM:SS', ...) in minutes."""
    if limit in ("infinite", "UNLIMITED", "n/a", ""):
        return float("inf")
    days, _, rest = limit.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    h, m, s = ([0] * (3 - len(parts)) + parts) if len(parts) > 1 else (0, parts[0], 0)
    return int(days or 0) * 1440 + h * 60 + m + s / 60


def _gpus(gres: str) -> int:
    return sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[^:,(]+)?:(\d+)", gres))


def unsatisfiable(params: dict, nodes: list[dict] | None = None) -> list[str]:
    """What a job with these launcher settings asks for that no node of its partition has (empty: it can run).
    `nodes` defaults to what `sinfo` says; an unreadable sinfo means nothing can be said."""
    partition = params.get("partition")
    if nodes is None:
        nodes = partition_nodes(partition)
    if not nodes:
        return []
    need = {
        "CPUs": (params.get("cpus_per_task") or 1) * (params.get("tasks_per_node") or 1),
        "MB of memory": (params.get("mem_gb") or 0) * 1024,
        "GPUs": params.get("gpus_per_node") or _gpus(str(params.get("gres") or "")),
        "minutes of time limit": params.get("timeout_min") or 0,
    }
    best = {
        "CPUs": max(n["cpus"] for n in nodes),
        "MB of memory": max(n["memory_mb"] for n in nodes),
        "GPUs": max(n["gpus"] for n in nodes),
        "minutes of time limit": max(n["time_min"] for n in nodes),
    }
    fits = [
        n
        for n in nodes
        if n["cpus"] >= need["CPUs"]
        and n["memory_mb"] >= need["MB of memory"]
        and n["gpus"] >= need["GPUs"]
        and n["time_min"] >= need["minutes of time limit"]
    ]
    if fits:
        return []
    where = f"partition {nodes[0]['partition']}"
    problems = [f"{need[k]:g} {k} (the most a node of {where} has: {best[k]:g})" for k in need if need[k] > best[k]]
    return problems or [f"CPUs, memory, GPUs and time together: no single node of {where} has them all"]


def partition_nodes(partition: str | None) -> list[dict]:
    """The nodes of `partition` (None: the default one) as sinfo lists them; [] if sinfo fails."""
    cmd = ["sinfo", "--noheader", "--Node", "--format=%P|%c|%m|%G|%l"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    nodes = []
    for line in out.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 5:
            continue
        name, cpus, mem, gres, limit = fields
        default = name.endswith("*")
        name = name.rstrip("*")
        if (partition is None and not default) or (partition is not None and name != partition):
            continue
        try:
            nodes.append(
                {
                    "partition": name,
                    "cpus": int(cpus),
                    "memory_mb": int(mem.rstrip("+")),
                    "gpus": _gpus(gres),
                    "time_min": _minutes(limit),
                }
            )
        except ValueError:
            continue
    return nodes


def warn_if_unsatisfiable(params: dict) -> list[str]:
    problems = unsatisfiable(params)
    if problems:
        log.warning(
            "these jobs can never start: they ask for %s. SLURM will keep them pending (or refuse them); "
            "lower the request, e.g. hydra.launcher.cpus_per_task=..., mem_gb=..., gpus_per_node=0, "
            "or choose another hydra.launcher.partition",
            "; ".join(problems),
        )
    return problems


# --- jobs that ended without a result ----------------------------------------------------------------------------

# Left in its folder by a job stopped after its checkpoint (exit 75; lottery.cli), removed when it starts again: a
# launcher that sees only a process end without a result counts such a job as stopped and resumable, not failed.
STOPPED = ".stopped"


def record_failure(run_dir: Path, job, error: BaseException) -> bool:
    """error.txt for a job that left no result (the run itself writes it when it raises): its row in the sweep
    table says why. Returns whether the job stopped after its checkpoint (exit status 75: resumable) rather than
    failing."""
    # Local jobs only: under SLURM a SIGTERM is a cancellation (scancel), which the cluster does not requeue, and the
    # sweep's record of it stays "ended without a result" (its error.txt says SLURM's state).
    local = job.__class__.__name__ == "LocalJob"
    stopped = local and (Path(run_dir) / STOPPED).is_file()
    if stopped:
        text = (
            f"JobStopped: job {job.job_id} stopped after its checkpoint (exit status 75): rerun the same sweep to "
            f"resume it; its logs: {job.paths.stdout.parent}\n\n{error}\n"
        )
    elif local:
        text = (
            f"JobEnded: local job {job.job_id} ended without a result (its process was killed, or died); its "
            f"logs: {job.paths.stdout.parent}\n\n{error}\n"
        )
    else:
        state = job.watcher.get_state(job.job_id, mode="cache")
        text = (
            f"SlurmJobEnded: job {job.job_id} ended without a result (SLURM state: {state}); "
            f"its logs: {job.paths.stdout.parent}\n\n{error}\n"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "error.txt").write_text(text)
    return stopped
