"""Stop requests: SIGUSR2 (SLURM's warning before a time limit), SIGTERM (preemption) and SIGINT (Ctrl-C) ask the
training loop to checkpoint and stop; `Preempted` is what the loop raises once the checkpoint is on disk. A second
Ctrl-C stops at once (`Interrupted`), without waiting for the checkpoint."""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)


class Preempted(Exception):
    """Raised after a checkpoint was written because the job was asked to stop (SIGUSR2/SIGTERM)."""


class Interrupted(Exception):
    """A second Ctrl-C while the first one's checkpoint was pending: the process stops at once."""


_stop: dict = {"signal": None, "previous": {}}


def _handler(signum, frame):
    if signum == signal.SIGINT and _stop["signal"] == signal.SIGINT:
        _stop["signal"] = None
        raise Interrupted("interrupted twice: stopped at once, without a new checkpoint")
    _stop["signal"] = signum
    if signum == signal.SIGINT:
        log.warning("Ctrl-C: will checkpoint and stop at the next step (Ctrl-C again stops at once)")
    else:
        log.warning("received %s: will checkpoint and stop at the next step", signal.Signals(signum).name)


def install_stop_handlers() -> None:
    """SIGUSR2 (SLURM's warning before a time limit, as submitit configures it), SIGTERM (preemption) and SIGINT
    (Ctrl-C, treated like SIGTERM) ask the training loop to checkpoint and stop. The handlers they replace
    (submitit's, which requeue the job) are kept and called by `hand_over` once the checkpoint is on disk, so the
    requeued job finds it."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (getattr(signal, "SIGUSR2", None), signal.SIGTERM, signal.SIGINT):
        if sig is not None:
            previous = signal.signal(sig, _handler)
            if previous is not _handler and sig != signal.SIGINT:  # Python's SIGINT handler raises KeyboardInterrupt
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
