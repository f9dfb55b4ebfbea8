"""The IMP driver: levels, rewinding, control branches, and resume.

A run is a list of units, (level, branch), trained in order. Level 0 trains the dense network; level L prunes the
trained weights of level L-1's ticket, rewinds the survivors to the rewind point, and trains again from there with a
fresh optimizer and the schedule restarted at the rewind step. Controls (branches) reuse a level's ticket and change
one thing each. Every finished unit leaves `levels/level_<L>/<branch>/result.json`; a unit with a result is never
trained again, so a rerun of the same command (or a SLURM requeue) continues where the last one stopped.

Run folder:
    config.yaml                 resolved config (the experiment this folder holds)
    summary.json                one record per (level, branch); rewritten atomically after every unit
    metrics.jsonl               every evaluation and training-loss log, tagged with level and branch
    init.pt, rewind.pt          weights at initialization and at the rewind point (saved once)
    levels/level_<L>/ticket.pt  masks + rewind weights + config + metrics: see lottery.ticket
    levels/level_<L>/final.pt   trained weights of the level's ticket (what the next level prunes)
    levels/level_<L>/<branch>/result.json, checkpoint.pt (while training)
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import signal
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lottery import masks as M
from lottery import pruning
from lottery.checkpoint import (Checkpoints, hand_over, load_json, load_torch, save_json, save_torch,
                               stop_requested)
from lottery.config import parse_steps, validate
from lottery.data import Batches, load_data
from lottery.init import initialize
from lottery.models import build_model
from lottery.ticket import Ticket, load_into, load_ticket, save_ticket
from lottery.tracking import Tracker
from lottery.train import Preempted, resolve_device, train

log = logging.getLogger(__name__)

# Keys that may change between two starts of the same run folder: where data lives, how it is logged and run,
# and which controls to add. Anything else means a different experiment, which must get its own folder.
_RESUMABLE_KEYS = {"pruning.branches", "logger", "device", "threads", "checkpoint", "fault", "train.progress", "dataset.root",
                   "dataset.download", "dataset.verify", "train.compile"}


def derive_seed(seed: int, *parts) -> int:
    """Independent, reproducible seeds for each random choice (data order, controls, ...)."""
    digest = hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).hexdigest()
    return int(digest[:15], 16)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _differences(old: dict, new: dict) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return [k for k in keys if not any(k == r or k.startswith(r + ".") for r in _RESUMABLE_KEYS)]


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """One process per run folder: a resubmitted job must not train into a folder its twin is still using."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another process is running in {run_dir} (it holds {run_dir / '.lock'}); wait for it "
                             f"to end or choose another folder with hydra.run.dir=...") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def set_threads(cfg) -> None:
    """CPU threads: `threads` when set, else the CPUs SLURM gave the job, else PyTorch's default (every core).

    Small models on a busy CPU are much faster with fewer threads: PyTorch's parallel regions wait for every thread,
    so one core taken by another process stalls each operation (measured here: a BatchNorm on 32x4x32x32 took 23 ms
    with 2 threads next to a busy process, 0.27 ms with 1)."""
    cpus = cfg.threads or os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and str(cpus).isdigit():
        torch.set_num_threads(int(cpus))


def prepare_run_dir(run_dir: Path, cfg: DictConfig) -> dict:
    """Write config.yaml, or check that an existing one describes the same experiment. Returns the resolved dict."""
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    path = run_dir / "config.yaml"
    if path.exists():
        old = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        diff = _differences(old, resolved)
        if diff:
            raise ValueError(f"run folder {run_dir} already holds a different experiment (differs in: "
                             f"{', '.join(diff)}); refusing to overwrite it. Choose another folder with "
                             f"hydra.run.dir=... or rerun with the same settings to resume it")
        log.info("resuming run in %s", run_dir)
    tmp = path.with_name(".config.yaml.tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
    os.replace(tmp, path)
    return resolved


class Run:
    """State shared by the units of one run folder."""

    def __init__(self, cfg: DictConfig, run_dir: Path, resolved: dict):
        self.cfg, self.dir, self.resolved = cfg, Path(run_dir), resolved
        self.device = resolve_device(cfg.device)
        d = cfg.dataset
        self.data = load_data(d.name, d.root, val_size=d.val_size, split_seed=cfg.seed, download=d.download,
                              verify=d.verify, augment=d.augment, device=self.device,
                              synthetic_shape=d.synthetic_shape, synthetic_train=d.synthetic_train,
                              synthetic_test=d.synthetic_test, synthetic_seed=cfg.seed)
        self.spe = Batches(self.data, cfg.train.batch_size, seed=0).steps_per_epoch
        if self.spe < 1:
            raise ValueError(f"train.batch_size={cfg.train.batch_size} is larger than the training set "
                             f"({len(self.data.train_x)} examples)")
        self.total = parse_steps(cfg.train.duration, self.spe, "train.duration")
        self.data_seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
        self.summary_path = self.dir / "summary.json"
        self.tracker = Tracker(self.dir, cfg, resolved, group=cfg.name)

    def new_model(self, init_seed: int | None = None):
        """Built and initialized on the CPU, so a seed gives the same weights on every device."""
        kwargs = OmegaConf.to_container(self.cfg.model, resolve=True)
        m = build_model(kwargs.pop("name"), self.data.input_shape, self.data.num_classes, **kwargs)
        if init_seed is not None:
            initialize(m, self.cfg.init, init_seed)
        return m.to(self.device)

    def record(self, level: int, branch: str, model, masks: M.Masks, result: dict) -> dict:
        remaining, total = M.count(masks)
        return {"level": level, "branch": branch, "replicate": self.cfg.seed,
                "weights_remaining": remaining / total if total else 1.0,
                "params_remaining": M.params_remaining(model, masks),
                "weights_remaining_count": remaining, "weights_total": total,
                "layer_density": M.density(masks),
                **{k: result[k] for k in ("test_accuracy", "test_loss", "val_loss", "val_accuracy", "early_stop_step",
                                          "early_stop_test_accuracy", "early_stop_val_loss", "start_step", "steps")},
                "experiment": self.cfg.name, "model": self.cfg.model.name, "dataset": self.cfg.dataset.name,
                "init": self.cfg.init.get("_target_") or self.cfg.init.name}

    def train_unit(self, level: int, branch: str, model, masks: M.Masks, start: int,
                   at_step: dict | None = None, on_done=None) -> dict:
        """Train one (level, branch) to the end, resuming from its checkpoint if one is there."""
        unit_dir = self.dir / "levels" / f"level_{level}" / branch
        ckpts = Checkpoints(unit_dir)
        resume = ckpts.load()
        if resume is not None:
            log.info("level %d %s: resuming from step %d", level, branch, resume["step"])
        ckpt_every = parse_steps(self.cfg.checkpoint.every, self.spe, "checkpoint.every")
        at_step = dict(at_step or {})
        self._add_faults(level, branch, at_step)
        try:
            result = train(model, masks, self.data, self.cfg, start=start, end=self.total, data_seed=self.data_seed,
                           desc=f"level {level} {branch}", resume=resume,
                           on_eval=lambda r: self.tracker.eval(level, branch, r),
                           on_train_log=lambda r: self.tracker.train(level, branch, r),
                           train_log_every=self.cfg.logger.log_every if self.cfg.logger.name != "none" else 0,
                           at_step=at_step, checkpoint=ckpts.save, checkpoint_every=ckpt_every,
                           should_stop=stop_requested)
        except Preempted:
            hand_over()
            raise
        record = self.record(level, branch, model, masks, result)
        if on_done is not None:  # files the next unit needs go first: result.json marks the unit as done
            on_done(record)
        save_json({**record, "evals": result["evals"]}, unit_dir / "result.json")
        ckpts.clear()
        self.tracker.level(record)
        self.write_summary()
        log.info("level %d %-12s weights remaining %6.2f%%  test acc %.4f  early-stop step %s (test acc %s)",
                 level, branch, 100 * record["weights_remaining"], record["test_accuracy"],
                 record["early_stop_step"], record["early_stop_test_accuracy"])
        return record

    def results(self) -> list[dict]:
        out = []
        for path in sorted(self.dir.glob("levels/level_*/*/result.json"),
                           key=lambda p: (int(p.parent.parent.name.split("_")[1]), p.parent.name != "ticket",
                                          p.parent.name)):
            rec = load_json(path)
            rec.pop("evals", None)
            out.append(rec)
        return out

    def write_summary(self) -> list[dict]:
        summary = self.results()
        save_json(summary, self.summary_path)
        return summary

    def _add_faults(self, level: int, branch: str, at_step: dict) -> None:
        """Test-only fault injection (`fault.signal_at`, `fault.kill_at`, with `fault.level`): fires once per folder."""
        fault = self.cfg.fault
        if not fault or fault.get("level", 0) != level or branch != fault.get("branch", "ticket"):
            return
        marker = self.dir / ".fault_fired"
        if marker.exists():
            return
        for key, sig in (("signal_at", getattr(signal, "SIGUSR2", signal.SIGTERM)), ("kill_at", signal.SIGKILL)):
            if fault.get(key) is None:
                continue
            step = int(fault[key])
            previous = at_step.get(step)

            def fire(previous=previous, sig=sig):
                if previous:
                    previous()
                marker.write_text(str(sig))
                os.kill(os.getpid(), sig)

            at_step[step] = fire

    def fault_after_level(self, level: int) -> None:
        """Test-only: `fault.kill_after_level=L` SIGKILLs the run once, after level L's units, before level L+1."""
        fault = self.cfg.fault
        if not fault or fault.get("kill_after_level") is None or int(fault.kill_after_level) != level:
            return
        marker = self.dir / ".fault_fired"
        if not marker.exists():
            marker.write_text(str(signal.SIGKILL))
            os.kill(os.getpid(), signal.SIGKILL)


def level_count(cfg, masks: M.Masks, prunable) -> int:
    p = cfg.pruning
    if p.strategy == "none":
        return 1
    if p.target is not None:
        return 2 if p.one_shot else len(pruning.plan_counts(masks, prunable, p))
    return p.levels


def run_experiment(cfg: DictConfig, run_dir) -> list[dict]:
    """Run (or resume) the experiment `cfg` in `run_dir`; returns the summary records."""
    validate(cfg)
    set_threads(cfg)
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        resolved = prepare_run_dir(run_dir, cfg)
        run = Run(cfg, run_dir, resolved)
        ok = False
        try:
            summary = _run_levels(run)
            ok = True
            return summary
        finally:
            run.tracker.finish(run.results(), ok=ok)


def _run_levels(run: Run) -> list[dict]:
    cfg, p = run.cfg, run.cfg.pruning
    rewind_step = parse_steps(p.rewind, run.spe, "pruning.rewind") if p.strategy != "none" else 0
    if rewind_step >= run.total:
        raise ValueError(f"pruning.rewind={p.rewind} ({rewind_step} steps) must come before the end of training "
                         f"(train.duration={cfg.train.duration}, {run.total} steps)")
    model = run.new_model(init_seed=cfg.seed)
    init_path = run.dir / "init.pt"
    if init_path.exists():
        model.load_state_dict(load_torch(init_path))
    else:
        save_torch(_cpu_state(model), init_path)
    init_state = _cpu_state(model)
    prunable = M.prunable_tensors(model, p)
    if p.strategy != "none" and not prunable:
        raise ValueError("nothing to prune: pruning.exclude removed every prunable tensor")
    masks = M.ones(model, prunable)
    n_levels = level_count(cfg, masks, prunable)
    rewind_path = run.dir / "rewind.pt"
    if rewind_step == 0 and not rewind_path.exists():
        save_torch(init_state, rewind_path)

    for level in range(n_levels):
        level_dir = run.dir / "levels" / f"level_{level}"
        ticket_path = level_dir / "ticket.pt"
        if level > 0:
            if ticket_path.exists():
                masks = M.from_bool(load_ticket(ticket_path).masks, model)
            else:
                trained = load_torch(level_dir.parent / f"level_{level - 1}" / "final.pt")
                keep = p.target if (p.one_shot and p.target is not None) else None
                masks = pruning.prune({n: trained[n].to(run.device) for n in masks}, masks, prunable, p,
                                      generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "prune", level)),
                                      keep_fraction=keep)
                rewind_state = load_torch(rewind_path)
                _write_ticket(run, level, masks, rewind_step, rewind_state, model, None)
        start = 0 if level == 0 else rewind_step

        if not (level_dir / "ticket" / "result.json").exists():
            if level == 0:
                model.load_state_dict(init_state)
                at_step = {} if rewind_path.exists() else {
                    rewind_step: lambda: save_torch(_cpu_state(model), rewind_path)}
            else:
                model.load_state_dict(load_torch(rewind_path))
                at_step = {}
            M.apply(model, masks)

            def finish_ticket(record, level=level, masks=masks):
                save_torch(_cpu_state(model), run.dir / "levels" / f"level_{level}" / "final.pt")
                _write_ticket(run, level, masks, rewind_step, load_torch(rewind_path), model, record)

            run.train_unit(level, "ticket", model, masks, start, at_step, on_done=finish_ticket)
            run.tracker.artifact(ticket_path, f"ticket-level{level}")

        for branch in p.branches if level > 0 else ():
            if (level_dir / branch / "result.json").exists():
                continue
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, branch, level))
            if branch == "reinit":
                control = run.new_model(init_seed=derive_seed(cfg.seed, "reinit", level))
                control_masks = masks
            else:
                control = run.new_model()
                control.load_state_dict(load_torch(rewind_path))
                control_masks = pruning.random_like(masks, gen) if branch == "random_prune" \
                    else pruning.shuffle(masks, gen)
            M.apply(control, control_masks)
            run.train_unit(level, branch, control, control_masks, start)
        run.fault_after_level(level)

    return run.write_summary()


def _cpu_state(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _write_ticket(run: Run, level: int, masks, rewind_step: int, rewind_state: dict, model, record) -> None:
    state = {k: v.clone() for k, v in rewind_state.items()}
    for name, m in masks.items():
        state[name] = state[name] * m.to(state[name].device, state[name].dtype)
    remaining, total = M.count(masks)
    save_ticket(run.dir / "levels" / f"level_{level}" / "ticket.pt", Ticket(
        level=level, masks=M.to_bool(masks), rewind_step=rewind_step, rewind_state=state, config=run.resolved,
        weights_remaining=remaining / total if total else 1.0, params_remaining=M.params_remaining(model, masks),
        metrics=record))


def retrain(cfg: DictConfig, ticket_path, run_dir) -> list[dict]:
    """Retrain a ticket in isolation (other seeds, data orders, optimizers, devices) with the same metrics."""
    validate(cfg)
    set_threads(cfg)
    ticket = load_ticket(ticket_path)
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        return _retrain(cfg, ticket, run_dir)


def _retrain(cfg: DictConfig, ticket: Ticket, run_dir: Path) -> list[dict]:
    resolved = prepare_run_dir(run_dir, cfg)
    run = Run(cfg, run_dir, resolved)
    ok = False
    try:
        model = run.new_model()
        masks = load_into(model, ticket)
        start = ticket.rewind_step
        if start >= run.total:
            raise ValueError(f"the ticket rewinds to step {start}, past the end of training ({run.total} steps)")
        if not (run.dir / "levels" / f"level_{ticket.level}" / "retrain" / "result.json").exists():
            run.train_unit(ticket.level, "retrain", model, masks, start)
        ok = True
        return run.write_summary()
    finally:
        run.tracker.finish(run.results(), ok=ok)
