"""Write docs/reference.md, the configuration reference, from conf/: every key of every YAML file, its default and the
one-line comment beside it.

    python scripts/gen_reference.py            # rewrite docs/reference.md
    python scripts/gen_reference.py --check    # exit 1 when docs/reference.md is not what conf/ gives

conf/ is the single source: a key added there (with its `# comment`) appears in the reference once this is rerun, and
tests/test_docs.py fails until it is. Keys come from PyYAML's node tree (so nesting, flow collections and block
scalars are read as YAML reads them); a key's comment is the `# ...` on its own line, continued by comment-only lines
that start in the same column right below it.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
OUT = REPO / "docs" / "reference.md"

HELP = "hydra/help"


@dataclass
class Key:
    path: str          # dotted, as typed on the command line (package prefix included)
    default: str       # the value as written in the file ('' for a mapping whose keys follow)
    comment: str


def comment_at(lines: list[str], line: int) -> str:
    """The comment on `lines[line]` (after the value, outside quotes), plus the comment-only lines below it that
    start in the same column."""
    col, text = _trailing_comment(lines[line])
    if col < 0:
        return ""
    parts = [text]
    for below in lines[line + 1:]:
        stripped = below.lstrip()
        if not stripped.startswith("#") or len(below) - len(stripped) != col:
            break
        parts.append(stripped[1:].strip())
    return " ".join(p for p in parts if p)


def _trailing_comment(line: str) -> tuple[int, str]:
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return i, line[i + 1:].strip()
    return -1, ""


def header(lines: list[str]) -> tuple[str | None, str]:
    """The file's `# @package` directive (None when it has none) and the comment block at its top."""
    package, text = None, []
    for line in lines:
        if not line.startswith("#"):
            break
        body = line[1:].strip()
        if body.startswith("@package"):
            package = body.split(None, 1)[1].strip()
        else:
            text.append(body)
    return package, " ".join(t for t in text if t)


def source(lines: list[str], node: yaml.Node) -> str:
    """A value as written: the text between its start and end marks, on one line."""
    if isinstance(node, yaml.ScalarNode) and node.style in ("|", ">"):
        return "(text)"
    start, end = node.start_mark, node.end_mark
    if start.line == end.line:
        return lines[start.line][start.column:end.column].strip()
    return " ".join(lines[i].strip() for i in range(start.line, min(end.line + 1, len(lines))))


def keys_of(path: Path, prefix: str) -> tuple[list[Key], list[tuple[str, str, str]]]:
    """(the file's keys under `prefix`, its defaults list as (group, choice, comment))."""
    text = path.read_text()
    lines = text.splitlines()
    root = yaml.compose(text)
    keys: list[Key] = []
    defaults: list[tuple[str, str, str]] = []
    if root is None:
        return keys, defaults

    def walk(node: yaml.MappingNode, at: str) -> None:
        for k, v in node.value:
            name = k.value
            full = f"{at}.{name}" if at else name
            if not at and name == "defaults" and isinstance(v, yaml.SequenceNode):
                for item in v.value:
                    if isinstance(item, yaml.MappingNode):
                        (gk, gv), = item.value
                        defaults.append((gk.value, gv.value if gv.value is not None else "null",
                                         comment_at(lines, gk.start_mark.line)))
                    else:
                        defaults.append(("", item.value, comment_at(lines, item.start_mark.line)))
                continue
            if full == "paper" and isinstance(v, yaml.MappingNode) and v.value:
                # a preset's published numbers: documentation, listed on the reproductions page, not settings
                keys.append(Key(full, "(published numbers)", "the paper block: see the Reproductions page"))
            elif isinstance(v, yaml.MappingNode) and v.flow_style is not True and v.value:
                keys.append(Key(full, "", comment_at(lines, k.start_mark.line)))
                walk(v, full)
            else:
                keys.append(Key(full, source(lines, v), comment_at(lines, k.start_mark.line)))

    walk(root, prefix)
    return keys, defaults


def package_of(path: Path) -> str:
    """The dotted prefix Hydra puts the file's keys under: its group, or its `# @package` directive."""
    package, _ = header(path.read_text().splitlines())
    group = path.parent.relative_to(CONF).as_posix()
    group = "" if group == "." else group.replace("/", ".")
    if package is None or package == "_group_":
        return group
    return "" if package == "_global_" else package


def _md(text: str) -> str:
    """Text for a table cell: backtick spans kept, Markdown's special characters escaped outside them."""
    out = []
    for i, part in enumerate(text.split("`")):
        if i % 2:
            out.append(f"`{part}`")
        else:
            out.append(re.sub(r"([\\*_\[\]<>])", r"\\\1", part))
    return "".join(out).replace("|", "\\|")


def _code(text: str) -> str:
    if not text:
        return ""
    return "`` " + text.replace("|", "\\|") + " ``" if "`" in text else "`" + text.replace("|", "\\|") + "`"


def table(keys: list[Key]) -> list[str]:
    if not keys:
        return ["(no keys of its own)", ""]
    rows = ["| key | default | description |", "|---|---|---|"]
    rows += [f"| {_code(k.path)} | {_code(k.default)} | {_md(k.comment)} |" for k in keys]
    return rows + [""]


def file_section(path: Path, title: str, level: str = "###") -> list[str]:
    lines = path.read_text().splitlines()
    _, about = header(lines)
    keys, defaults = keys_of(path, package_of(path))
    out = [f"{level} {title}", "", f"`{path.relative_to(REPO).as_posix()}`" + (f": {_md(about)}" if about else ""), ""]
    if defaults:
        out.append("Composes: " + ", ".join(_code(f"{g}: {c}" if g else c) for g, c, _ in defaults) + ".")
        out.append("")
    return out + table(keys)


def options(group: str) -> list[Path]:
    return sorted((CONF / group).glob("*.yaml"))


def render() -> str:
    main = CONF / "config.yaml"
    keys, defaults = keys_of(main, "")
    groups = [g for g, _, _ in defaults if g and not g.startswith("override ") and (CONF / g).is_dir()]
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by scripts/gen_reference.py from conf/; do not edit by hand: change conf/ and rerun "
        "`python scripts/gen_reference.py`. -->",
        "",
        "Every key of every file in `conf/`, with its default and the comment beside it there. Set a key on the "
        "command line as `key=value` (`train.duration=3000it`), choose an option of a group as `group=option` "
        "(`model=conv2`); `lottery-train --cfg job` prints the composed config. This page is generated from `conf/` "
        "by `python scripts/gen_reference.py`, and a test fails when it is out of date.",
        "",
        "## lottery-train: `conf/config.yaml`",
        "",
        "### Config groups",
        "",
        "| group | default | options | description |",
        "|---|---|---|---|",
    ]
    for g, choice, comment in defaults:
        if not g or g.startswith("override ") or not (CONF / g).is_dir():
            continue
        names = ", ".join(f"`{p.stem}`" for p in options(g))
        out.append(f"| [`{g}=`](#{g}) | {_code(choice)} | {names} | {_md(comment)} |")
    out += ["", "### Keys", ""] + table(keys)
    for g in groups:
        out += [f"## `{g}=`", ""]
        for p in options(g):
            out += file_section(p, f"`{g}={p.stem}`")
    # groups that config.yaml's defaults list does not name (selected with +group=option, or by another entry point)
    others = sorted({p.parent.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml")}
                    - {".", HELP, *groups})
    for g in others:
        out += [f"## `{g}=`", ""]
        for p in options(g):
            out += file_section(p, f"`{g}={p.stem}`")
    programs = {"retrain.yaml": "lottery-retrain", "init_study.yaml": "lottery-init-study"}
    for p in sorted(CONF.glob("*.yaml")):
        if p.name != "config.yaml":
            out += file_section(p, f"{programs[p.name] + ': ' if p.name in programs else ''}`conf/{p.name}`", "##")
    help_files = options(HELP)
    if help_files:
        out += ["## `--help` texts", ""]
        for p in help_files:
            out += file_section(p, f"`hydra/help={p.stem}`")
    return "\n".join(out).rstrip() + "\n"


def documented_files() -> list[Path]:
    return sorted(CONF.rglob("*.yaml"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the file is out of date; write nothing")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            print(f"error: {args.out} is out of date with conf/; run: python scripts/gen_reference.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
