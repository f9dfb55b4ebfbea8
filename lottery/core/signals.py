"""Stop requests: SIGUSR2 (SLURM's warning before a time limit) and SIGTERM (preemption) ask the training loop to
checkpoint and stop; `Preempted` is what the loop raises once the checkpoint is on disk."""
from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)


class Preempted(Exception):
    """Raised after a checkpoint was written because the job was asked to stop (SIGUSR2/SIGTERM)."""


_stop: dict = {"signal": None, "previous": {}}


def _handler(signum, frame):
    _stop["signal"] = signum
    log.warning("received %s: will checkpoint and stop at the next step", signal.Signals(signum).name)


def install_stop_handlers() -> None:
    """SIGUSR2 (SLURM's warning before a time limit, as submitit configures it) and SIGTERM (preemption) ask the
    training loop to checkpoint and stop. The handlers they replace (submitit's, which requeue the job) are kept and
    called by `hand_over` once the checkpoint is on disk, so the requeued job finds it."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (getattr(signal, "SIGUSR2", None), signal.SIGTERM):
        if sig is not None:
            previous = signal.signal(sig, _handler)
            if previous is not _handler:
                _stop["previous"][sig] = previous


def stop_requested() -> bool:
    return _stop["signal"] is not None


def hand_over() -> None:
    """After the checkpoint: let the replaced handler (submitit's requeue) act on the signal we caught."""
    signum = _stop["signal"]
    previous = _stop["previous"].get(signum)
    _stop["signal"] = None
    if callable(previous):
        log.warning("checkpoint written; handing %s to the launcher to requeue the job", signal.Signals(signum).name)
        previous(signum, None)


def stop_if_asked(what: str) -> None:
    """Between pieces of work that write no checkpoint (set-up, between units): a stop signal ends the job here,
    handing the signal to the launcher first (submitit requeues the job), with nothing lost."""
    if stop_requested():
        hand_over()
        raise Preempted(f"stopped {what}; nothing was lost")
