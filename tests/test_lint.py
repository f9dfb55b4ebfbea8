"""ruff and mypy stay clean over lottery/ (the settings are pyproject.toml's [tool.ruff] and [tool.mypy]); .ci/run
runs both too, this keeps a local `pytest` run from missing a regression."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO


def _tool(name: str) -> str:
    """The tool next to this interpreter (the venv's), else on PATH; skipped where it is not installed."""
    found = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (it is in the dev extra: pip install -e '.[dev]')")
    return found


def test_ruff_check_is_clean():
    proc = subprocess.run([_tool("ruff"), "check", "--no-cache", "lottery"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.mark.slow
def test_mypy_is_clean():
    proc = subprocess.run([_tool("mypy"), "lottery"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
