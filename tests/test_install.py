"""A plain (non-editable) install works: the wheel carries conf/ as the package lottery.conf, and the entry points
compose their configs from it in an empty folder outside the repository."""
import shutil
import site
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO


# Both tests on one xdist worker, so the wheel is built once per run.
pytestmark = pytest.mark.xdist_group("install")

# What a wheel is built from; the rest of the checkout (virtual env, caches, site/) stays behind.
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "lottery", "conf", "hydra_plugins"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources, and two builds in one
    # checkout (another worker, the user's own) race on those folders (a CI run failed with ENOENT in build/lib).
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(REPO / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("lottery-*.whl")
    return path


def test_wheel_contains_every_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"lottery/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    assert "lottery/conf/config.yaml" in expected and "lottery/conf/model/lenet_300_100.yaml" in expected
    assert expected <= names, sorted(expected - names)[:5]
    assert not any(n.startswith("tests/") for n in names)
    report = {f"lottery/report/{p.name}" for p in (REPO / "lottery" / "report").glob("*.py")}
    assert "lottery/report/__init__.py" in report and report <= names, sorted(report - names)
    assert "lottery/py.typed" in names  # PEP 561 marker: users' type checkers read lottery's annotations
    # the one plugin: launcher=slurm's launcher class (Hydra takes launchers only from hydra_plugins)
    assert {n.split("/")[1] for n in names if n.startswith("hydra_plugins/")} == {"lottery_slurm"}


@pytest.mark.slow
def test_plain_install_runs_from_an_empty_folder(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    # The packages of the interpreter running the tests (torch, hydra, ...) are reused through a .pth file, whether
    # it is a virtual environment (as README sets up) or the system's: `--system-site-packages` would see the base
    # interpreter's packages, not a venv's. Directories named in a .pth file are not scanned for .pth files
    # themselves, so an editable install of lottery there stays invisible: lottery comes only from the wheel.
    (site_dir,) = (venv / "lib").glob("python*/site-packages")
    (site_dir / "_outer_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall",
                          str(wheel)], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1"}

    def run(*args):
        return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], cwd=empty, env=env, capture_output=True,
                              text=True, timeout=600)

    where = run("python", "-c", "import lottery.cli as c; print(c.__file__, c.CONF_DIR)")
    assert where.returncode == 0 and str(venv) in where.stdout and "pkg://lottery.conf" in where.stdout, where
    job = run("lottery-train", "--cfg", "job")
    assert job.returncode == 0, job.stderr[-2000:]
    assert "lenet_300_100" in job.stdout and "criterion" in job.stdout
    train = run("lottery-train", "dataset=synthetic", "pruning.levels=2", "train.duration=20it",
                "train.eval_every=10it", "hydra.run.dir=run")
    assert train.returncode == 0, train.stderr[-3000:]
    assert (empty / "run" / "summary.json").exists() and (empty / "run" / "levels" / "level_1" / "ticket.pt").exists()
    report = run("lottery-report", "run")
    assert report.returncode == 0, report.stderr[-3000:]
    for name in ("runs.csv", "aggregate.md", "lottery_ticket.png"):
        assert (empty / "run" / "report" / name).exists(), name
    study = run("lottery-init-study", "--help")
    assert study.returncode == 0 and "init_study" in study.stdout + study.stderr, study.stderr[-2000:]
