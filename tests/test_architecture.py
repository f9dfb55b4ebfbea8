"""The package's architecture: imports point one way, from the entry points down to the core helpers, with no circle
anywhere. The graph is read from the source with `ast`, imports inside functions included (a lazy import is still a
dependency), so a module that reaches up a layer, or two modules that need each other, fail here by name."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "lottery"
# Lowest first. A module may import modules of its own layer or below (and its own package's modules), never above.
LAYERS = [
    ("core helpers", ["lottery.core"]),
    ("config schema", ["lottery.config"]),
    ("data, models, initializers, masks", ["lottery.data", "lottery.models", "lottery.init", "lottery.masks"]),
    ("training and pruning", ["lottery.training", "lottery.pruning"]),
    ("branches", ["lottery.branches"]),
    ("experiment", ["lottery.experiment"]),
    ("report, export and init study", ["lottery.report", "lottery.export", "lottery.init_study"]),
    ("launchers", ["lottery.launch"]),
    ("entry points", ["lottery.cli", "lottery.__main__"]),
]


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The lottery modules `path` (module `name`) imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:  # `from lottery.pruning import pai`: the submodule; else the module itself
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in out if m == "lottery" or m.startswith("lottery.")}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, name, set(mods)) - {name} for name, path in mods.items()}


def layer(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                if best is None or len(p) > best[1]:
                    best = (i, len(p))
    assert best is not None, f"{module} is in no layer of tests/test_architecture.py: add it where it belongs"
    return best[0]


def test_every_import_points_down():
    bad = []
    for mod, deps in graph().items():
        if mod == "lottery":
            assert not deps, f"lottery/__init__.py must import nothing (every module imports it): {sorted(deps)}"
            continue
        for dep in deps - {"lottery"}:
            if layer(dep) > layer(mod):
                bad.append(f"{mod} ({LAYERS[layer(mod)][0]}) imports {dep} ({LAYERS[layer(dep)][0]})")
    assert not bad, "imports that point up:\n" + "\n".join(sorted(bad))


def test_no_import_circles():
    g = graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in g:
        if v not in index:
            visit(v)
    assert not circles, f"modules that import each other: {circles}"


def test_the_checks_catch_what_they_claim(tmp_path, monkeypatch):
    """The graph reader sees lazy imports, `from package import submodule` and relative imports."""
    pkg = tmp_path / "lottery" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from lottery.sub import a\n")
    (pkg / "a.py").write_text("def f():\n    from lottery.cli import train\n    from . import b\n")
    (pkg / "b.py").write_text("from lottery.sub.a import f\n")
    known = {"lottery.sub", "lottery.sub.a", "lottery.sub.b", "lottery.cli"}
    assert imports(pkg / "__init__.py", "lottery.sub", known) == {"lottery.sub.a"}
    assert imports(pkg / "a.py", "lottery.sub.a", known) == {"lottery.cli", "lottery.sub.b"}
    assert imports(pkg / "b.py", "lottery.sub.b", known) == {"lottery.sub.a"}


def test_packages_say_what_they_own_and_may_import():
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert doc, f"{init.relative_to(REPO)} has no docstring"
        if init.parent != PACKAGE:
            assert "Imports" in doc or "imports" in doc, f"{init.relative_to(REPO)}: say what the package may import"


def method_names_in(source: str, names: set[str]) -> set[str]:
    """The registered updater names `source` mentions: as a whole identifier or string (any case: `rigl`, `RigL`,
    `"set"`), or, for names of four letters or more, as a word of an identifier (`rigl_step`, `early_bird_done`)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        words = []
        if isinstance(node, ast.Name):
            words.append(node.id)
        elif isinstance(node, ast.Attribute):
            words.append(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            words.append(node.name)
        elif isinstance(node, ast.arg):
            words.append(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            words.append(node.arg)
        elif isinstance(node, ast.alias):
            words.append(node.asname or node.name.rsplit(".", 1)[-1])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) < 40:
            words.append(node.value)
        for word in (w.lower() for w in words):
            for name in names:
                parts = word.split("_")
                if word == name or (len(name) >= 4 and (name in parts or f"_{name}_" in f"_{word}_")):
                    found.add(name)
    return found


def test_the_training_loop_names_no_mask_updater():
    """Every method that changes masks is a mask updater the loop calls through the protocol (issue 27): the loop
    names none of them, so a new method never edits it."""
    import lottery.training  # noqa: F401  (registers the built-in updaters)
    from lottery.training.updaters import UPDATERS
    names = {n.lower() for n in UPDATERS} | {"dst"}
    assert {"set", "rigl"} <= names
    found = method_names_in((PACKAGE / "training" / "loop.py").read_text(), names)
    assert not found, f"lottery/training/loop.py names mask updaters {sorted(found)}: call them through the protocol"


def test_the_method_name_check_catches_what_it_claims():
    names = {"set", "rigl", "early_bird"}
    assert method_names_in("if cfg.dst.name == 'rigl':\n    x = 1\n", names) == {"rigl"}
    assert method_names_in("def rigl_step(a):\n    return a\n", names) == {"rigl"}
    assert method_names_in("from m import RigL\nSET = 1\n", names) == {"rigl", "set"}
    assert method_names_in("early_bird_done = True\n", names) == {"early_bird"}
    assert method_names_in("bar.set_postfix(x=1)\nsettings = {}\n", names) == set()


# Packages below the session receive plain values (dicts, numbers, the registries' settings), never the config library:
# they must stay usable, and testable, without Hydra or OmegaConf (issue 28).
CONFIG_FREE = ("lottery.training", "lottery.pruning", "lottery.branches", "lottery.models")
CONFIG_LIBRARIES = ("omegaconf", "hydra")


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, anywhere in its body (lazy imports too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_training_pruning_branches_and_models_never_import_the_config_library():
    bad = [f"{name} imports {lib}" for name, path in sorted(modules().items())
           if any(name == p or name.startswith(p + ".") for p in CONFIG_FREE)
           for lib in sorted(third_party_imports(path) & set(CONFIG_LIBRARIES))]
    assert not bad, "config library below the session:\n" + "\n".join(bad)


def test_the_config_library_check_sees_lazy_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from omegaconf import OmegaConf\n    import hydra.utils\n")
    assert third_party_imports(path) == {"omegaconf", "hydra"}
