"""Hydra entry points. No experiment logic lives here: each app composes its config and calls one function."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from lottery.config import conf_dir, register_configs
from lottery.core.threads import default_wait_policy
from lottery.launch.slurm import STOPPED, register_launcher

log = logging.getLogger("lottery")
register_configs()
register_launcher()

CONF_DIR = conf_dir()

# Errors a user can fix by changing the command line: shown as one line, not a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


def _is_user_error(e: BaseException) -> bool:
    # torchvision's checksum failure is a RuntimeError; ours names the fix (dataset.verify=false).
    return isinstance(e, USER_ERRORS) or (isinstance(e, RuntimeError) and "dataset.verify" in str(e))


# Exit status of a job stopped by SIGUSR2/SIGTERM/SIGINT after its checkpoint: EX_TEMPFAIL, "try again" (scripts
# requeue on it).
PREEMPTED_EXIT = 75
# Exit status of a run stopped by a second Ctrl-C, before its checkpoint: 128 + SIGINT, as the shell reports it.
INTERRUPTED_EXIT = 130
# Exit status of a run stopped because a file could not be written (full disk, quota): EX_IOERR. Nothing is lost; the
# same command resumes once there is room.
WRITE_FAILED_EXIT = 74
# Exit status of a run whose training diverged (lottery/core/divergence.py): its records are written, the run is not
# done.
DIVERGED_EXIT = 3
# Exit status of an IMP run stopped because its next level would be built from a ticket at chance (AtChance).
AT_CHANCE_EXIT = 4


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
        (run_dir / STOPPED).unlink(missing_ok=True)
        self.write_hydra_files(run_dir)

    def write_hydra_files(self, run_dir: Path) -> None:
        from omegaconf import OmegaConf

        from lottery.core.files import WriteFailed, write_text

        hydra_cfg = HydraConfig.get()
        out = run_dir / ".hydra"
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # no room, no inode: one line and exit 74 as every failed write (_guard)
            raise WriteFailed(out, e) from e
        # atomic, like every file of the run: a full disk leaves no empty .hydra/config.yaml behind
        write_text(out / "config.yaml", OmegaConf.to_yaml(self.cfg))
        write_text(out / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.overrides.task))
        write_text(out / "hydra.yaml", OmegaConf.to_yaml({"hydra": hydra_cfg}))

    def may_record(self) -> bool:
        """error.txt goes into a folder this process owns, or one that holds no run of anybody's."""
        return self.owned or not any((self.run_dir / f).exists() for f in ("config.yaml", "replicas.json", ".lock"))


def _guard(fn, job: _Job) -> None:
    """Run one job. In a multirun a failed job records its error and lets the other jobs go on."""
    from lottery.core.commandline import quick_exit
    from lottery.core.signals import install_stop_handlers

    quick_exit()  # a job of a launcher (submitit, SLURM) is a process of its own, started without _main
    install_stop_handlers()
    _quiet_log_file_errors()
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        _guarded(fn, job, multirun)
    finally:
        if not multirun and not job.owned:
            _remove_created_folders()


def _remove_created_folders() -> None:
    """A single run that never owned its folder: the folders made for it (lottery.launch.checks) go again when they
    are empty, so a refused or failed start leaves nothing behind."""
    from lottery.launch.checks import CREATED

    for d in reversed(CREATED):
        with contextlib.suppress(OSError):
            d.rmdir()  # only an empty folder


def _guarded(fn, job: _Job, multirun: bool) -> None:
    from lottery.core.commandline import BROKEN_INSTALL_EXIT, BrokenInstall
    from lottery.core.divergence import AtChance, Diverged
    from lottery.core.files import WriteFailed
    from lottery.core.signals import Interrupted, Preempted
    from lottery.experiment.folder import FolderRefused

    run_dir = job.run_dir
    try:
        fn()
    except FolderRefused as e:
        # Not this process's folder: one line on stderr, nothing written there (not even to its log file).
        print(f"error: {e}", file=sys.stderr)
        if not multirun:
            sys.exit(2)
        _FAILED_JOBS.append(run_dir)
        _note_refused(run_dir, e)
    except (Diverged, AtChance) as e:
        # A result, not a bug: one line; in a multirun the job counts as failed (error.txt) and the others go on.
        _record_error(job, e)
        if multirun:
            log.error("job failed: %s (recorded in %s)", e, run_dir / "error.txt")
            _FAILED_JOBS.append(run_dir)
            return
        print(f"error: {e}", file=sys.stderr)
        sys.exit(DIVERGED_EXIT if isinstance(e, Diverged) else AT_CHANCE_EXIT)
    except (WriteFailed, BrokenInstall) as e:
        # Neither a bug nor a bad command: a full disk or a read-only folder (the files in place are intact, the
        # rerun resumes), or a torchvision that cannot be imported where the data first needs it. One line.
        _record_error(job, e)
        print(f"error: {e}", file=sys.stderr)
        if not multirun:
            sys.exit(WRITE_FAILED_EXIT if isinstance(e, WriteFailed) else BROKEN_INSTALL_EXIT)
        _FAILED_JOBS.append(run_dir)
    except Preempted as e:
        # Neither done nor failed: leave without a result (under submitit the requeue already happened in
        # hand_over, which exits; here nobody requeued), so a requeue or a rerun of the command resumes the job.
        where = f" (it continues in {run_dir})" if not multirun else ""
        if job.owned:
            with contextlib.suppress(OSError):  # how a launcher tells a stopped job from a killed one
                (run_dir / STOPPED).write_text(f"{e}\n")
            log.warning("%s; rerun the same command to resume%s", e, where)
        else:
            print(f"warning: {e}; rerun the same command to resume{where}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)
    except (Interrupted, KeyboardInterrupt):
        # The second Ctrl-C: the last checkpoint (every checkpoint.every steps) is where a rerun continues.
        print(
            f"error: interrupted twice: stopped at once without a new checkpoint; rerun the same command to resume "
            f"from the last one{f' (in {run_dir})' if job.owned else ''}",
            file=sys.stderr,
        )
        sys.exit(INTERRUPTED_EXIT)
    except Exception as e:  # a bug keeps its traceback; in a sweep the other jobs go on
        _record_error(job, e)
        if multirun:
            if _is_user_error(e):
                log.error("job failed: %s (recorded in %s)", e, run_dir / "error.txt")
            else:
                log.exception("job failed (recorded in %s)", run_dir / "error.txt")
            _FAILED_JOBS.append(run_dir)
            return
        if not _is_user_error(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _record_error(job: _Job, e: BaseException) -> None:
    """error.txt (and, in a sweep's folder nobody owns, Hydra's overrides, so a sweep's table names the failed job).
    A single run that does not own its folder writes nothing: its error is the line on stderr. Best effort: on a full
    disk this write fails too, and must not hide the error it records."""
    if not job.may_record() or (not job.owned and HydraConfig.get().mode != RunMode.MULTIRUN):
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
            print(
                f"warning: could not record the error in {path} ({write_error.strerror or write_error})",
                file=sys.stderr,
            )


def _quiet_log_file_errors() -> None:
    """A log file on a full disk: drop the lines it cannot take instead of printing a traceback for each one (other
    logging errors, a bad format string, still show)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):

            def handle_error(record, original=handler.handleError):
                if not isinstance(sys.exc_info()[1], OSError):
                    original(record)

            handler.handleError = handle_error  # type: ignore[method-assign]  # this handler's alone


# --- a multirun's failed jobs -----------------------------------------------------------------------------------
# A failed job lets the other jobs go on (_guard), so the command itself must say at the end that jobs failed: exit
# status 1 and one line naming their folders, for scripts and cluster pipelines.

_FAILED_JOBS: list[Path] = []  # jobs of this process (the basic launcher), refused ones included
_MULTIRUN: dict = {}  # the sweep folder and its failure files when the multirun started; `ended` once it has
REFUSED = ".refused"  # <sweep dir>/.refused/<job folder>: a job refused its folder, and so wrote nothing there


def _note_refused(run_dir: Path, e: BaseException) -> None:
    """A refused job of a multirun leaves its folder alone; for a launching process elsewhere (submitit, slurm) to
    count it as failed, it says so in the sweep folder instead."""
    try:
        sweep_dir = Path(HydraConfig.get().sweep.dir).absolute()
        name = run_dir.absolute().relative_to(sweep_dir).as_posix().replace("/", "_")
        (sweep_dir / REFUSED).mkdir(parents=True, exist_ok=True)
        (sweep_dir / REFUSED / name).write_text(f"{run_dir}\n{e}\n")
    except (OSError, ValueError):  # not below the sweep folder, or not writable: this process still counts it
        pass


def _failure_files(sweep_dir: Path) -> dict[Path, tuple[int, int]]:
    """{job folder: (mtime, size) of its failure file}: the error.txt of every job folder below the sweep folder (not
    in a run's own sub-folders nor the launchers' hidden ones), and the notes of refused jobs."""
    out = {}
    for root, dirs, files in os.walk(sweep_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("levels", "states", "wandb")]
        if "error.txt" in files:
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join(root, "error.txt"))
                out[Path(root)] = (st.st_mtime_ns, st.st_size)
    refused = sweep_dir / REFUSED
    for note in refused.iterdir() if refused.is_dir() else ():
        with contextlib.suppress(OSError, IndexError):
            st = note.stat()
            out[Path(note.read_text().splitlines()[0])] = (st.st_mtime_ns, st.st_size)
    return out


class FailedJobs(Callback):
    """Registered in conf/config.yaml (hydra.callbacks). Jobs that ran in other processes (submitit_local, slurm)
    tell only through files: an error.txt (or a refused job's note) written during this multirun. A job that
    succeeds on a rerun deletes its old error.txt; the slurm launcher writes one for a job that ended without a
    result."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        _hold_sweep_folder(sweep_dir)
        _FAILED_JOBS.clear()
        _MULTIRUN.update(sweep_dir=sweep_dir, before=_failure_files(sweep_dir), ended=False)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        _MULTIRUN["ended"] = True


SWEEP_LOCK = ".sweep.lock"
_SWEEP_LOCKS: list = []  # open lock files of the sweep folders this process launches into, held until it exits


def _hold_sweep_folder(sweep_dir: Path) -> None:
    """One launching process per sweep folder: a second identical sweep started while the first runs would count
    the first's jobs (refused by their folders' locks, or still running) as its own failures, and the first would
    count the second's refusals. Refused with one line; rerun it once the first has ended to resume what is left."""
    import fcntl

    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        f = open(sweep_dir / SWEEP_LOCK, "a")  # noqa: SIM115 - the lock lives as long as the sweep, not a block
    except OSError:
        return  # a folder that cannot be written fails where Hydra or the jobs write it, with its own message
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        print(
            f"error: another sweep is running in {sweep_dir} (it holds {sweep_dir / SWEEP_LOCK}); wait for it to "
            f"end and rerun to resume the jobs it did not finish, or choose another folder with "
            f"hydra.sweep.dir=...",
            file=sys.stderr,
        )
        sys.exit(2)
    _SWEEP_LOCKS.append(f)


def _failed_jobs() -> tuple[Path, list[Path]] | None:
    """(sweep folder, failed job folders) of the multirun that just ended in this process, if any."""
    if not _MULTIRUN.get("ended"):
        return None
    sweep_dir, before = _MULTIRUN["sweep_dir"], _MULTIRUN["before"]
    written = [d for d, stamp in _failure_files(sweep_dir).items() if before.get(d) != stamp]
    failed = sorted({Path(d).absolute() for d in [*_FAILED_JOBS, *written]})
    return sweep_dir, failed


def _exit_if_jobs_failed() -> None:
    outcome = _failed_jobs()
    if outcome and outcome[1]:
        sweep_dir, failed = outcome
        names = [str(d.relative_to(sweep_dir)) if d.is_relative_to(sweep_dir) else str(d) for d in failed]
        print(
            f"error: {len(failed)} job{'s' if len(failed) > 1 else ''} of the multirun in {sweep_dir} failed: "
            f"{', '.join(names)} (each folder's error.txt and the error column of summary.csv say why)",
            file=sys.stderr,
        )
        sys.exit(1)


# --- a config group's option that conf/ does not have ------------------------------------------------------------


def unknown_option(args: list[str]) -> str | None:
    """`model=resnet99` (any config group: model, dataset, init, ..., launcher, sweep) as one line naming the group's
    options, before Hydra starts (its own error is a dozen lines). Options come from where Hydra would look: conf/,
    --config-dir and hydra.searchpath on the command line. A command line Hydra cannot parse is left to Hydra."""
    from hydra._internal.config_repository import ConfigRepository
    from hydra._internal.utils import create_config_search_path, get_args_parser
    from hydra.core.object_type import ObjectType
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # argparse prints its own complaint: Hydra will say it
            parsed = get_args_parser().parse_args(args)
        overrides = OverridesParser.create().parse_overrides(parsed.overrides)
    except (Exception, SystemExit):  # noqa: BLE001 - a command line it cannot parse: Hydra reports it
        return None
    search = create_config_search_path(CONF_DIR)
    if parsed.config_dir:
        search.prepend("command-line", f"file://{os.path.abspath(parsed.config_dir)}")
    for o in overrides:
        if o.key_or_group == "hydra.searchpath" and isinstance(value := o.value(), list):
            for entry in value:
                search.append("command-line", str(entry))
    repo = ConfigRepository(config_search_path=search)
    for o in overrides:
        group = o.key_or_group
        if o.is_delete() or "." in group or group.startswith("hydra") or not repo.group_exists(group):
            continue
        value = o.value()
        choices = value.list if isinstance(value, ChoiceSweep) else [value]  # -m model=conv2,conv4
        options = sorted(repo.get_group_options(group, results_filter=ObjectType.CONFIG))
        for choice in choices:
            if isinstance(choice, str) and choice not in options:  # null (no option) is not a string
                return f"unknown {group} '{choice}'; accepted: {', '.join(options)}"
    return None


def _main(app, config_name: str = "config") -> None:
    """An entry point: lottery's OpenMP wait policy, `--version`, the installation and the command line checked, the
    Hydra app, then the exit status of a multirun."""
    # first: OpenMP reads how its threads wait once, when torch loads it (lottery/core/threads.py); importing this
    # module does not load torch (tests/test_threads.py), and a library import leaves the environment alone
    default_wait_policy()
    from lottery.config import schema
    from lottery.core.commandline import exit_early, unknown_key

    args = sys.argv[1:]
    exit_early(args)
    error = unknown_option(args) or unknown_key(args, CONF_DIR, config_name, schema(struct=True))
    if error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    app()
    _exit_if_jobs_failed()


def _figures_to_wandb(cfg: DictConfig, run_dir: Path) -> None:
    """logger=wandb: lottery-report's figures of each run folder of this job, as images in its W&B run (the
    experiment package does not draw: the report sits above it). Never costs the run: a failure is one log line."""
    import json
    import tempfile

    from lottery.experiment.tracking import log_figures, wandb_mode

    if cfg.logger.name != "wandb" or wandb_mode() == "disabled":
        return
    try:
        from lottery.report import collect_runs, make_figures  # matplotlib only here

        parent = run_dir / "replicas.json"
        folders = [run_dir / f for f in json.loads(parent.read_text())["folders"]] if parent.exists() else [run_dir]
        for folder in folders:
            rows = collect_runs([folder], warn=log.warning)
            with tempfile.TemporaryDirectory() as tmp:
                pngs = {p.stem: p for p in make_figures(rows, tmp, warn=log.warning) if p.suffix == ".png"}
                log_figures(folder, cfg, pngs)
    except Exception as e:  # noqa: BLE001 - the run's results are written: a figure must not fail it
        log.error("figures for W&B not drawn (%s: %s); `lottery-report %s` draws them", type(e).__name__, e, run_dir)


def _run_experiment(cfg: DictConfig, job: _Job) -> None:
    from lottery.core.divergence import AtChance, Diverged
    from lottery.experiment import run_experiment

    try:
        run_experiment(cfg, job.run_dir, on_owned=job.on_owned)
    except (Diverged, AtChance):  # a result too: its figures mark the diverged and at-chance units
        _figures_to_wandb(cfg, job.run_dir)
        raise
    _figures_to_wandb(cfg, job.run_dir)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _train(cfg: DictConfig) -> None:
    job = _Job(cfg, Path(HydraConfig.get().runtime.output_dir))
    _guard(lambda: _run_experiment(cfg, job), job)


def train() -> None:
    """`lottery-train`: IMP (or dense training with pruning=none) in one run folder."""
    _main(_train)


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
    _main(_retrain, "retrain")
