"""Hydra entry points. No experiment logic lives here: each app composes its config and calls one function."""
from __future__ import annotations

from lottery.core.threads import default_wait_policy

default_wait_policy()  # first: OpenMP reads how its threads wait once, when torch loads it (lottery/core/threads.py)

import contextlib
import logging
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lottery.config import conf_dir, register_configs
from lottery.launch.slurm import register_launcher

log = logging.getLogger("lottery")
register_configs()
register_launcher()

CONF_DIR = conf_dir()

# Errors a user can fix by changing the command line: shown as one line, not a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


def _is_user_error(e: BaseException) -> bool:
    # torchvision's checksum failure is a RuntimeError; ours names the fix (dataset.verify=false).
    return isinstance(e, USER_ERRORS) or (isinstance(e, RuntimeError) and "dataset.verify" in str(e))


# Exit status of a job stopped by SIGUSR2/SIGTERM after its checkpoint: EX_TEMPFAIL, "try again" (scripts requeue on it).
PREEMPTED_EXIT = 75
# Exit status of a run stopped because a file could not be written (full disk, quota): EX_IOERR. Nothing is lost; the
# same command resumes once there is room.
WRITE_FAILED_EXIT = 74
# Exit status of a run whose training diverged (lottery/core/divergence.py): its records are written, the run is not done.
DIVERGED_EXIT = 3


class _Job:
    """One job's run folder and whether this process owns it yet (every check passed: lock held, same experiment).
    A process that does not own its folder writes nothing there, so a refused or failed start leaves another
    process's or another experiment's folder exactly as it was."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg, self.run_dir, self.owned = cfg, run_dir, False

    def on_owned(self, run_dir: Path) -> None:
        """Called by the session once the folder is this process's: the files Hydra would have written at the start
        (hydra.output_subdir is null, so it writes none), and no error of an earlier start left behind."""
        self.owned = True
        (run_dir / "error.txt").unlink(missing_ok=True)  # a resumed job that succeeds must not keep its old error
        self.write_hydra_files(run_dir)

    def write_hydra_files(self, run_dir: Path) -> None:
        from omegaconf import OmegaConf
        hydra_cfg = HydraConfig.get()
        out = run_dir / ".hydra"
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg))
        (out / "overrides.yaml").write_text(OmegaConf.to_yaml(hydra_cfg.overrides.task))
        (out / "hydra.yaml").write_text(OmegaConf.to_yaml({"hydra": hydra_cfg}))

    def may_record(self) -> bool:
        """error.txt goes into a folder this process owns, or one that holds no run of anybody's."""
        return self.owned or not any((self.run_dir / f).exists() for f in ("config.yaml", "replicas.json", ".lock"))


def _guard(fn, job: _Job) -> None:
    """Run one job. In a multirun a failed job records its error and lets the other jobs go on."""
    from lottery.core.divergence import Diverged
    from lottery.core.files import WriteFailed
    from lottery.core.signals import Preempted, install_stop_handlers
    from lottery.experiment.folder import FolderRefused
    install_stop_handlers()
    _quiet_log_file_errors()
    run_dir = job.run_dir
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        fn()
    except FolderRefused as e:
        # Not this process's folder: one line on stderr, nothing written there (not even to its log file).
        print(f"error: {e}", file=sys.stderr)
        if not multirun:
            sys.exit(2)
    except Diverged as e:
        # A result, not a bug: one line; in a multirun the job counts as failed (error.txt) and the others go on.
        _record_error(job, e)
        if multirun:
            log.error("job failed: %s (recorded in %s)", e, run_dir / "error.txt")
            return
        print(f"error: {e}", file=sys.stderr)
        sys.exit(DIVERGED_EXIT)
    except WriteFailed as e:
        # A full disk or a read-only folder is neither a bug nor a bad command: one line, the files in place are
        # intact, the rerun resumes.
        _record_error(job, e)
        print(f"error: {e}", file=sys.stderr)
        if not multirun:
            sys.exit(WRITE_FAILED_EXIT)
    except Preempted as e:
        # Neither done nor failed: leave without a result (under submitit the requeue already happened in
        # hand_over, which exits; here nobody requeued), so a requeue or a rerun of the command resumes the job.
        if job.owned:
            log.warning("%s; rerun the same command to resume", e)
        else:
            print(f"warning: {e}; rerun the same command to resume", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)
    except Exception as e:  # noqa: BLE001 - a bug keeps its traceback; in a sweep the other jobs go on
        _record_error(job, e)
        if multirun:
            if _is_user_error(e):
                log.error("job failed: %s (recorded in %s)", e, run_dir / "error.txt")
            else:
                log.exception("job failed (recorded in %s)", run_dir / "error.txt")
            return
        if not _is_user_error(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _record_error(job: _Job, e: BaseException) -> None:
    """error.txt (and, in a folder nobody owns, Hydra's overrides, so a sweep's table names the failed job). Best
    effort: on a full disk this write fails too, and must not hide the error it records."""
    if not job.may_record():
        return
    path = job.run_dir / "error.txt"
    try:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{type(e).__name__}: {e}\n\n" + traceback.format_exc())
        if not job.owned:
            job.write_hydra_files(job.run_dir)
    except OSError as write_error:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)  # an empty error.txt would say less than none
        from lottery.core.files import WriteFailed
        if not isinstance(e, WriteFailed):  # that one already says the folder cannot be written
            print(f"warning: could not record the error in {path} ({write_error.strerror or write_error})",
                  file=sys.stderr)


def _quiet_log_file_errors() -> None:
    """A log file on a full disk: drop the lines it cannot take instead of printing a traceback for each one (other
    logging errors, a bad format string, still show)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            def handle_error(record, original=handler.handleError):
                if not isinstance(sys.exc_info()[1], OSError):
                    original(record)
            handler.handleError = handle_error


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _train(cfg: DictConfig) -> None:
    from lottery.experiment import run_experiment
    job = _Job(cfg, Path(HydraConfig.get().runtime.output_dir))
    _guard(lambda: run_experiment(cfg, job.run_dir, on_owned=job.on_owned), job)


def train() -> None:
    """`lottery-train`: IMP (or dense training with pruning=none) in one run folder."""
    _train()


def _ticket_config(cfg: DictConfig) -> DictConfig:
    """The ticket's own config, with exactly the keys the user overrode on the command line taken from `cfg`."""
    from lottery.experiment.ticket import load_ticket, retrain_config
    if not cfg.ticket:
        raise ValueError("lottery-retrain needs ticket=PATH (a levels/level_<L>/ticket.pt file of a run)")
    ticket = load_ticket(Path(cfg.ticket).expanduser())
    overridden = [o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task]
    base = retrain_config(cfg, ticket.config, [k for k in overridden if not k.startswith("hydra.") and k != "ticket"])
    base.ticket = cfg.ticket
    return base


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="retrain")
def _retrain(cfg: DictConfig) -> None:
    from lottery.experiment import retrain_ticket
    job = _Job(cfg, Path(HydraConfig.get().runtime.output_dir))

    def go():
        merged = _ticket_config(cfg)
        retrain_ticket(merged, merged.ticket, job.run_dir, on_owned=job.on_owned)

    _guard(go, job)


def retrain() -> None:
    """`lottery-retrain ticket=PATH [overrides]`: retrain a ticket in isolation."""
    _retrain()
