"""What the units of one run folder share: its config and folder, its data (a split of a shared pool), its durations,
its seeds, and the weights everything starts from (initialization, the rewind point, level 0's state at the steps a
branch starts from). A plain run has one replicate; `replicas=R` has R, each with its own folder."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from lottery import masks as M
from lottery.config import Config, plain_values
from lottery.core.files import load_torch, save_torch
from lottery.core.steps import Steps
from lottery.data import Batches, Split
from lottery.experiment.folder import RunFolder
from lottery.experiment.tracking import Tracker
from lottery.init import initialize
from lottery.models import build_model
from lottery.training import Network, Training, train

log = logging.getLogger(__name__)


def cpu_state(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class Replicate:
    def __init__(
        self,
        cfg: Config,
        folder: RunFolder,
        split: Split,
        steps: Steps,
        capture_steps: list[int],
        device: torch.device,
        device_info: dict,
    ):
        # the replicate's settings, typed (lottery.config.typed): what the level loop, the units, the branches and the
        # pruning read; the folder's config.yaml is written from `resolved`, the same values as plain data
        self.cfg, self.folder, self.split, self.steps = cfg, folder, split, steps
        self.training = Training.of(cfg)  # what the training loop reads of it
        self.capture_steps = capture_steps  # level-0 steps whose state a branch starts from (besides 0 and rewind)
        self.device, self.device_info = device, device_info
        self.seed = cfg.seed
        self.name = ""  # "replicate <seed>: " in the log lines of a replicas run, where several seeds share a log
        self.data_seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
        self._tracker: Tracker | None = None  # set by the session once the folder is written
        self.resolved: dict = {}
        self.extends: tuple[int, int] | None = None  # (levels the folder had, levels now): a run extended
        # the thread count its evaluations get (lottery.core.threads.Threads.evaluation), set by the session
        self.evaluation_threads: int | None = None
        self._rewind_state: dict | None = None

    @property
    def tracker(self) -> Tracker:
        """Its metrics and W&B runs; set by the session before any training."""
        assert self._tracker is not None, "the session sets the tracker before any training"
        return self._tracker

    @tracker.setter
    def tracker(self, tracker: Tracker) -> None:
        self._tracker = tracker

    def batches(self, data_seed: int | None = None) -> Batches:
        """Training batches in the order of `data_seed` (default: the replicate's)."""
        return Batches(self.split, self.cfg.train.batch_size, self.data_seed if data_seed is None else data_seed)

    def new_model(self, init_seed: int | None = None):
        """Built and initialized on the CPU, so a seed gives the same weights on every device."""
        kwargs = plain_values(self.cfg.model)
        pool = self.split.pool
        m = build_model(kwargs.pop("name"), pool.input_shape, pool.num_classes, **kwargs)
        if init_seed is not None:
            initialize(m, self.cfg.init, init_seed)
        return m.to(self.device)

    def prunable(self, model) -> list[M.Prunable]:
        return M.prunable_tensors(model, self.cfg.pruning)

    # --- the weights units start from ---------------------------------------------------------------------------
    @property
    def rewind_state(self) -> dict:
        """Full state at the rewind point, read from disk at most once per process."""
        if self._rewind_state is None:
            self._rewind_state = load_torch(self.folder.rewind)
        return self._rewind_state

    def set_rewind_state(self, state: dict, save: bool = True) -> None:
        if save:
            save_torch(state, self.folder.rewind)
        self._rewind_state = state

    def state_at(self, step: int) -> dict:
        """Level 0's full state after `step` steps: saved while level 0 trained (a branch's `capture`), or, for a
        run whose level 0 ended before the branch was added, recomputed by training from init.pt to `step` (data
        order and schedule are functions of the step, so the replay is the same computation)."""
        if step == self.steps.rewind:
            return self.rewind_state
        if step == 0:
            return load_torch(self.folder.init)
        path = self.folder.state_path(step)
        if not path.exists():
            self._replay_level0(sorted({step, *[k for k in self.capture_steps if k < step]}))
        return load_torch(path)

    def _replay_level0(self, wanted: list[int]) -> None:
        from lottery.training import Hooks

        missing = [k for k in wanted if not self.folder.state_path(k).exists()]
        log.info(
            "level 0: state at step(s) %s was not saved while level 0 trained; replaying level 0 to step %d",
            missing,
            missing[-1],
        )
        model = self.new_model()
        model.load_state_dict(load_torch(self.folder.init))
        masks = M.ones(model, self.prunable(model))

        def saver(k: int) -> Callable[[], None]:  # the hook that saves the state at step k
            return lambda: save_torch(cpu_state(model), self.folder.state_path(k))

        at_step = {k: saver(k) for k in missing}
        train(
            [Network(model, masks, self.batches(), Hooks(at_step=at_step))],
            self.training,
            start=0,
            end=missing[-1],
            steps=self.steps,
            desc="level 0 replay",
            evaluation_threads=self.evaluation_threads,
        )

    def capture_hooks(self, model) -> dict:
        """At-step hooks for level 0's ticket: save the rewind state and the states branches start from, once."""
        folder = self.folder

        def saver(k: int) -> Callable[[], None]:  # the hook that saves the state at step k
            return lambda: save_torch(cpu_state(model), folder.state_path(k))

        at_step: dict[int, Callable[[], None]] = (
            {} if folder.rewind.exists() else {self.steps.rewind: lambda: self.set_rewind_state(cpu_state(model))}
        )
        for k in self.capture_steps:
            if not folder.state_path(k).exists():
                at_step[k] = saver(k)
        return at_step
