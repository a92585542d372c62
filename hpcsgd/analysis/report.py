"""Compare finished, running or crashed runs: tables and figures from their run directories.

Prints the comparison table (Markdown) on stdout and writes REPORT_DIR/table.md, table.csv,
one PNG per figure and report.md, which embeds them. Runs are told apart by the config keys
that differ among them. Problems inside a run (a torn metrics line, a missing rank file, no
summary.json) are warnings on stderr, never a failed report; a path that is no run directory
is an error (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError
from .plots import X_LABELS, Figure, make_figures
from .runs import Run, load_runs
from .tables import Table, build_table, to_markdown, write_csv


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs", nargs="+", metavar="RUN_DIR",
        help="run directories (the --run-dir of `hpcsgd train`), or folders holding several",
    )
    parser.add_argument("--out", required=True, metavar="REPORT_DIR", help="where the report is written")
    parser.add_argument(
        "--target", type=float, default=None, metavar="ACC",
        help="test accuracy (0..1] the to-target columns measure (default: 0.9 x the best final accuracy)",
    )
    parser.add_argument(
        "--x", choices=tuple(X_LABELS), default="epoch",
        help="x axis of the accuracy and consensus figures (default: epoch)",
    )


def run(args: argparse.Namespace) -> int:
    """The `hpcsgd report` subcommand; returns the exit code."""
    if args.target is not None and not 0.0 < args.target <= 1.0:
        raise ConfigError(f"--target must be in (0, 1], got {args.target}")
    runs = load_runs(args.runs)
    for r in runs:
        for warning in r.warnings:
            print(f"hpcsgd report: warning: {r.path}: {warning}", file=sys.stderr)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    table = build_table(runs, target=args.target)
    markdown = to_markdown(table)
    (out / "table.md").write_text(markdown)
    write_csv(table, out / "table.csv")

    figures = make_figures(runs, out, x=args.x)
    for fig in figures:
        if fig.path is None:
            print(f"hpcsgd report: {fig.title}: {fig.note}", file=sys.stderr)
    (out / "report.md").write_text(report_markdown(runs, table, markdown, figures))
    written = sum(f.path is not None for f in figures)
    print(f"hpcsgd report: {len(runs)} run(s), {written} figure(s) -> {out / 'report.md'}", file=sys.stderr)
    # Printed last, so that a reader closing the pipe early (`| head`) costs no file.
    print(markdown)
    return 0


def report_markdown(runs: list[Run], table: Table, table_md: str, figures: list[Figure]) -> str:
    """report.md: the runs, the tables, the figures (relative links) and the warnings."""
    lines = ["# hpcsgd report", "", "## Runs", ""]
    for r in runs:
        lines.append(f"- **{r.label}**: `{r.path}` ({r.status}, {len(r.records)} rank file(s))")
    lines += ["", "## Tables", "", table_md, "## Figures", ""]
    for fig in figures:
        if fig.path is not None:
            lines += [f"### {fig.title}", "", f"![{fig.title}]({fig.path.name})", ""]
    skipped = [f for f in figures if f.path is None]
    if skipped:
        lines += ["Not drawn:", ""] + [f"- {f.title}: {f.note}" for f in skipped] + [""]
    warned = [(r, w) for r in runs for w in r.warnings]
    if warned:
        lines += ["## Warnings", ""] + [f"- `{r.name}`: {w}" for r, w in warned] + [""]
    return "\n".join(lines)
