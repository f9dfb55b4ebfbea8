"""Metrics to local files (always; the source of truth) and to Weights & Biases (`logger=wandb`).

`metrics.jsonl` is append-only: one line per evaluation (and per training-loss log), tagged with level and branch. A
run resumed from a checkpoint repeats the evaluations made after that checkpoint; readers keep the last record for
each (level, branch, step). W&B is imported only when used, so plain runs start fast.

W&B follows its own conventions, so its standard views work: one W&B run per unit (a level's ticket or control, an
lmc copy), with the same keys for every unit (`train/loss`, `train/lr`, `eval/test_accuracy`, `eval/val_loss`, ...)
against the unit's training step, its level, branch and replicate in its config (`unit.level`, `unit.branch`,
`unit.name`, `unit.replicate`) and its record (a summary.json row) as its summary; and one run per run folder (the
job's: the config, the records table, the figures, the ticket artifacts). All of them share the W&B group, so units
overlay in one panel and the UI groups and filters them by config. Ids are the job's (`<run>/wandb_id.txt`) and,
for a unit, `<job id>-L<level>-<tag>`, so a resumed job continues the same runs.

W&B never costs a run: if it cannot start, cannot write (a full disk under `<run>/wandb`), or the service rejects the
run, the log says once what failed, W&B is switched off for the rest of the job, and training goes on with the local
files, which hold everything W&B would have had.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from lottery.core.files import appending

if TYPE_CHECKING:
    from wandb import Run

log = logging.getLogger(__name__)
WandbMode = Literal["online", "offline", "disabled", "shared"]


def wandb_mode() -> str:
    """WANDB_MODE when set; otherwise online if this machine has W&B credentials, else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "online" if "api.wandb.ai" in netrc.read_text() else "offline"
    except OSError:
        return "offline"


def _sweep_name() -> str | None:
    """The named sweep (`sweep=...`) this job belongs to, if any: the default W&B group of its jobs."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get("sweep") if HydraConfig.initialized() else None
    except Exception:  # noqa: BLE001 - outside a Hydra app (tests, notebooks) there is no sweep
        return None


def _new_id() -> str:
    # W&B's own id helper moved between releases; ids only need to be unique, lowercase alphanumeric
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _unit_id(job_id: str, level: int, tag: str) -> str:
    """A unit's W&B run id, the same in every process that trains it (W&B ids take letters, digits, - and _)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", f"{job_id}-L{level}-{tag}")


def _flat(record: dict, prefix: str = "") -> dict:
    """A record as W&B summary values: nested dicts (layer_density, instability_by_step, device_info) as `a/b` keys,
    no None (a diverged unit has no accuracy, not an accuracy of 0)."""
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        elif v is not None:
            out[f"{prefix}{k}"] = v
    return out


# Run folders whose W&B logging failed in this process: the figures logged after the run (log_figures) leave them be,
# so a failure is said once.
_FAILED: set[Path] = set()


class Tracker:
    """One run folder's metrics: metrics.jsonl, and with logger=wandb the job's W&B run (opened here) and one W&B run
    per unit (opened at the unit's first metric, finished with its record); several trackers (replicas) may be open
    in one process."""

    def __init__(self, run_dir: Path, cfg, config_dict: dict | None, group: str | None = None):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.cfg = cfg
        self.config = config_dict or {}
        self.run: Run | None = None  # the job's W&B run; None once W&B is off
        self.units: dict[tuple[int, str], Run] = {}  # (level, tag) -> the W&B run of a unit being trained
        self._step = 0
        self._wandb_dirs: list[Path] = []
        if cfg.logger.name == "wandb":
            self._guarded("start", self._start_wandb, config_dict, group)

    # --- W&B ---------------------------------------------------------------------------------------------------
    def _guarded(self, what: str, fn, *args) -> None:
        """Call a W&B step; on any failure say so once, switch W&B off, and let training go on."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - whatever W&B raises, the local files carry the run
            runs = [r for r in (self.run, *self.units.values()) if r is not None]
            self.run, self.units = None, {}
            _FAILED.add(self.run_dir)
            text = str(e).strip()
            log.error(
                "W&B failed to %s (%s%s); W&B logging is off for the rest of this job, training goes on and "
                "the local files in %s hold every result",
                what,
                type(e).__name__,
                f": {text.splitlines()[0]}" if text else "",
                self.run_dir,
            )
            for run in runs:
                try:
                    run.finish(exit_code=1)
                except Exception:  # noqa: BLE001, S110 - a broken service may not even finish
                    pass

    def _start_wandb(self, config_dict: dict | None, group: str | None) -> None:
        import wandb

        lcfg = self.cfg.logger
        id_file = self.run_dir / "wandb_id.txt"
        # The id is stored so a resumed job (SLURM requeue, rerun of the same command) continues the same W&B runs.
        run_id = id_file.read_text().strip() if id_file.exists() else _new_id()
        id_file.write_text(run_id)
        # Several runs are open at once in one process (the job's, its units', other replicates'): create_new.
        self._common: dict[str, Any] = {
            "project": lcfg.project,
            "entity": lcfg.entity,
            "group": lcfg.group or _sweep_name() or group,
            "tags": list(lcfg.tags),
            "dir": str(self.run_dir),
            "resume": "allow",
            "reinit": "create_new",
        }
        # WANDB_MODE as the user set it: W&B itself refuses a value it does not know
        self._mode = cast(WandbMode, wandb_mode())
        kwargs: dict[str, Any] = {
            "id": run_id,
            "name": self.run_dir.name,
            "job_type": lcfg.job_type or "results",
            "config": config_dict,
        }
        try:
            self.run = wandb.init(mode=self._mode, **self._common, **kwargs)
        except Exception as e:  # W&B trouble (network, login) must not cost the experiment
            if self._mode != "online":
                raise
            log.error("W&B online start failed (%s); logging offline instead, upload later with `wandb sync`", e)
            self._mode = "offline"
            self.run = wandb.init(mode=self._mode, **self._common, **kwargs)
        # An offline run resumed in a new process starts W&B's step at 0 again, and the server drops rows whose step
        # is not above the last one when the pieces are synced: keep counting from where the last start stopped.
        # (A unit's rows are at its training steps, which a resumed unit continues by itself.)
        self._step_file = self.run_dir / "wandb_step.txt"
        try:
            saved = int(self._step_file.read_text())
        except (OSError, ValueError):
            saved = 0
        self._step = max(saved, self._job_run.step)
        self._wandb_dirs.append(Path(self._job_run.dir).parent)

    @property
    def _job_run(self) -> Run:
        """The job's W&B run, in a step that runs only while W&B is on."""
        assert self.run is not None
        return self.run

    def _unit_run(self, level: int, tag: str) -> Run:
        """The W&B run of unit `tag` (branch, or branch/unit) at `level`, opened (or resumed) at its first use."""
        key = (level, tag)
        if key not in self.units:
            import wandb

            branch, _, unit = tag.partition("/")
            about = {
                "level": level,
                "branch": branch,
                "name": unit,
                "replicate": self.cfg.seed,
                "folder": str(self.run_dir),
            }
            # silent, and the console stays the job run's: dozens of units must not each print and capture the log
            run = wandb.init(
                mode=self._mode,
                **self._common,
                id=_unit_id(self._job_run.id, level, tag),
                name=f"{self.run_dir.name} L{level} {tag}",
                job_type="unit",
                config={**self.config, "unit": about},
                settings=wandb.Settings(silent=True, console="off"),
            )
            self.units[key] = run
            self._wandb_dirs.append(Path(run.dir).parent)
        return self.units[key]

    def _unit_log(self, level: int, tag: str, step: int, values: dict, diverged: bool = False) -> None:
        if self.run is not None:
            self._guarded("log metrics", self._unit_log_unguarded, level, tag, step, values, diverged)

    def _unit_log_unguarded(self, level: int, tag: str, step: int, values: dict, diverged: bool) -> None:
        run = self._unit_run(level, tag)
        values = {k: v for k, v in values.items() if v is not None}
        # A unit resumed from a checkpoint repeats the evaluations after it: W&B already has those rows (online;
        # offline, the server drops them when the pieces are synced).
        if values and step >= run.step:
            run.log(values, step=step)
        if diverged:
            run.tags = tuple(dict.fromkeys([*(run.tags or ()), "diverged"]))

    def _log(self, values: dict) -> None:
        """A row of the job's run (records table, chart, figures)."""
        self._job_run.log(values, step=self._step)
        self._step += 1
        self._step_file.write_text(str(self._step))

    # --- events -------------------------------------------------------------------------------------------------
    def _append(self, record: dict) -> None:
        with appending(self.metrics_path) as f:
            f.write(json.dumps(record) + "\n")

    def train(self, level: int, branch: str, record: dict) -> None:
        """The mean training loss over the last `logger.log_every` steps and the rate: `train/loss`, `train/lr`."""
        self._append({"level": level, "branch": branch, "kind": "train", **record})
        self._unit_log(
            level,
            branch,
            record["step"],
            {f"train/{k.removeprefix('train_')}": v for k, v in record.items() if k != "step"},
        )

    def eval(self, level: int, branch: str, record: dict) -> None:
        """An evaluation: `eval/<key>` for each of its keys (val_loss, test_accuracy, train_loss: the mean training
        loss since the previous evaluation, lr, and every other metric of lottery.training.evaluation)."""
        self._append({"level": level, "branch": branch, "kind": "eval", **record})
        self._unit_log(
            level,
            branch,
            record["step"],
            {f"eval/{k}": v for k, v in record.items() if k not in ("step", "diverged")},
            diverged=bool(record.get("diverged")),
        )

    def level(self, record: dict) -> None:
        """A summary.json record (a level's ticket or control): the summary of the run `<job id>-L<level>-<branch>`
        (the unit's own, or for a branch of several units a run of its own), and the end of the branch's unit runs."""
        if self.run is not None:
            self._guarded("log a record", self._record, record)
        if self.run is not None:
            self._guarded("finish a unit's run", self._finish_units, record)

    def _record(self, record: dict) -> None:
        run = self._unit_run(record["level"], record["branch"])
        run.summary.update(_flat(record))
        if record.get("diverged"):
            # the unit's run is tagged (and ends as failed); the job's run says so too, to filter a sweep by
            run.tags = tuple(dict.fromkeys([*(run.tags or ()), "diverged"]))
            self._job_run.summary["diverged"] = True
            self._job_run.tags = tuple(dict.fromkeys([*(self._job_run.tags or ()), "diverged"]))

    def _finish_units(self, record: dict) -> None:
        level, branch = record["level"], record["branch"]
        for key in [k for k in self.units if k[0] == level and (k[1] == branch or k[1].startswith(f"{branch}/"))]:
            self.units.pop(key).finish(exit_code=1 if record.get("diverged") else 0)

    def artifact(self, path: Path, name: str) -> None:
        if self.run is not None and self.cfg.logger.log_artifacts:
            self._guarded("upload the ticket artifact", self._artifact, path, name)

    def _artifact(self, path: Path, name: str) -> None:
        import wandb

        art = wandb.Artifact(name=f"{self._job_run.id}-{name}", type="ticket")
        art.add_file(str(path))
        self._job_run.log_artifact(art)

    def finish(self, summary: list[dict], ok: bool = True) -> None:
        if self.run is not None:
            self._guarded("finish the run", self._finish, summary, ok)

    def _finish(self, summary: list[dict], ok: bool) -> None:
        import wandb

        try:
            units, self.units = list(self.units.values()), {}
            for run in units:  # units without a record: the job stopped inside them
                run.finish(exit_code=1)
            if summary:
                self._log({"records": records_table(summary)})
                summary = [r for r in summary if r.get("test_accuracy") is not None]  # a diverged unit has none
                branches = sorted({r["branch"] for r in summary})
                xs = [[100 * r["weights_remaining"] for r in summary if r["branch"] == b] for b in branches]
                ys = [[100 * r["test_accuracy"] for r in summary if r["branch"] == b] for b in branches]
                if branches:
                    self._log(
                        {
                            "accuracy_vs_weights_remaining": wandb.plot.line_series(
                                xs=xs,
                                ys=ys,
                                keys=branches,
                                title="Test accuracy vs weights remaining",
                                xname="weights remaining (%)",
                            )
                        }
                    )
        finally:
            self._job_run.finish(exit_code=0 if ok else 1)
            self.run = None
            self._report_write_errors()

    def _figures(self, figures: dict[str, Path]) -> None:
        import wandb

        self._log({f"figures/{name}": wandb.Image(str(path)) for name, path in figures.items()})

    def _close(self) -> None:
        run, self.run = self._job_run, None
        run.finish()
        self._report_write_errors()

    def _report_write_errors(self) -> None:
        """W&B's service does not tell the caller when it cannot write its files (a full disk under `<run>/wandb`): it
        drops the records and notes it in its own log. Say so once, at the end."""
        for files in self._wandb_dirs:
            try:
                text = (files / "logs" / "debug-internal.log").read_text(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                if '"level":"ERROR"' in line and ("no space left" in line.lower() or "failed to save" in line):
                    log.error(
                        "W&B could not write its files under %s, so its record of this run is incomplete (%s); "
                        "the local files in %s are complete",
                        files,
                        line.split('"msg":"', 1)[-1].split('"', 1)[0][:300],
                        self.run_dir,
                    )
                    return


def records_table(records: list[dict]):
    """summary.json's rows as a wandb.Table: a column per key (in the order of first appearance), nested values
    (layer_density, device_info, instability_by_step) as JSON text."""
    import wandb

    columns = list(dict.fromkeys(k for r in records for k in r))
    rows = [[json.dumps(v) if isinstance(v, (dict, list)) else v for v in (r.get(c) for c in columns)] for r in records]
    return wandb.Table(columns=columns, data=rows, allow_mixed_types=True)


def log_figures(run_dir: Path, cfg, figures: dict[str, Path]) -> None:
    """After a run has ended: `figures` ({name: PNG}, lottery-report's figures of the run folder, which the entry
    point draws: this package does not import the report) as `figures/<name>` images in the job's W&B run, reopened
    by its id (wandb_id.txt). Like every W&B step, a failure is one log line and costs nothing else."""
    run_dir = Path(run_dir)
    if cfg.logger.name != "wandb" or not figures or run_dir in _FAILED or not (run_dir / "wandb_id.txt").exists():
        return
    tracker = Tracker(run_dir, cfg, None, group=cfg.name)
    if tracker.run is not None:
        tracker._guarded("log the figures", tracker._figures, figures)
    if tracker.run is not None:
        tracker._guarded("finish the run", tracker._close)
