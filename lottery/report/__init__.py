"""`lottery-report RUN_OR_SWEEP_DIR... [--out DIR] [--imports MODULE]`: tables and the lottery-ticket figures from
finished runs.

- `collect`: run folders to rows (runs.csv), conditions from the settings that differ and matter, never stopped by a
  damaged or foreign folder (one warning line per file it cannot read);
- `aggregate`: mean, sample std and count over replicates per condition and level (aggregate.csv, .md, .tex);
- `style`: one colour per method or condition across every figure, line styles per branch, sectioned legends;
- `figures`, `lmc`: the figures (PNG and SVG);
- `similarity`: the overlap of kept weights between replicates' and between methods' tickets (mask_similarity.csv,
  its figure).
- `paper` (`--paper`): the run beside the published numbers of its preset's `paper:` block (paper.md, .csv, .png).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lottery.report.aggregate import aggregate, write_aggregate
from lottery.report.collect import (
    DENSE_LABEL,
    FIRST_COLUMNS,
    LMC,
    METHOD_KEYS,
    TICKET_LABEL,
    X_KEYS,
    collect_runs,
    method_label,
    warn_stderr,
    write_table,
)
from lottery.report.figures import DIVERGED_LABEL, _curves, make_figures
from lottery.report.lmc import make_lmc_figures
from lottery.report.similarity import write_similarity

__all__ = [
    "DENSE_LABEL",
    "DIVERGED_LABEL",
    "FIRST_COLUMNS",
    "LMC",
    "METHOD_KEYS",
    "TICKET_LABEL",
    "X_KEYS",
    "_curves",
    "aggregate",
    "collect_runs",
    "main",
    "make_figures",
    "make_lmc_figures",
    "method_label",
    "write_aggregate",
    "write_table",
]


def _import(modules: list[str]) -> None:
    from lottery.config import import_extensions

    import_extensions({"imports": modules})


def _unregistered(rows: list[dict]) -> str | None:
    """A note naming the branches and criteria of the runs that this process does not know (labelled by name)."""
    from lottery.branches import BRANCHES
    from lottery.pruning import CRITERIA

    branches = sorted({r["branch"] for r in rows if "level" in r and r["branch"] != "ticket"} - set(BRANCHES))
    criteria = sorted({str(r["_criterion"]) for r in rows if r.get("_criterion")} - set(CRITERIA))
    if not branches and not criteria:
        return None
    imports = sorted({str(m) for r in rows for m in _listed(r.get("_imports"))})
    what = [f"branch{'es' if len(branches) > 1 else ''} {', '.join(branches)}"] if branches else []
    what += [f"criteri{'a' if len(criteria) > 1 else 'on'} {', '.join(criteria)}"] if criteria else []
    hint = f"lottery-report --imports {','.join(imports)}" if imports else "lottery-report --imports <your module>"
    return f"note: {' and '.join(what)} not registered here: labelled by name ({hint} gives their labels)"


def _listed(value) -> list:
    import json

    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return [value]
    return list(value) if isinstance(value, (list, tuple)) else []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="lottery-report",
        description="Collect every run below the given folders (single runs, replicas runs and Hydra multiruns) into "
        "runs.csv and an aggregated table (aggregate.csv, aggregate.md, aggregate.tex: mean, std and "
        "count over replicates per condition and level) and draw the lottery-ticket figures (PNG and "
        "SVG). A file that cannot be read is one warning line; the other runs are still reported.",
    )
    from lottery.core.commandline import BROKEN_INSTALL_EXIT, install_error, quick_exit, version_line

    quick_exit()

    parser.add_argument("--version", action="version", version=version_line())
    parser.add_argument("paths", nargs="+", help="run folders, sweep folders, or any folder above them")
    parser.add_argument("--out", help="output folder (default: <path>/report for one path, ./report otherwise)")
    parser.add_argument(
        "--imports",
        action="append",
        default=[],
        metavar="MODULE[,MODULE]",
        help="modules to import first (as lottery-train's imports=[...]), so the branches and "
        "criteria they register are labelled as registered; repeatable or comma-separated",
    )
    parser.add_argument(
        "--paper",
        action="store_true",
        help="also put the runs beside the published numbers of their preset's paper: block (mean "
        "± std over replicates, agrees / does not agree / cannot be compared at this scale): "
        "paper.md, paper.csv, paper.png/.svg",
    )
    args = parser.parse_args(argv)
    broken = install_error()
    if broken:
        print(f"error: {broken}", file=sys.stderr)
        return BROKEN_INSTALL_EXIT
    modules = [m.strip() for entry in args.imports for m in entry.split(",") if m.strip()]
    try:
        _import(modules)
    except ValueError as e:
        print(f"error: --{e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (Path(args.paths[0]) / "report" if len(args.paths) == 1 else Path("report"))
    try:
        rows = collect_runs(args.paths, warn=warn_stderr)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: no run folders (holding summary.json) below {' '.join(args.paths)}", file=sys.stderr)
        return 2
    note = _unregistered(rows)
    if note:
        print(note, file=sys.stderr)
    try:
        return _write(rows, out, args.paths, paper=args.paper)
    except OSError as e:  # a read-only run folder (its report/ beside it), a full disk: one line, not a traceback
        where = getattr(e, "filename", None) or out
        print(
            f"error: cannot write the report to {where}: {e.strerror or e}; choose a folder you can write with "
            f"--out DIR",
            file=sys.stderr,
        )
        return WRITE_FAILED_EXIT


# As lottery-train's failed writes (lottery.cli): EX_IOERR.
WRITE_FAILED_EXIT = 74


def _write(rows: list[dict], out: Path, paths: list[str], paper: bool = False) -> int:
    written = [write_table(rows, out / "runs.csv")]
    n_runs = len({r["run_dir"] for r in rows if "level" in r})
    n_unreadable = sum(1 for r in rows if r.get("_unreadable"))
    n_failed = sum(1 for r in rows if "level" not in r) - n_unreadable
    if not n_runs:
        print(
            f"error: no run below {' '.join(paths)} could be read ({n_failed} failed jobs, {n_unreadable} "
            f"unreadable run folders: see {written[0]})",
            file=sys.stderr,
        )
        return 2
    try:
        written += write_aggregate(rows, out)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - the figures are still worth drawing
        warn_stderr(f"aggregated table not written: {type(e).__name__}: {e}")
    written += make_figures(rows, out, warn=warn_stderr)
    try:
        written += write_similarity([r for r in rows if "level" in r], out, warn_stderr)
    except Exception as e:  # noqa: BLE001 - an analysis that fails is a warning; the tables and figures stand
        warn_stderr(f"mask similarity not written: {type(e).__name__}: {e}")
    paper_lines: list[str] = []
    if paper:
        from lottery.report.paper import paper_report

        paper_files, paper_lines = paper_report(rows, out, warn=warn_stderr)
        written += paper_files
    n_diverged = sum(1 for r in rows if r.get("diverged"))
    n_chance = sum(1 for r in rows if r.get("at_chance"))
    print(
        f"{n_runs} runs"
        + (f", {n_failed} failed jobs (see the error column)" if n_failed else "")
        + (f", {n_unreadable} unreadable run folders (see the warnings)" if n_unreadable else "")
        + (f", {n_diverged} diverged units (see the diverged column; red x in the figures)" if n_diverged else "")
        + (f", {n_chance} units at chance (see the at_chance column; ringed in the figures)" if n_chance else "")
        + ": wrote "
        + ", ".join(str(p) for p in written)
    )
    for line in paper_lines:
        print(line)
    return 0
