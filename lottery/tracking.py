"""Metrics to local files (always; the source of truth) and to Weights & Biases (`logger=wandb`).

`metrics.jsonl` is append-only: one line per evaluation (and per training-loss log), tagged with level and branch. A
run resumed from a checkpoint repeats the evaluations made after that checkpoint; readers keep the last record for
each (level, branch, step). W&B is imported only when used, so plain runs start fast.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

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


class Tracker:
    def __init__(self, run_dir: Path, cfg, config_dict: dict, group: Optional[str] = None):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.cfg = cfg
        self.run = None
        self._prefixes: set[str] = set()
        if cfg.logger.name == "wandb":
            self._start_wandb(config_dict, group)

    # --- W&B ---------------------------------------------------------------------------------------------------
    def _start_wandb(self, config_dict: dict, group: Optional[str]) -> None:
        import wandb

        lcfg = self.cfg.logger
        id_file = self.run_dir / "wandb_id.txt"
        # The id is stored so a resumed job (SLURM requeue, rerun of the same command) continues the same W&B run.
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id)
        self.run = wandb.init(project=lcfg.project, entity=lcfg.entity, group=lcfg.group or group,
                              tags=list(lcfg.tags), job_type=lcfg.job_type, config=config_dict, id=run_id,
                              resume="allow", dir=str(self.run_dir), mode=wandb_mode(),
                              name=self.run_dir.name, reinit="finish_previous")
        self.run.define_metric("level")
        self.run.define_metric("level/*", step_metric="level")

    def _wandb_log(self, prefix: str, record: dict) -> None:
        if self.run is None:
            return
        if prefix not in self._prefixes:
            self.run.define_metric(f"{prefix}/step")
            self.run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")
            self._prefixes.add(prefix)
        self.run.log({f"{prefix}/{k}": v for k, v in record.items() if v is not None and k not in ("level", "branch")})

    # --- events -------------------------------------------------------------------------------------------------
    def _append(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def train(self, level: int, branch: str, record: dict) -> None:
        self._append({"level": level, "branch": branch, "kind": "train", **record})
        self._wandb_log(f"L{level}_{branch}", record)

    def eval(self, level: int, branch: str, record: dict) -> None:
        self._append({"level": level, "branch": branch, "kind": "eval", **record})
        self._wandb_log(f"L{level}_{branch}", record)

    def level(self, record: dict) -> None:
        """One summary record (a level's ticket or control) with `level` as its x-axis in W&B."""
        if self.run is None:
            return
        branch = record["branch"]
        values = {f"level/{branch}/{k}": record[k] for k in
                  ("weights_remaining", "params_remaining", "test_accuracy", "early_stop_step",
                   "early_stop_test_accuracy") if record.get(k) is not None}
        if branch == "ticket":
            values.update({f"level/density/{name}": d for name, d in record["layer_density"].items()})
        self.run.log({"level": record["level"], **values})

    def artifact(self, path: Path, name: str) -> None:
        if self.run is None or not self.cfg.logger.log_artifacts:
            return
        import wandb
        art = wandb.Artifact(name=f"{self.run.id}-{name}", type="ticket")
        art.add_file(str(path))
        self.run.log_artifact(art)

    def finish(self, summary: list[dict], ok: bool = True) -> None:
        if self.run is None:
            return
        import wandb
        try:
            if summary:
                columns = ["level", "branch", "weights_remaining", "params_remaining", "test_accuracy",
                           "early_stop_step", "early_stop_test_accuracy"]
                table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in summary])
                self.run.log({"summary_table": table})
                branches = sorted({r["branch"] for r in summary})
                xs = [[100 * r["weights_remaining"] for r in summary if r["branch"] == b] for b in branches]
                ys = [[100 * r["test_accuracy"] for r in summary if r["branch"] == b] for b in branches]
                self.run.log({"accuracy_vs_weights_remaining": wandb.plot.line_series(
                    xs=xs, ys=ys, keys=branches, title="Test accuracy vs weights remaining",
                    xname="weights remaining (%)")})
        finally:
            self.run.finish(exit_code=0 if ok else 1)
            self.run = None
