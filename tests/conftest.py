"""Shared test helpers: Hydra compose over conf/, tiny configs, the real data folder, W&B kept out of $HOME."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from lottery.config import register_configs

# One thread in tests and in the processes they start: PyTorch's 2-thread parallel regions stall whenever the other
# core is busy (another test process, a benchmark), which made tiny models 10-100x slower here.
os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def data_root(environ) -> Path:
    """The real data (MNIST/raw, cifar-10-batches-py): $LOTTERY_DATA, or the development layout's ../shared/data."""
    return Path(environ.get("LOTTERY_DATA") or REPO.parent / "shared" / "data").expanduser()


DATA = data_root(os.environ)

# Small enough to train in well under a second per unit on two cores.
# `train.on_chance=continue`: a tiny model on tiny data sometimes learns nothing in 60 steps, and the tests built on
# TINY are about plumbing, not learning (tests/test_at_chance.py asks for the stop itself).
TINY = ["dataset=synthetic", "train.duration=60it", "train.eval_every=20it", "train.batch_size=32",
        "train.progress=false", "checkpoint.every=20it", "train.estimate=false", "train.on_chance=continue"]


def synthetic_split(shape: str = "mnist", n_train: int = 512, n_test: int = 128, val_size: int = 64,
                    augment: bool = False, seed: int = 0, split_seed: int = 0, device="cpu"):
    """A split of small synthetic data (lottery.data): `seed` draws the data, `split_seed` the validation split."""
    from lottery.data import load_pool, split
    pool = load_pool({"name": "synthetic", "synthetic_shape": shape, "synthetic_train": n_train,
                      "synthetic_test": n_test, "val_size": val_size, "augment": augment}, seed=seed, device=device)
    return split(pool, val_size, split_seed)


def train_one(model, masks, split, cfg, *, start: int = 0, data_seed: int = 0, hooks=None, resume=None, end=None,
              steps=None) -> dict:
    """One network through the training loop (lottery.training.train with N = 1); returns its result."""
    from lottery.core.steps import Steps
    from lottery.data import Batches
    from lottery.training import Hooks, Network, train
    batches = Batches(split, cfg.train.batch_size, data_seed)
    steps = steps or Steps.resolve(cfg, batches.steps_per_epoch)
    return train([Network(model, masks, batches, hooks or Hooks(), resume)], cfg, start=start, steps=steps,
                 end=end)[0]


def make_cfg(*overrides: str, config_name: str = "config"):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def tiny_cfg(*overrides: str):
    return make_cfg(*TINY, *overrides)


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600, entry: str = "lottery.cli:train",
            process: bool = False) -> subprocess.CompletedProcess:
    """Run a console-script entry point (`module:function`, as in pyproject.toml) as a user would, and return its
    exit status, stdout and stderr. In this process (`in_process`) where that is the same, since a new interpreter
    pays 3-5 s importing torch and Hydra; in a new one (`process=True`, or whatever `in_process` cannot run: another
    entry point, user modules, a launcher, an environment beyond `IN_PROCESS_ENV`) where the process is the point:
    signals, faults that kill it, what happens before torch loads."""
    if not process and _in_process_ok(args, env, entry, cwd):
        return in_process(*args, cwd=cwd, env=env, entry=entry, returns=True)
    module, function = entry.split(":")
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    # as the console script does: the function's return value is the exit status (lottery-report returns 2)
    code = f"import sys; sys.argv[0] = {function!r}; from {module} import {function}; sys.exit({function}())"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


# --- entry points in the test process ---------------------------------------------------------------------------

IN_PROCESS_ENTRIES = ("lottery.cli:train", "lottery.cli:retrain", "lottery.report:main", "lottery.init_study:main",
                      "lottery.export:main")
# Variables a test may give an in-process run: set in os.environ for the run and restored after it.
IN_PROCESS_ENV = ("OMP_NUM_THREADS",)


def _in_process_ok(args, env, entry, cwd) -> bool:
    """Whether `in_process` gives what a new process would: one of our entry points, no user modules to import (they
    register into process-wide registries and stay in sys.modules), no launcher (submitit and SLURM start processes
    of their own), and only environment variables it sets for the run (a PYTHONPATH or a fault to inject is not).
    One exception: the same command again after its injected fault fired (the faults plugin's marker file exists)
    runs as the plain command does (the resume half of the kill tests); never a fault still to fire, since a SIGKILL
    would end the test process."""
    if entry not in IN_PROCESS_ENTRIES:
        return False
    if any(a.lstrip("+~").startswith(("launcher=", "hydra/launcher")) for a in args):
        return False
    imports = [a for a in args if a.lstrip("+~").startswith(("imports", "--imports"))]
    if not imports:
        return all(k in IN_PROCESS_ENV for k in (env or {}))
    if entry != "lottery.cli:train" or imports != ["imports=[faults]"]:
        return False
    return all(k in (*IN_PROCESS_ENV, *FAULT_ENV) for k in (env or {})) and _spent_fault(args, env or {}, cwd)


def _spent_fault(args, env: dict, cwd) -> bool:
    """Whether the fault that `env` injects has fired: its marker file (tests/plugins/faults.py) exists. A fault
    limited to some folders (`where=`) counts as not spent."""
    spec = dict(kv.split("=", 1) for kv in env.get("LOTTERY_FAULT", "").split(",") if kv)
    if not spec or "where" in spec:
        return False
    marker = spec.get("marker")
    if marker is None:
        run_dir = next((a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")), None)
        if run_dir is None:
            return False
        marker = Path(cwd) / run_dir / ".fault_fired"
    return (Path(cwd) / marker).exists()


# The environment of a fault injection (fault()), which in_process gives a spent fault's rerun.
FAULT_ENV = ("LOTTERY_FAULT", "PYTHONPATH")


def in_process(*args: str, cwd: Path, env: dict | None = None, entry: str = "lottery.cli:train",
               returns: bool = False):
    """An entry point called in this process as `python -c "from <module> import <function>; <function>()"` runs it
    (`returns`: as `sys.exit(<function>())`, its return value the exit status, as a console script does):
    sys.argv, cwd and the environment set for the call; stdout and stderr captured (Hydra's log handlers are made
    inside, so they write there too); SystemExit as the exit status, an uncaught exception as its traceback and
    status 1, as the interpreter does. What the call leaves behind in this process is put back: Hydra's global state,
    logging, signal handlers, warnings filters, torch's thread count, and lottery.cli's record of a multirun."""
    import importlib
    import io
    import logging
    import signal
    import threading
    import traceback
    import warnings

    from lottery.core import threads

    module, function = entry.split(":")
    env = dict(env or {})
    if entry.startswith("lottery.cli:"):  # lottery.cli sets the wait policy when it is imported before torch
        name, value = threads.DEFAULT_WAIT
        if not any(v in {**os.environ, **env} for v in threads.WAIT_VARIABLES):
            env[name] = value
    saved_env = {k: os.environ.get(k) for k in env}
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    root = logging.getLogger()
    loggers = [root, *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    saved_loggers = [(lg, lg.level, list(lg.handlers), lg.propagate, lg.disabled) for lg in loggers]
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR2", None))
                     if s is not None}
    saved_threads = torch.get_num_threads()
    from lottery.experiment.callbacks import CALLBACKS

    out, err = io.StringIO(), io.StringIO()
    code = 0
    # PYTHONPATH (tests/plugins for `imports=[faults]`) as a new interpreter reads it: on sys.path for the call; the
    # modules it imports from there are dropped after it, so that the next call imports (and registers) them again
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    registrations = contextlib.ExitStack()
    registries = registrations.enter_context(_registrations_undone(paths))
    sys.path[:0] = paths
    real_kill = os.kill

    def kill(pid, sig):  # a SIGKILL of this process would take the whole test worker down: fail the test instead
        if pid == os.getpid() and sig == signal.SIGKILL:
            raise AssertionError("an in-process run sent SIGKILL to itself; run it with run_cli(..., process=True)")
        real_kill(pid, sig)

    os.kill = kill
    _reset_lottery_state()
    try:
        for r in registries:  # what test modules registered here (tiny_convbn, ...) a new process does not have
            for name in [n for n, entry in r.items() if not _ours(entry)]:
                del r[name]
        CALLBACKS[:] = [c for c in CALLBACKS if _ours(type(c))]
        os.environ.update(env)
        os.chdir(cwd)
        sys.argv = [function, *args]
        GlobalHydra.instance().clear()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.resetwarnings()  # a new interpreter's filters, and its way of showing a warning: on stderr
            for action, category, mod in (("default", DeprecationWarning, "__main__"),
                                          ("ignore", DeprecationWarning, None),
                                          ("ignore", PendingDeprecationWarning, None), ("ignore", ImportWarning, None),
                                          ("ignore", ResourceWarning, None)):
                warnings.filterwarnings(action, category=category, module=mod or "")
            warnings.showwarning = warnings._showwarning_orig
            try:
                status = getattr(importlib.import_module(module), function)()
                if returns:
                    sys.exit(status)
            except SystemExit as e:
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:  # sys.exit("message"): printed, status 1
                    print(e.code, file=sys.stderr)
                    code = 1
            except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
    finally:
        for lg, level, handlers, propagate, disabled in saved_loggers:
            for h in lg.handlers:
                if h not in handlers:
                    h.close()
            lg.setLevel(level)
            lg.handlers[:] = handlers
            lg.propagate, lg.disabled = propagate, disabled
        if threading.current_thread() is threading.main_thread():  # only there can a handler have been set
            for s, handler in saved_signals.items():
                signal.signal(s, handler)
        GlobalHydra.instance().clear()
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        registrations.close()
        os.kill = real_kill
        _reset_lottery_state()
        torch.set_num_threads(saved_threads)
        for p in paths:
            sys.path.remove(p)
    return subprocess.CompletedProcess([function, *args], code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _registrations_undone(paths):
    """What a user's module registers when imported (registry entries; CALLBACKS, a list of instances) is undone after
    the block, and the modules imported from `paths` are dropped from sys.modules, as if the block had run in a
    process of its own. Yields the registries."""
    from lottery.experiment.callbacks import CALLBACKS

    saved = [(r, dict(r)) for r in _lottery_registries()]
    callbacks, modules = list(CALLBACKS), set(sys.modules)
    try:
        yield [r for r, _ in saved]
    finally:
        for r, entries in saved:
            r.clear()
            r.update(entries)
        CALLBACKS[:] = callbacks
        for name in set(sys.modules) - modules:
            origin = getattr(sys.modules[name], "__file__", None) or ""
            if any(origin.startswith(str(p)) for p in paths):
                del sys.modules[name]


def _lottery_registries() -> list:
    """Every registry of named things (lottery.core.registry.Registry) in lottery's imported modules."""
    from lottery.core.registry import Registry
    found = {}
    for name, mod in list(sys.modules.items()):
        if name == "lottery" or name.startswith("lottery."):
            for value in list(vars(mod).values()):
                if isinstance(value, Registry):
                    found[id(value)] = value
    return list(found.values())


def _ours(entry) -> bool:
    """Whether a registry entry comes from lottery itself (not from a test module or a user's module)."""
    module = getattr(entry, "__module__", None)
    return module is None or module == "lottery" or module.startswith("lottery.")


def _reset_lottery_state() -> None:
    """The process-wide records an entry point keeps until its process exits."""
    cli = sys.modules.get("lottery.cli")
    if cli is not None:
        cli._FAILED_JOBS.clear()
        cli._MULTIRUN.clear()
        for f in cli._SWEEP_LOCKS:  # a sweep folder's lock, held until the process exits
            f.close()
        cli._SWEEP_LOCKS.clear()
    checks = sys.modules.get("lottery.launch.checks")
    if checks is not None:
        checks.CREATED.clear()
    signals = sys.modules.get("lottery.core.signals")
    if signals is not None:
        signals._stop["signal"] = None
        signals._stop["previous"].clear()


PLUGINS = REPO / "tests" / "plugins"


@pytest.fixture
def plugins_on_path(monkeypatch):
    """tests/plugins on sys.path for a test that imports a user's module in this process (imports=[my_lottery_ext]).
    What the module registers (datasets, branches, updaters, callbacks) and the module itself are gone after the
    test, as they would be with its process: no later test in this worker sees them (test_data's registry check
    did, depending on which tests the worker had run before)."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    with _registrations_undone([PLUGINS]):
        yield


def plugins_env(env: dict | None = None) -> dict:
    """`env` plus tests/plugins on PYTHONPATH (the user-extension examples and the fault injection)."""
    return {**(env or {}), "PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")])}


def fault(env: dict | None = None, **spec) -> tuple[list[str], dict]:
    """(command-line arguments, environment) that make a run hit a fault once (tests/plugins/faults.py), e.g.
    `fault(kill_at=30, level=1, branch="reinit")`."""
    text = ",".join(f"{k}={v}" for k, v in spec.items())
    return ["imports=[faults]"], plugins_env({**(env or {}), "LOTTERY_FAULT": text})


# Keys of a record that say how long it took, not what it computed: left out when two runs' results are compared.
VOLATILE = ("wall_time_s", "device_info", "provenance")


def stable(records):
    """Records (a list, or {key: record}) without their VOLATILE keys, for comparing two runs' results."""
    if isinstance(records, dict):
        return {k: stable([v])[0] for k, v in records.items()}
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


def needs_data(*parts: str):
    """Mark a test that reads the real data at DATA/<parts>: skipped where it is missing, failed under CI=true."""
    return pytest.mark.real_data(*parts)


CI = os.environ.get("CI", "").lower() == "true"


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("real_data")
    if marker is not None:
        path = DATA.joinpath(*marker.args)
        if not path.exists():
            if CI:  # CI must run the real-data tests: missing data is a broken set-up, not a reason to skip
                pytest.fail(f"CI=true and the real data this test needs is missing: {path}")
            pytest.skip(f"real data not found at {path}")
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, and one more when the SLURM tests will run. Their worker spends ~220 s waiting
    for the cluster (its 30 s time-limit checks, requeues, paced jobs), and its core would stand idle meanwhile: with
    the extra worker the other two keep both cores busy (the same work, so no test gets less CPU in total)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    markexpr = config.getoption("markexpr", "") or ""
    slurm = "not slurm" not in markexpr.replace("  ", " ") and (_cluster_up() or _why_no_cluster() is None)
    return cores + 1 if slurm else cores


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # Under pytest-xdist (--dist loadgroup) every test of the one-node SLURM cluster runs in one worker, one after
    # another: they share its single node and its queue, and a second worker's jobs would wait behind the first's.
    # tryfirst: xdist's worker turns the xdist_group marker into the "@slurm" suffix loadgroup schedules by in its own
    # pytest_collection_modifyitems, which otherwise ran before this one and saw no marker (the SLURM tests were
    # spread over every worker, each starting the cluster).
    for item in items:
        if item.get_closest_marker("slurm") is not None:
            item.add_marker(pytest.mark.xdist_group("slurm"))
    # That group first: its ~220 s are mostly waits for the cluster, which then overlap the other workers' tests
    # instead of ending the run with one busy worker; then the slow tests (over ~2 s each), and the many short ones
    # last, to even out the workers' ends (xdist hands out work one test or group at a time, in collection order).
    items.sort(key=lambda item: (item.get_closest_marker("slurm") is None, item.get_closest_marker("slow") is None))


@pytest.fixture(autouse=True)
def _wandb_offline(tmp_path_factory, monkeypatch):
    wandb_home = tmp_path_factory.mktemp("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(wandb_home))


@pytest.fixture(autouse=True, scope="session")
def _wandb_teardown():
    """Stop wandb's service once the tests that ran it in this process are done: left to the interpreter's exit, its
    threads print a 'Logging error' traceback after pytest's summary."""
    yield
    if "wandb" in sys.modules:
        try:
            sys.modules["wandb"].teardown()
        except Exception as e:  # noqa: BLE001 - tidying up after the tests must not fail them
            print(f"wandb.teardown() failed: {e!r}", file=sys.stderr)


# --- a real one-node SLURM cluster (scripts/slurm/local-cluster.sh) -----------------------------------------------

LOCAL_CLUSTER = REPO / "scripts" / "slurm" / "local-cluster.sh"


def _cluster_up() -> bool:
    try:
        r = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0 and any(s.startswith(("idle", "mixed", "allocated")) for s in r.stdout.split())


def _why_no_cluster() -> str | None:
    """None when this machine can run the local cluster, else why not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the local SLURM cluster needs root (scripts/slurm/local-cluster.sh installs and starts daemons)"
    if not Path("/etc/debian_version").exists():
        return "the local SLURM cluster needs Debian or Ubuntu (apt-get)"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """A one-node SLURM cluster for the `slurm` tests: the running one (`.ci/run` starts it), or one started here and
    stopped at the end of the session. Where it cannot be had the tests are skipped, except under CI=true, where
    they fail: CI must run them."""
    if _cluster_up():
        yield
        return
    reason = _why_no_cluster()
    if reason is None:
        r = subprocess.run(["bash", str(LOCAL_CLUSTER), "start"], capture_output=True, text=True, timeout=600)
        if r.returncode != 0 or not _cluster_up():
            reason = f"scripts/slurm/local-cluster.sh start failed: {(r.stdout + r.stderr).strip()[-2000:]}"
        else:
            yield
            subprocess.run(["bash", str(LOCAL_CLUSTER), "stop"], capture_output=True, timeout=300)
            return
    if CI:
        pytest.fail(f"CI must run the slurm tests, but: {reason}")
    pytest.skip(reason)


# --- the slurm tests by name at the end of every run ------------------------------------------------------------
# `pytest -q` prints dots; whether the real-cluster tests ran or were skipped must be visible in CI's output.
_SLURM_OUTCOMES: dict[str, str] = {}


def pytest_runtest_logreport(report):
    if "slurm" in report.keywords and (report.when == "call" or report.outcome != "passed"):
        _SLURM_OUTCOMES[report.nodeid] = report.outcome


def pytest_terminal_summary(terminalreporter):
    if _SLURM_OUTCOMES:
        terminalreporter.section("real SLURM cluster tests")
        for nodeid, outcome in _SLURM_OUTCOMES.items():
            terminalreporter.write_line(f"{outcome.upper():8s} {nodeid}")
