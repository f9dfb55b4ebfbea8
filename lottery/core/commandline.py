"""What every entry point checks of its command line and its installation before Hydra starts, each answered in one
line: `--version`, a PyTorch that cannot be imported, and a key that the composed config does not have (with the nearest
one that it has). A torchvision that cannot be imported (a broken or mismatched pair) is the same one line where a run
first needs it (`require_torchvision`)."""

from __future__ import annotations

import contextlib
import difflib
import io
import os
import platform
from typing import Any

# Exit status of an entry point whose PyTorch or torchvision cannot be imported: EX_CONFIG (the installation is wrong).
BROKEN_INSTALL_EXIT = 78


def version_line() -> str:
    """`lottery 0.1.0 (torch 2.4.1, torchvision 0.19.1, Python 3.11.7)`."""
    from importlib import metadata

    from lottery import __version__

    def of(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return (
        f"lottery {__version__} (torch {of('torch')}, torchvision {of('torchvision')}, "
        f"Python {platform.python_version()})"
    )


_QUICK_EXIT = False


def quick_exit() -> None:
    """Skip CPython's last garbage collection at exit. It walks every object still alive, and with torch,
    torch._dynamo (imported by torch.optim's first optimizer) and sympy loaded that is 0.8 s of a 5-step run's 3.4 s
    on a 2-core CPU, spent after the run has ended. gc.freeze as an atexit handler moves them out of its reach; they
    are still released by reference counting, and nothing here relies on that collection: files are closed when
    written, logs are flushed by logging's own atexit handler. Registered once per process (the test suite runs
    entry points in its own process too)."""
    global _QUICK_EXIT
    if not _QUICK_EXIT:
        import atexit
        import gc

        atexit.register(gc.freeze)
        _QUICK_EXIT = True


class BrokenInstall(RuntimeError):
    """torch or torchvision cannot be imported: the installation is wrong (entry points exit BROKEN_INSTALL_EXIT)."""


def import_error(name: str) -> str | None:
    """One line when package `name` (torch or torchvision) cannot be imported (a broken install, or a torchvision
    built for another torch: `operator torchvision::nms does not exist`), else None."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torchvision's own warnings say the same at length
            __import__(name)
    except Exception as e:  # noqa: BLE001 - ImportError, OSError (a missing library), RuntimeError (ops)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        from importlib import metadata

        versions = []
        for pkg in ("torch", "torchvision"):
            with contextlib.suppress(metadata.PackageNotFoundError):
                versions.append(f"{pkg} {metadata.version(pkg)}")
        return (
            f"{name} cannot be imported ({type(e).__name__}: {first}); installed: "
            f"{', '.join(versions) or 'neither torch nor torchvision'}. torch and torchvision must be a "
            f"matching pair from one index: reinstall both, e.g. for the CPU: "
            f"pip install --force-reinstall torch torchvision --index-url https://download.pytorch.org/whl/cpu"
        )
    return None


def install_error() -> str | None:
    """One line when torch cannot be imported, else None. torchvision is checked where it is first needed
    (`require_torchvision`): only CIFAR-10 and downloads use it, and its models and ops are 0.2 s of a start-up."""
    return import_error("torch")


def require_torchvision() -> None:
    """Import torchvision, or raise BrokenInstall with the one line that says why it cannot be."""
    broken = import_error("torchvision")
    if broken:
        raise BrokenInstall(broken)


def exit_early(args: list[str]) -> None:
    """What every Hydra entry point does before composing: `--version` prints the versions and exits 0; a broken
    torch is one line and exit BROKEN_INSTALL_EXIT; the process will end without the last garbage collection."""
    import sys

    quick_exit()
    if "--version" in args:
        print(version_line())
        sys.exit(0)
    broken = install_error()
    if broken:
        print(f"error: {broken}", file=sys.stderr)
        sys.exit(BROKEN_INSTALL_EXIT)


def _keys(node, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig

    out = []
    for k in node.keys() if isinstance(node, DictConfig) else ():
        key = f"{prefix}{k!s}"
        out.append(key)
        child = node._get_node(k)
        if isinstance(child, DictConfig):
            out.extend(_keys(child, key + "."))
    return out


def unknown_key(args: list[str], conf_dir: str, config_name: str, schema=None) -> str | None:
    """`train.duraton=300it` as one line naming the nearest key the config has, before Hydra starts (its own error
    is several lines). The config is composed with the command line's config-group choices; keys below an open node
    (dataset, optimizer, ...: checked against their registries later), `+key` additions and Hydra's own keys are left
    to the later checks. A command line this cannot parse or compose is left to Hydra. `schema`: the config's typed
    schema (every key it can have), which answers without composing."""
    from hydra._internal.config_repository import ConfigRepository
    from hydra._internal.utils import create_config_search_path, get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, OverrideType
    from omegaconf import DictConfig

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            parsed = get_args_parser().parse_args(args)
        if parsed.config_dir or parsed.config_name or parsed.config_path:
            return None  # another config than ours: Hydra knows it
        overrides = OverridesParser.create().parse_overrides(parsed.overrides)
    except (Exception, SystemExit):  # noqa: BLE001 - a command line it cannot parse: Hydra reports it
        return None
    repo = ConfigRepository(config_search_path=create_config_search_path(conf_dir))
    choices, keys = [], []
    for o in overrides:
        name = o.key_or_group
        if name.startswith("hydra") or o.is_delete():
            continue
        if repo.group_exists(name.split("@")[0]):
            value: Any = o.value()  # a choice or a sweep of them; only a string is a choice here
            if isinstance(value, ChoiceSweep):
                value = value.list[0] if value.list else None
            if isinstance(value, str):
                choices.append(f"{name}={value}")
        elif o.type == OverrideType.CHANGE:
            keys.append(name)
    if not keys:
        return None
    if schema is not None:
        cfg = schema
    else:
        cfg = _compose(conf_dir, config_name, choices)
        if cfg is None:
            return None
    every = None
    for key in keys:
        node = cfg
        for part in key.split("."):
            if (
                not isinstance(node, DictConfig)
                or node._get_flag("struct") is False
                or (schema is not None and node._metadata.object_type in (None, dict))
            ):
                break  # an open node (dataset, optimizer, ...: its registry checks its keys later), or a mapping
            if part not in list(node.keys()):  # (`in` is False for a key whose value is ??? too)
                every = every or [k for k in _keys(cfg) if not k.startswith("hydra")]
                near = difflib.get_close_matches(key, every, n=1, cutoff=0.6)
                hint = f"; did you mean {near[0]}?" if near else "; `--cfg job` prints every key"
                return f"unknown key '{key}'{hint}"
            node = node._get_node(part)
    return None


def _compose(conf_dir: str, config_name: str, choices: list[str]):
    from hydra import compose, initialize_config_dir, initialize_config_module

    try:
        init = (
            initialize_config_module(conf_dir[len("pkg://") :], version_base="1.3")
            if conf_dir.startswith("pkg://")
            else initialize_config_dir(os.path.abspath(conf_dir), version_base="1.3")
        )
        with init, contextlib.redirect_stderr(io.StringIO()):
            return compose(config_name=config_name, overrides=choices)
    except Exception:  # noqa: BLE001 - e.g. a `???` value: Hydra says it
        return None
