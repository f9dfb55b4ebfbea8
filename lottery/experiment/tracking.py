"""Metrics to local files (always; the source of truth) and to Weights & Biases (`logger=wandb`).

`metrics.jsonl` is append-only: one line per evaluation (and per training-loss log), tagged with level and branch. A
run resumed from a checkpoint repeats the evaluations made after that checkpoint; readers keep the last record for
each (level, branch, step). W&B is imported only when used, so plain runs start fast.

W&B never costs a run: if it cannot start, cannot write (a full disk under `<run>/wandb`), or the service rejects the
run, the log says once what failed, W&B is switched off for the rest of the job, and training goes on with the local
files, which hold everything W&B would have had.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

from lottery.core.files import appending

log = logging.getLogger(__name__)


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


def _sweep_name() -> Optional[str]:
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


class Tracker:
    def __init__(self, run_dir: Path, cfg, config_dict: dict, group: Optional[str] = None, concurrent: bool = False):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.cfg = cfg
        self.run = None
        self._prefixes: set[str] = set()
        self._step = 0
        # Replicas keep one W&B run per replicate open at once in one process.
        self._reinit = "create_new" if concurrent else "finish_previous"
        if cfg.logger.name == "wandb":
            self._guarded("start", self._start_wandb, config_dict, group)

    # --- W&B ---------------------------------------------------------------------------------------------------
    def _guarded(self, what: str, fn, *args) -> None:
        """Call a W&B step; on any failure say so once, switch W&B off, and let training go on."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - whatever W&B raises, the local files carry the run
            run, self.run = self.run, None
            text = str(e).strip()
            log.error("W&B failed to %s (%s%s); W&B logging is off for the rest of this job, training goes on and "
                      "the local files in %s hold every result", what, type(e).__name__,
                      f": {text.splitlines()[0]}" if text else "", self.run_dir)
            if run is not None:
                try:
                    run.finish(exit_code=1, quiet=True)
                except Exception:  # noqa: BLE001 - a broken service may not even finish
                    pass

    def _start_wandb(self, config_dict: dict, group: Optional[str]) -> None:
        import wandb

        lcfg = self.cfg.logger
        id_file = self.run_dir / "wandb_id.txt"
        # The id is stored so a resumed job (SLURM requeue, rerun of the same command) continues the same W&B run.
        run_id = id_file.read_text().strip() if id_file.exists() else _new_id()
        id_file.write_text(run_id)
        kwargs = dict(project=lcfg.project, entity=lcfg.entity, group=lcfg.group or _sweep_name() or group,
                      tags=list(lcfg.tags), job_type=lcfg.job_type, config=config_dict, id=run_id, resume="allow",
                      dir=str(self.run_dir), name=self.run_dir.name, reinit=self._reinit)
        mode = wandb_mode()
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as e:  # noqa: BLE001 - W&B trouble (network, login) must not cost the experiment
            if mode != "online":
                raise
            log.error("W&B online start failed (%s); logging offline instead, upload later with `wandb sync`", e)
            self.run = wandb.init(mode="offline", **kwargs)
        # An offline run resumed in a new process starts W&B's step at 0 again, and the server drops rows whose step
        # is not above the last one when the pieces are synced: keep counting from where the last start stopped.
        self._step_file = self.run_dir / "wandb_step.txt"
        try:
            saved = int(self._step_file.read_text())
        except (OSError, ValueError):
            saved = 0
        self._step = max(saved, self.run.step)
        self._wandb_files = Path(self.run.dir).parent
        self.run.define_metric("level")
        self.run.define_metric("level/*", step_metric="level")

    def _wandb_log(self, prefix: str, record: dict) -> None:
        if self.run is not None:
            self._guarded("log metrics", self._wandb_log_unguarded, prefix, record)

    def _wandb_log_unguarded(self, prefix: str, record: dict) -> None:
        if prefix not in self._prefixes:
            self.run.define_metric(f"{prefix}/step")
            self.run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")
            self._prefixes.add(prefix)
        self._log({f"{prefix}/{k}": v for k, v in record.items() if v is not None and k not in ("level", "branch")})

    def _log(self, values: dict) -> None:
        self.run.log(values, step=self._step)
        self._step += 1
        self._step_file.write_text(str(self._step))

    # --- events -------------------------------------------------------------------------------------------------
    def _append(self, record: dict) -> None:
        with appending(self.metrics_path) as f:
            f.write(json.dumps(record) + "\n")

    def train(self, level: int, branch: str, record: dict) -> None:
        self._append({"level": level, "branch": branch, "kind": "train", **record})
        self._wandb_log(f"L{level}_{branch}", record)

    def eval(self, level: int, branch: str, record: dict) -> None:
        self._append({"level": level, "branch": branch, "kind": "eval", **record})
        self._wandb_log(f"L{level}_{branch}", record)

    def level(self, record: dict) -> None:
        """One summary record (a level's ticket or control) with `level` as its x-axis in W&B."""
        if self.run is not None:
            self._guarded("log the level summary", self._level, record)

    def _level(self, record: dict) -> None:
        branch = record["branch"]
        values = {f"level/{branch}/{k}": record[k] for k in
                  ("weights_remaining", "params_remaining", "test_accuracy", "early_stop_step",
                   "early_stop_test_accuracy", "instability_test", "instability_train") if record.get(k) is not None}
        for k, by_split in (record.get("instability_by_step") or {}).items():  # lmc with several steps k
            values.update({f"level/{branch}/instability_{split}_k{k}": v for split, v in by_split.items()
                           if v is not None})
        if branch == "ticket":
            values.update({f"level/density/{name}": d for name, d in record["layer_density"].items()})
        if record.get("diverged"):
            # the W&B run says so three ways: a per-level metric, the run summary, and a tag to filter a sweep by
            values[f"level/{branch}/diverged_step"] = record["diverged_step"]
            self.run.summary["diverged"] = True
            self.run.summary[f"diverged/L{record['level']}_{branch}"] = record["diverged_step"]
            self.run.tags = tuple(dict.fromkeys([*(self.run.tags or ()), "diverged"]))
        self._log({"level": record["level"], **values})

    def artifact(self, path: Path, name: str) -> None:
        if self.run is not None and self.cfg.logger.log_artifacts:
            self._guarded("upload the ticket artifact", self._artifact, path, name)

    def _artifact(self, path: Path, name: str) -> None:
        import wandb
        art = wandb.Artifact(name=f"{self.run.id}-{name}", type="ticket")
        art.add_file(str(path))
        self.run.log_artifact(art)

    def finish(self, summary: list[dict], ok: bool = True) -> None:
        if self.run is not None:
            self._guarded("finish the run", self._finish, summary, ok)

    def _finish(self, summary: list[dict], ok: bool) -> None:
        import wandb
        try:
            if summary:
                columns = ["level", "branch", "weights_remaining", "params_remaining", "test_accuracy",
                           "early_stop_step", "early_stop_test_accuracy", "diverged", "instability_test",
                           "instability_train"]
                table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in summary])
                self._log({"summary_table": table})
                summary = [r for r in summary if r.get("test_accuracy") is not None]  # a diverged unit has none
                branches = sorted({r["branch"] for r in summary})
                xs = [[100 * r["weights_remaining"] for r in summary if r["branch"] == b] for b in branches]
                ys = [[100 * r["test_accuracy"] for r in summary if r["branch"] == b] for b in branches]
                if branches:
                    self._log({"accuracy_vs_weights_remaining": wandb.plot.line_series(
                        xs=xs, ys=ys, keys=branches, title="Test accuracy vs weights remaining",
                        xname="weights remaining (%)")})
        finally:
            self.run.finish(exit_code=0 if ok else 1)
            self.run = None
            self._report_write_errors()

    def _report_write_errors(self) -> None:
        """W&B's service does not tell the caller when it cannot write its files (a full disk under `<run>/wandb`): it
        drops the records and notes it in its own log. Say so once, at the end."""
        log_file = self._wandb_files / "logs" / "debug-internal.log"
        try:
            text = log_file.read_text(errors="replace")
        except OSError:
            return
        for line in text.splitlines():
            if '"level":"ERROR"' in line and ("no space left" in line.lower() or "failed to save" in line):
                log.error("W&B could not write its files under %s, so its record of this run is incomplete (%s); "
                          "the local files in %s are complete", self._wandb_files,
                          line.split('"msg":"', 1)[-1].split('"', 1)[0][:300], self.run_dir)
                return
