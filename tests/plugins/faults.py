"""Fault injection for the resume tests, as a callback of the experiment (lottery.experiment.callbacks): nothing of it
is in the user's config. Loaded with `imports=[faults]` (this folder on PYTHONPATH) and told what to do by the
environment variable LOTTERY_FAULT, comma-separated `key=value` pairs:

    signal_at=K / kill_at=K   SIGUSR2 / SIGKILL this process after step K of the unit given by
    term_at=K                 SIGTERM this process after step K (a job stopped by its scheduler)
    interrupt_at=K            SIGINT (Ctrl-C) likewise; with twice=1 a second SIGINT right after the first
    level=L, branch=B         (default: level 0, the ticket; B may name a branch's unit as branch/unit)
    kill_after_level=L        SIGKILL once level L's units all have their results
    where=GLOB                only in run folders whose path matches GLOB (e.g. */0_* for job 0 of a sweep)
    marker=PATH               the file that says the fault has fired (default: .fault_fired in the run folder, or in
                              the replicas parent folder), so a rerun of the same command does not fire it again
    pace_ms=T                 every unit's training takes at least T ms a step (checked every 100 steps), so that a
                              test waiting for an outside event (a SLURM time limit) does not depend on this CPU's speed;
                              sleeping changes nothing that is computed
"""
import fnmatch
import os
import signal
import time
from pathlib import Path

from lottery.experiment import Callback, register_callback


def _spec() -> dict:
    text = os.environ.get("LOTTERY_FAULT", "")
    return dict(kv.split("=", 1) for kv in text.split(",") if kv)


class Faults(Callback):
    def __init__(self):
        self.spec = _spec()

    def _marker(self, folder: Path, parent) -> Path:
        return Path(self.spec["marker"]) if "marker" in self.spec else Path(parent or folder) / ".fault_fired"

    def _fire(self, marker: Path, sig) -> None:
        marker.write_text(str(sig))
        os.kill(os.getpid(), sig)
        if sig == signal.SIGINT and self.spec.get("twice") == "1":
            os.kill(os.getpid(), sig)

    def _here(self, folder: Path) -> bool:
        where = self.spec.get("where")
        return where is None or fnmatch.fnmatch(str(folder), where)

    def unit_steps(self, unit):
        s = self.spec
        if not s or int(s.get("level", 0)) != unit.level or unit.tag != s.get("branch", "ticket"):
            return {}
        marker = self._marker(unit.folder, unit.parent)
        if not self._here(unit.folder) or marker.exists():
            return {}
        out = {}
        for key, sig in (("signal_at", getattr(signal, "SIGUSR2", signal.SIGTERM)), ("kill_at", signal.SIGKILL),
                         ("term_at", signal.SIGTERM), ("interrupt_at", signal.SIGINT)):
            if s.get(key) not in (None, "", "null"):
                out[int(s[key])] = lambda sig=sig: self._fire(marker, sig)
        return out

    def level_done(self, level, folders, parent):
        if int(self.spec.get("kill_after_level", -1)) != level or not self._here(folders[0]):
            return
        marker = self._marker(folders[0], parent)
        if not marker.exists():
            self._fire(marker, signal.SIGKILL)


class Pace(Callback):
    EVERY = 100
    LAST = 10 ** 6

    def __init__(self):
        self.seconds = float(_spec().get("pace_ms", 0)) / 1000

    def unit_steps(self, unit):
        if not self.seconds:
            return {}
        first = {}  # (step, time) of the first call in this process: a resumed unit is paced from where it resumed

        def wait(step):
            s0, t0 = first.setdefault("at", (step, time.monotonic()))
            time.sleep(max(0.0, t0 + (step - s0) * self.seconds - time.monotonic()))

        return {k: (lambda k=k: wait(k)) for k in range(0, self.LAST + 1, self.EVERY)}


register_callback(Faults())
register_callback(Pace())
