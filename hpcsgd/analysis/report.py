"""Compare finished, running or crashed runs: tables and figures from their run directories.

Prints the comparison table (Markdown) on stdout and writes REPORT_DIR/table.md, table.csv,
runs.csv, one PNG per figure and report.md, which embeds them. Runs are told apart by the
config keys that differ among them; runs that differ only in their seed are grouped: the
table gives mean ± std over the group, the figures a mean line and a band. Problems inside a
run (a torn metrics line, a missing rank file, no summary.json) are warnings on stderr, never
a failed report; a path that is no run directory is an error (exit 2).

Runs are one group only when everything that changes results is equal: every config key that
shapes the trajectory (the list the checkpoint uses, hpcsgd/trajectory.py), the shards' content
digest and partition, and the world size. A seed that repeats within a group is flagged: such
runs are the same experiment twice, not a sample of seeds. A report file that cannot be written
(read-only --out, a full disk) is one line naming it and the space it needed (exit 2).

`hpcsgd report --follow RUN_DIR` watches one running job instead: a table of its logged steps,
refreshed every --interval seconds, until summary.json appears (exit 0), Ctrl-C (exit 0), the
run's job is gone without a summary (the pid in RUN_DIR/.hpcsgd.lock has exited; exit 2) or
nothing changed for --give-up-after seconds (exit 2); the last line says which.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError
from .follow import MAX_INTERVAL
from .output import make_dir, write_file
from .plots import BANDS, X_LABELS, Figure, make_figures
from .runs import Run, group_runs, load_runs
from .tables import Table, build_table, to_markdown, write_csv, write_runs_csv


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs", nargs="+", metavar="RUN_DIR",
        help="run directories (the --run-dir of `hpcsgd train`), or folders holding several",
    )
    parser.add_argument(
        "--out", metavar="REPORT_DIR",
        help="where the report is written (required, except with --follow: then written when the run ends)",
    )
    parser.add_argument(
        "--target", type=float, default=None, metavar="ACC",
        help="test accuracy (0..1] the to-target columns measure (default: 0.9 x the best final accuracy)",
    )
    parser.add_argument(
        "--x", choices=tuple(X_LABELS), default="epoch",
        help="x axis of the accuracy and consensus figures (default: epoch)",
    )
    parser.add_argument(
        "--band", choices=tuple(BANDS), default="minmax",
        help="spread drawn around the mean of runs that differ only in seed: min-max over the "
        "seeds, or mean ± one sample std (default: minmax)",
    )
    parser.add_argument(
        "--follow", action="store_true",
        help="watch one running job: a table of its steps, refreshed until summary.json appears",
    )
    parser.add_argument(
        "--interval", type=float, default=2.0, metavar="SECONDS",
        help=f"with --follow: seconds between refreshes, in (0, {MAX_INTERVAL:g}] (default: 2)",
    )
    parser.add_argument(
        "--give-up-after", type=float, default=None, metavar="SECONDS",
        help="with --follow: stop when the run directory has not changed for this long (a hung or "
        "never-started job; default: wait; a job whose process has exited ends the follow at once)",
    )
    parser.add_argument(
        "--tensorboard", metavar="DIR", default=None,
        help="also write TensorBoard event files, one subdirectory per run, every logged metric as a "
        "scalar over steps (needs the tensorboard package; --out may then be left out)",
    )


def run(args: argparse.Namespace) -> int:
    """The `hpcsgd report` subcommand; returns the exit code."""
    if args.target is not None and not 0.0 < args.target <= 1.0:
        raise ConfigError(f"--target must be in (0, 1], got {args.target}")
    out = Path(args.out) if args.out is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if getattr(args, "follow", False):
        from .follow import run_follow

        ended = run_follow(args)
        if ended is False or args.out is None:
            return 0 if isinstance(ended, bool) else 2  # Ctrl-C leaves a running job alone: not an error
        # The run has ended: write its report (what there is of it, for a crashed job), as --out asked.
        code = write_report(args)
        return code if isinstance(ended, bool) else 2
    if getattr(args, "tensorboard", None) is not None:
        from .tensorboard import export

        written = export(load_runs(args.runs), args.tensorboard)
        print(f"hpcsgd report: {len(written)} run(s) -> TensorBoard event files in {args.tensorboard}", file=sys.stderr)
        if args.out is None:
            return 0
    if args.out is None:
        raise ConfigError("--out REPORT_DIR is required (or --follow to watch a running job)")
    return write_report(args)


def write_report(args: argparse.Namespace) -> int:
    """Tables, figures and report.md for ``args.runs`` in ``args.out``."""
    runs = load_runs(args.runs)
    for r in runs:
        for warning in r.warnings:
            print(f"hpcsgd report: warning: {r.path}: {warning}", file=sys.stderr)
    for group in group_runs(runs):
        if group.repeated_seeds:
            print(f"hpcsgd report: warning: {group.label}: seed(s) {', '.join(map(str, group.repeated_seeds))} "
                  f"repeated in {', '.join(str(r.path) for r in group.runs)}: the same experiment run more than "
                  f"once, so its spread is no spread over seeds", file=sys.stderr)
    out = Path(args.out)
    make_dir(out)

    table = build_table(runs, target=args.target)
    markdown = to_markdown(table)
    write_file(out / "table.md", markdown)
    write_csv(table, out / "table.csv")
    write_runs_csv(table, out / "runs.csv")

    band = getattr(args, "band", "minmax")
    figures = make_figures(runs, out, x=args.x, band=band)
    for fig in figures:
        if fig.path is None:
            print(f"hpcsgd report: {fig.title}: {fig.note}", file=sys.stderr)
    write_file(out / "report.md", report_markdown(runs, table, markdown, figures, band))
    written = sum(f.path is not None for f in figures)
    groups = f" in {len(table.groups)} group(s) of seeds" if table.grouped else ""
    print(f"hpcsgd report: {len(runs)} run(s){groups}, {written} figure(s) -> {out / 'report.md'}",
          file=sys.stderr)
    # Printed last, so that a reader closing the pipe early (`| head`) costs no file.
    print(markdown)
    return 0


def report_markdown(
    runs: list[Run], table: Table, table_md: str, figures: list[Figure], band: str = "minmax"
) -> str:
    """report.md: the runs (by group), the tables, the figures (relative links), the warnings."""
    lines = ["# hpcsgd report", "", "## Runs", ""]
    for group in group_runs(runs):
        if group.n > 1:
            lines.append(f"- **{group.label}**: {group.n} runs, seeds {group.seeds}")
        for r in group.runs:
            indent = "  " if group.n > 1 else ""
            lines.append(f"{indent}- **{r.label}**: `{r.path}` ({r.status}, {len(r.records)} rank file(s))")
    lines += ["", "## Tables", "", table_md, "## Figures", ""]
    if table.grouped:
        band_note = f"the band is the {BANDS[band]}"
        lines += [f"Runs that differ only in their seed are one line: their mean; {band_note}.", ""]
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
