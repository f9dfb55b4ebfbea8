"""Where a result came from: the lottery version (and git commit, with a dirty flag, when run from a checkout), torch,
Python and the host. Computed once per process."""

from __future__ import annotations

import functools
import platform
import socket
import subprocess
from pathlib import Path


@functools.lru_cache(maxsize=1)
def provenance() -> dict:
    import torch

    try:
        from importlib.metadata import version

        package = version("lottery")
    except Exception:  # noqa: BLE001 - not installed (PYTHONPATH)
        package = None
    out: dict[str, str | bool | None]
    out = {
        "lottery": package,
        "git_commit": None,
        "git_dirty": None,
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "host": socket.gethostname(),
    }
    source = Path(__file__).resolve().parents[2]
    if (source / ".git").exists():
        try:
            commit = subprocess.run(
                ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
            )
            status = subprocess.run(
                ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            if commit.returncode == 0:
                out["git_commit"] = commit.stdout.strip()
                out["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            pass
    return out
