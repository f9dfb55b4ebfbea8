"""The documentation: README.md and the MkDocs site in docs/. The configuration reference is generated from conf/ and
names every key there; the documented commands compose and pass the checks a run makes before any work; the site
builds with `mkdocs build --strict`; user docs carry no development paths."""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from conftest import CONF, REPO, make_cfg

DOCS = REPO / "docs"
USER_DOCS = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def _gen():
    spec = importlib.util.spec_from_file_location("gen_reference", REPO / "scripts" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# --- the configuration reference ----------------------------------------------------------------------------------

def conf_keys(conf: Path) -> set[str]:
    """Every dotted key of every YAML file under `conf`, read with yaml.safe_load (independently of the generator's
    node walk), under the package Hydra puts it in: its group, or its `# @package` directive."""
    keys = set()
    for path in conf.rglob("*.yaml"):
        text = path.read_text()
        package = next((line.split(None, 2)[2].strip() for line in text.splitlines()
                        if line.startswith("# @package")), None)
        group = path.parent.relative_to(conf).as_posix()
        prefix = "" if group == "." else group.replace("/", ".")
        if package is not None and package != "_group_":
            prefix = "" if package == "_global_" else package

        def walk(node, at):
            for k, v in node.items():
                if not at and k == "defaults":
                    continue
                full = f"{at}.{k}" if at else str(k)
                keys.add(full)
                if isinstance(v, dict) and v and full != "paper":  # a preset's paper block: documentation
                    walk(v, full)
        walk(yaml.safe_load(text) or {}, prefix)
    return keys


def test_reference_is_generated_from_the_current_conf():
    text = (DOCS / "reference.md").read_text()
    assert text == _gen().render(), "docs/reference.md is out of date with conf/: run python scripts/gen_reference.py"


def test_every_conf_key_and_option_is_in_the_reference():
    text = (DOCS / "reference.md").read_text()
    keys = conf_keys(CONF)
    assert len(keys) > 150  # every group's keys, not just config.yaml's
    missing = sorted(k for k in keys if f"`{k}`" not in text)
    assert not missing, f"keys of conf/ missing from docs/reference.md (run python scripts/gen_reference.py): {missing}"
    groups = [d.name for d in CONF.iterdir() if d.is_dir() and d.name != "hydra" and any(d.glob("*.yaml"))]
    missing = [f"{g}={p.stem}" for g in groups for p in (CONF / g).glob("*.yaml") if f"`{g}={p.stem}`" not in text]
    assert not missing, f"options missing from docs/reference.md: {missing}"


def test_a_new_key_reaches_the_reference_with_its_comment_and_the_check_fails_until_regenerated(tmp_path):
    gen = _gen()
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    with open(conf / "pruning" / "lth.yaml", "a") as f:
        f.write("brand_new: 3           # a key another branch added | with a pipe\n")
    (conf / "granularity").mkdir()  # a group config.yaml does not name yet, selected as +granularity=nm
    (conf / "granularity" / "nm.yaml").write_text("# N:M sparsity\nn: 2    # kept of every m\nm: 4\n")
    gen.CONF, gen.REPO = conf, tmp_path
    text = gen.render()
    assert "| `pruning.brand_new` | `3` | a key another branch added \\| with a pipe |" in text
    assert "### `granularity=nm`" in text and "| `granularity.n` | `2` | kept of every m |" in text
    assert f"`pruning.brand_new`" not in (DOCS / "reference.md").read_text()
    assert gen.main(["--check", "--out", str(DOCS / "reference.md")]) == 1  # the stale page is caught
    assert "pruning.brand_new" in conf_keys(conf)  # and the independent walk above names the key


def test_comments_continue_on_comment_lines_in_the_same_column():
    gen = _gen()
    lines = ["a: 1   # first part", "       # second part", "b: 2   # b's own", "  # not a continuation"]
    assert gen.comment_at(lines, 0) == "first part second part"
    assert gen.comment_at(lines, 2) == "b's own"
    assert gen.comment_at(["c: '#not a comment'  # real"], 0) == "real"


# --- the documented commands ----------------------------------------------------------------------------------------

ENTRY = {"lottery-train": "config", "lottery-init-study": "init_study"}


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(file, program, arguments) of every `lottery-train` / `lottery-init-study` line in a bash block of the user
    docs, with continuation lines joined and the block's own `VAR="..."` assignments and $HOME expanded."""
    out = []
    for path in USER_DOCS:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
            block = block.replace("\\\n", " ")
            variables = {"HOME": "{HOME}"}
            for line in block.splitlines():
                line = line.split(" #", 1)[0].strip()
                assignment = re.fullmatch(r'([A-Z_]+)="(.*)"', line)
                if assignment:
                    variables[assignment.group(1)] = re.sub(r"\$(\w+)", lambda m: variables.get(m.group(1), m.group(0)),
                                                            assignment.group(2))
                    continue
                line = re.sub(r"\$(\w+)", lambda m: variables.get(m.group(1), m.group(0)), line)
                words = shlex.split(line) if line else []
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # OMP_NUM_THREADS=1 lottery-train ...
                    words.pop(0)
                if words and words[0] in ENTRY:
                    out.append((path.relative_to(REPO).as_posix(), words[0], words[1:]))
    return out


def compose_args(args: list[str]) -> list[str]:
    """The overrides of one job: flags dropped, the first value of each swept key."""
    overrides, skip = [], False
    for a in args:
        if not skip and not a.startswith("-"):
            overrides.append(a)
        skip = a in ("--cfg", "-c", "--info", "-i", "--package", "-p")  # these flags take a value
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [f"{o.get_key_element()}={next(o.sweep_string_iterator())}" if o.is_sweep_override() else text
            for o, text in zip(parsed, overrides)]


COMMANDS = documented_commands()


def test_the_docs_document_commands():
    files = {f for f, _, _ in COMMANDS}
    assert len(COMMANDS) > 40 and "README.md" in files and "docs/getting-started.md" in files


PLAIN = [c for c in COMMANDS if not any(a.startswith("imports=") for a in c[2])]
# Commands with a user's module: extending.md's are checked with that page's module below; another page's example of a
# user module (sparse-training.md's updater, the test plugin tests/plugins/my_lottery_ext.py) runs in its own tests.
EXTENDING = [c for c in COMMANDS if any(a.startswith("imports=") for a in c[2]) and c[0] == "docs/extending.md"]


def expand(args: list[str], home: Path, pwd: Path) -> list[str]:
    args = [a.replace("{HOME}", str(home)).replace("$PWD", str(pwd)) for a in args]
    assert not any("$" in a for a in args), args  # every variable of the docs is one the shell (or the block) sets
    return args


CHECK = """
import json, sys
from hydra import compose, initialize_config_dir
from lottery.config import register_configs
from lottery.experiment.check import checked
register_configs()
for overrides in json.loads(sys.argv[2]):
    with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
        checked(compose(config_name="config", overrides=overrides))
print("checked", len(json.loads(sys.argv[2])))
"""


@pytest.mark.parametrize("where, program, args", PLAIN, ids=[f"{f}:{' '.join(a)[:60]}" for f, _, a in PLAIN])
def test_documented_command_composes_and_passes_the_checks(where, program, args, tmp_path):
    """Each documented command, as the user types it, composes a config that passes every check made before any
    work (names, settings, durations, paths): a renamed key or option breaks the docs here."""
    (tmp_path / "data").mkdir()
    overrides = compose_args(expand(args, tmp_path, tmp_path))
    if "launcher=submitit_local" in overrides:  # its jobs pick their GPU from hydra.job.num, set only in a job
        overrides.append("device=auto")
    cfg = make_cfg(*overrides, config_name=ENTRY[program])
    if program == "lottery-train":
        from lottery.experiment.check import checked
        checked(cfg)


@pytest.mark.slow
def test_extending_examples_register_and_their_commands_pass_the_checks(tmp_path):
    """docs/extending.md's Python blocks are one module, my_ext.py, and its YAML blocks the files they name; every
    documented command with imports=[my_ext] then composes and passes the checks, in a process of its own (the
    registries are global: the examples must not leak into the other tests)."""
    page = (DOCS / "extending.md").read_text()
    (tmp_path / "my_ext.py").write_text("\n\n".join(re.findall(r"```python\n(.*?)```", page, flags=re.S)))
    for block in re.findall(r"```yaml\n(.*?)```", page, flags=re.S):
        name = block.splitlines()[0].lstrip("# ").strip()
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(block)
    (tmp_path / "data").mkdir()
    jobs = [compose_args(expand(args, tmp_path, tmp_path)) for _, program, args in EXTENDING
            if program == "lottery-train"]
    assert len(jobs) >= 6 and all(where == "docs/extending.md" for where, _, _ in EXTENDING)
    import json
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    r = subprocess.run([sys.executable, "-c", CHECK, str(CONF), json.dumps(jobs)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"checked {len(jobs)}" in r.stdout, r.stdout + r.stderr


def test_examples_point_at_a_data_folder_the_shell_expands():
    for path in USER_DOCS:
        for line in path.read_text().splitlines():
            assert "../shared" not in line and "~/data" not in line, f"{path.name}: {line}"
            if "dataset.root=" in line and "ticket" not in line:
                roots = re.findall(r"dataset\.root=(\S+)", line)
                assert all(r.startswith(("$HOME", "/")) for r in roots), f"{path.name}: {line}"


def test_user_docs_carry_no_development_notes():
    for path in USER_DOCS:
        text = path.read_text()
        for pattern in (r"\bissues? \d+", r"PAPERS\.md", r"load average", r"lent to"):
            assert not re.search(pattern, text, flags=re.I), f"{path.name}: {pattern}"


def test_readme_is_short_and_starts_with_set_up_run_test():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 300
    first = re.search(r"```bash\n(.*?)```", "\n".join(lines), flags=re.S).group(1).splitlines()
    assert first[0].startswith("pip install") and first[1].startswith("lottery-train") \
        and first[2].startswith("python -m pytest")


# --- the site ------------------------------------------------------------------------------------------------------

def test_every_page_is_in_the_nav_or_waits_for_a_merge():
    nav = (REPO / "mkdocs.yml").read_text()
    enabled = set(re.findall(r"^\s*- [^#\n]*?:\s*([\w-]+\.md)\s*$", nav, flags=re.M))
    pages = {p.name for p in DOCS.glob("*.md")}
    assert pages <= enabled, f"pages not in mkdocs.yml's nav (enable or add their entries): {sorted(pages - enabled)}"
    assert enabled <= pages, f"nav entries without a page: {sorted(enabled - pages)}"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None and os.environ.get("CI") != "true",
                    reason='mkdocs not installed (pip install -e ".[docs]")')
def test_site_builds_strict(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "reference" / "index.html").exists()
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("register_branch") > 1
