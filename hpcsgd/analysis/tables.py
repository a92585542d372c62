"""Comparison tables of runs: one row per run, or per group of seeds, by the keys that differ.

Each row holds the differing keys, losses and accuracies (logged and from summary.json), the
epochs, rounds and wall time to reach a target accuracy, and communication figures. Runs that
differ only in their seed form a group: its row gives each number as mean ± sample std over
the runs that have it (and how many do, where not all). The same rows are written as Markdown
(for people) and CSV (for other tools); a missing value is "-".
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from ..metrics import size_text
from .output import write_file
from .runs import (
    SEED_KEYS, Group, Run, aggregate, differing_keys, diversity, format_value, group_runs, number_text, sort_key,
)

MISSING = "-"
TARGET_FRACTION = 0.9  # default target: this fraction of the best final accuracy


@dataclass(frozen=True)
class Column:
    """A table column: row key, Markdown header, and how Markdown prints its numbers.

    An ``optional`` column (a figure only some trainers write) is left out of the Markdown
    when no row has it; the CSV always has it.
    """

    key: str
    header: str
    fmt: str = "{:.4f}"
    part: str = "quality"  # which Markdown table it goes in: "quality" or "cost"
    optional: bool = False


COLUMNS = (
    Column("status", "status", "{}"),
    Column("final_loss", "batch loss (last)"),
    Column("best_loss", "batch loss (best)"),
    Column("final_acc", "test acc (last eval)"),
    Column("best_acc", "test acc (best eval)"),
    Column("final_acc_ranks", "own test acc (last eval)"),
    Column("best_acc_ranks", "own test acc (best eval)"),
    Column("train_loss", "end train loss"),
    Column("test_accuracy", "end test acc"),
    Column("train_loss_rank_mean", "end own train loss"),
    Column("test_accuracy_rank_mean", "end own test acc"),
    Column("grad_diversity_inter", "grad diversity (inter)", "{:.3g}", optional=True),
    Column("grad_diversity_intra", "grad diversity (intra)", "{:.3g}", optional=True),
    Column("epochs_to_target", "epochs to target", "{:.2f}", "cost"),
    Column("rounds_to_target", "rounds to target", "{:.0f}", "cost"),
    Column("wall_s_to_target", "wall s to target", "{:.1f}", "cost"),
    Column("epochs_done", "epochs done", "{:.2f}", "cost"),
    Column("rounds", "rounds", "{:.0f}", "cost"),
    Column("wall_s", "wall s", "{:.1f}", "cost"),
    Column("bytes_sent", "sent", "bytes", "cost"),
    Column("bytes_saved", "saved", "bytes", "cost"),
    Column("arrival_realised", "arrival", "{:.3f}", "cost"),
    Column("live_ranks", "live ranks", "{:.0f}", "cost"),
    Column("consensus_distance", "consensus dist", "{:.3g}", "cost"),
    Column("skipped_steps", "skipped steps", "{:.0f}", "cost", optional=True),
)
# What each column measures, for the note under the tables (report.md and stdout).
LEGEND = (
    '"batch loss" is the training loss of the batches each rank trained on, averaged over the '
    "last (or best) logging window and over the ranks: the progress lines show rank 0's share "
    'of it. "test acc" is the averaged model (the mean of the live ranks\' parameters) on the '
    'whole test split at the last (or best) evaluation, the end-of-run one included; "own" is '
    "each rank's own model, averaged over ranks. \"end\" columns come from summary.json, "
    "evaluated once at the end on the whole train and test splits: \"end train loss\" is the "
    "averaged model's, the number the `done:` line of `hpcsgd train` prints."
)
# Row key -> summary.json key, where they differ ("epochs" is also a config key).
SUMMARY_KEY = {"epochs_done": "epochs"}
# summary.json key -> the record key that tracks it during training.
RECORD_KEY = {"epochs": "epoch"}
COST_KEYS = (
    "epochs_done", "rounds", "wall_s", "bytes_sent", "bytes_saved", "arrival_realised", "live_ranks",
    "consensus_distance", "skipped_steps",
)
_COLUMN_KEYS = frozenset(c.key for c in COLUMNS)
SUMMARY_KEYS = ("train_loss", "test_accuracy", "train_loss_rank_mean", "test_accuracy_rank_mean")
# Row keys that are numbers, the ones a group row gives as mean ± std.
NUMERIC_KEYS = tuple(c.key for c in COLUMNS if c.key != "status")


@dataclass
class Table:
    """Rows (dicts keyed by ``run``, the differing keys and :data:`COLUMNS` keys) plus context.

    ``groups`` has one row per group of seeds (see :func:`group_row`); ``grouped`` is True when
    some group has more than one run, and then the Markdown and table.csv show the group rows.
    """

    keys: list[str]
    rows: list[dict]
    target: float | None
    target_note: str
    columns: tuple[Column, ...] = field(default=COLUMNS)
    groups: list[dict] = field(default_factory=list)
    group_keys: list[str] = field(default_factory=list)

    @property
    def grouped(self) -> bool:
        return any(g["n"] > 1 for g in self.groups)

    @property
    def key_fields(self) -> list[str]:
        """Row keys of the differing config keys; "config." marks one a column also uses."""
        return [key_field(k) for k in self.keys]

    @property
    def fieldnames(self) -> list[str]:
        return ["run", *self.key_fields, *(c.key for c in self.columns)]

    @property
    def group_fieldnames(self) -> list[str]:
        stats = [f for c in self.columns if c.key != "status" for f in (c.key, f"{c.key}_std", f"{c.key}_n")]
        return ["group", *(key_field(k) for k in self.group_keys), "n", "seeds", "runs", "status", *stats]


def key_field(key: str) -> str:
    return f"config.{key}" if key in _COLUMN_KEYS or key == "run" else key


def _last_eval(run: Run, key: str) -> float | None:
    """``key`` at the run's last evaluation, the end-of-run one (summary.json) included."""
    _, _, ys = run.eval_series(key, x="step")
    return float(ys[-1]) if len(ys) else None


def _best_eval(run: Run, key: str) -> float | None:
    _, _, ys = run.eval_series(key, x="step")
    return float(ys.max()) if len(ys) else None


def final_accuracy(run: Run) -> float | None:
    """The averaged model's test accuracy at the last evaluation, the end-of-run one included."""
    return _last_eval(run, "avg_test_accuracy")


def default_target(runs: list[Run]) -> float | None:
    """:data:`TARGET_FRACTION` of the best final accuracy across ``runs`` (None if none has one)."""
    finals = [a for a in map(final_accuracy, runs) if a is not None]
    return TARGET_FRACTION * max(finals) if finals else None


def to_target(run: Run, target: float | None) -> dict:
    """Epochs, rounds and wall seconds at the first evaluation where the averaged model's
    accuracy reaches ``target`` (rank means at that step); None where it never does."""
    out = dict.fromkeys(("epochs_to_target", "rounds_to_target", "wall_s_to_target"))
    if target is None:
        return out
    for name, x in zip(out, ("epoch", "rounds", "wall_s")):
        _, xs, acc = run.eval_series("avg_test_accuracy", x=x)
        reached = xs[acc >= target]
        out[name] = float(reached[0]) if len(reached) else None
    return out


def _num(value) -> float | None:
    """A number as it is (an int stays an int for the CSV), or None."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _from_summary_or_records(run: Run, key: str) -> float | None:
    """``key`` from summary.json, else from the records of the last logged step."""
    if run.summary and _num(run.summary.get(key)) is not None:
        return _num(run.summary[key])
    last = run.last_records()
    if key in ("bytes_sent", "bytes_saved"):
        # Per-rank cumulative counters; the summary reports the total over ranks.
        values = [_num(r.get(key)) for r in last]
        return sum(v for v in values if v is not None) if any(v is not None for v in values) else None
    if key == "arrival_realised":
        sent = sum(_num(r.get("messages_sent")) or 0 for r in last)
        dropped = sum(_num(r.get("messages_dropped")) or 0 for r in last)
        return sent / (sent + dropped) if sent + dropped else (1.0 if last else None)
    return run.final(RECORD_KEY.get(key, key))


def run_row(run: Run, keys: list[str], target: float | None) -> dict:
    """One table row for ``run``; None marks a value the run does not have."""
    row = {"run": run.name, **{key_field(k): run.config.get(k) for k in keys}, "status": run.status}
    row["final_loss"] = run.final("loss")
    row["best_loss"] = run.best("loss", lowest=True)
    row["final_acc"] = _last_eval(run, "avg_test_accuracy")
    row["best_acc"] = _best_eval(run, "avg_test_accuracy")
    row["final_acc_ranks"] = _last_eval(run, "test_accuracy")
    row["best_acc_ranks"] = _best_eval(run, "test_accuracy")
    for key in SUMMARY_KEYS:
        row[key] = _num(run.summary.get(key)) if run.summary else None
    row["grad_diversity_inter"] = diversity(run, "inter")
    row["grad_diversity_intra"] = diversity(run, "intra")
    row.update(to_target(run, target))
    for key in COST_KEYS:
        row[key] = _from_summary_or_records(run, SUMMARY_KEY.get(key, key))
    return row


def group_row(group: Group, keys: list[str], rows: dict[int, dict]) -> dict:
    """One row for ``group``: per column the mean, sample std and count of its runs' values.

    ``rows`` maps ``id(run)`` to its :func:`run_row` (names repeat across sweeps: seed0/,
    seed1/). A value a run lacks (an accuracy never reached, a summary not yet written)
    leaves that run out of that column's mean.
    """
    members = [rows[id(r)] for r in group.runs]
    out = {
        "group": group.label,
        **{key_field(k): group.config.get(k) for k in keys},
        "n": group.n,
        "seeds": group.seeds + (f" (repeated: {','.join(map(format_value, group.repeated_seeds))})"
                                if group.repeated_seeds else ""),
        "runs": ";".join(r.name for r in group.runs),
        "status": group.status,
    }
    for key in NUMERIC_KEYS:
        values = [v for m in members if (v := _num(m.get(key))) is not None]
        mean, std, *_ = aggregate(values) if values else (None, None)
        out[key], out[f"{key}_std"], out[f"{key}_n"] = mean, std, len(values)
    return out


def build_table(runs: list[Run], target: float | None = None) -> Table:
    """Rows for ``runs`` and for their groups of seeds, sorted by the config keys that differ.

    Args:
        target: accuracy the to-target columns measure; default :func:`default_target`.
    """
    keys = differing_keys(runs)
    if target is None:
        target = default_target(runs)
        note = (
            f"target accuracy {target:.4f} = {TARGET_FRACTION:g} x best final accuracy"
            if target is not None
            else "no run evaluated the test split: no target"
        )
    else:
        note = f"target accuracy {target:.4f} (given)"
    ordered = sorted(runs, key=lambda r: sort_key(r.config, keys, r.name))
    by_run = {id(r): run_row(r, keys, target) for r in ordered}
    gkeys = [k for k in keys if k not in SEED_KEYS]
    return Table(
        keys=keys, rows=list(by_run.values()), target=target, target_note=note,
        groups=[group_row(g, gkeys, by_run) for g in group_runs(runs)], group_keys=gkeys,
    )


def _cell(value, fmt: str) -> str:
    if value is None:
        return MISSING
    if fmt == "bytes" and _num(value) is not None:
        return size_text(float(value))
    if _num(value) is not None and fmt != "{}":
        return number_text(float(value), fmt)
    return format_value(value)


def _shown(table: Table, columns: list[Column], rows: list[dict]) -> list[Column]:
    """``columns`` less the optional ones no row has a value for."""
    return [c for c in columns if not c.optional or any(r.get(c.key) is not None for r in rows)]


def _markdown_table(table: Table, columns: list[Column]) -> str:
    columns = _shown(table, columns, table.rows)
    headers = ["run", *table.keys, *(c.header for c in columns)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in table.rows:
        cells = [
            row["run"],
            *(format_value(row[k]) for k in table.key_fields),
            *(_cell(row[c.key], c.fmt) for c in columns),
        ]
        lines.append(_markdown_line(cells))
    return "\n".join(lines)


def _markdown_line(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _group_cell(row: dict, column: Column) -> str:
    """"mean ± std" of a group (the plain value for one run), "(k/n)" where only k runs have it."""
    if column.key == "status":
        return format_value(row["status"])
    count, mean, std = row[f"{column.key}_n"], row[column.key], row[f"{column.key}_std"]
    if not count:
        return MISSING
    text = _cell(mean, column.fmt)
    if count > 1 and std > 0:  # equal in every run (epochs done, live ranks): one number says it
        text += " ± " + _cell(std, column.fmt)
    if count < row["n"]:
        text += f" ({count}/{row['n']})"
    return text


def _markdown_groups(table: Table, columns: list[Column]) -> str:
    columns = _shown(table, columns, table.groups)
    headers = [*table.group_keys, "n", "seeds", *(c.header for c in columns)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in table.groups:
        cells = [
            *(format_value(row[key_field(k)]) for k in table.group_keys),
            str(row["n"]),
            row["seeds"],
            *(_group_cell(row, c) for c in columns),
        ]
        lines.append(_markdown_line(cells))
    return "\n".join(lines)


def to_markdown(table: Table) -> str:
    """Two Markdown tables (loss and accuracy; time to target and communication).

    One row per run, or, when some runs differ only in their seed, one row per group with
    mean ± sample std (ddof=1) over its runs.
    """
    quality = [c for c in table.columns if c.part == "quality"]
    cost = [c for c in table.columns if c.part == "cost"]
    if table.grouped:
        grouped = ", ".join(table.group_keys) if table.group_keys else "nothing but the seed"
        intro = (
            f"{len(table.rows)} runs in {len(table.groups)} group(s) of seeds; groups differ in: "
            f"{grouped}. Each cell is the mean ± sample std (ddof=1) over the group's runs; "
            "\"(k/n)\": only k of its n runs have that value."
        )
        repeated = [f"{g['group']} ({g['seeds']})" for g in table.groups if "repeated" in str(g["seeds"])]
        if repeated:
            intro += (" Repeated seeds: " + "; ".join(repeated) + ": the same experiment run more than once, so "
                      "its ± is no spread over seeds.")
        render = _markdown_groups
    else:
        grouped = ", ".join(table.keys) if table.keys else "nothing (all configs equal)"
        intro = f"Runs differ in: {grouped}."
        render = _markdown_table
    return "\n".join(
        [
            intro,
            "",
            "### Loss and accuracy",
            "",
            render(table, quality),
            "",
            f"### Time to target and communication ({table.target_note})",
            "",
            render(table, cost),
            "",
            LEGEND,
            "",
        ]
    )


def write_markdown(table: Table, path: str | Path) -> None:
    write_file(Path(path), to_markdown(table))


def write_csv(table: Table, path: str | Path) -> None:
    """What the Markdown shows, at full precision: group rows when grouped, else run rows."""
    if table.grouped:
        _write_rows(table.groups, table.group_fieldnames, path)
    else:
        write_runs_csv(table, path)


def write_runs_csv(table: Table, path: str | Path) -> None:
    """One row per run, grouped or not; missing values are "-"."""
    _write_rows(table.rows, table.fieldnames, path)


def _write_rows(rows: list[dict], fieldnames: list[str], path: str | Path) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fieldnames)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in fieldnames})
    write_file(Path(path), text.getvalue())  # whole or not at all
def _csv_value(value):
    if value is None:
        return MISSING
    if isinstance(value, float):
        # Rank means carry float noise (5.930054999999999); ten digits is more than any timer has.
        return int(value) if value.is_integer() else float(f"{value:.10g}")
    return format_value(value) if isinstance(value, list) else value
