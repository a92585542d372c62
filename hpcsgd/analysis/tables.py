"""Comparison tables of runs: one row per run, grouped by the config keys that differ.

Each row holds the differing keys, losses and accuracies (logged and from summary.json), the
epochs, rounds and wall time to reach a target accuracy, and communication figures. The same
rows are written as Markdown (for people) and CSV (for other tools); a missing value is "-".
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from .runs import Run, differing_keys, format_value

MISSING = "-"
TARGET_FRACTION = 0.9  # default target: this fraction of the best final accuracy


@dataclass(frozen=True)
class Column:
    """A table column: row key, Markdown header, and how Markdown prints its numbers."""

    key: str
    header: str
    fmt: str = "{:.4f}"
    part: str = "quality"  # which Markdown table it goes in: "quality" or "cost"


COLUMNS = (
    Column("status", "status", "{}"),
    Column("final_loss", "last loss"),
    Column("best_loss", "best loss"),
    Column("final_acc", "last acc"),
    Column("best_acc", "best acc"),
    Column("final_acc_ranks", "last acc (ranks)"),
    Column("best_acc_ranks", "best acc (ranks)"),
    Column("train_loss", "end train loss"),
    Column("test_accuracy", "end test acc"),
    Column("train_loss_rank_mean", "end train loss (ranks)"),
    Column("test_accuracy_rank_mean", "end test acc (ranks)"),
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
)
# Row key -> summary.json key, where they differ ("epochs" is also a config key).
SUMMARY_KEY = {"epochs_done": "epochs"}
# summary.json key -> the record key that tracks it during training.
RECORD_KEY = {"epochs": "epoch"}
COST_KEYS = (
    "epochs_done", "rounds", "wall_s", "bytes_sent", "bytes_saved", "arrival_realised", "live_ranks",
    "consensus_distance",
)
_COLUMN_KEYS = frozenset(c.key for c in COLUMNS)
SUMMARY_KEYS = ("train_loss", "test_accuracy", "train_loss_rank_mean", "test_accuracy_rank_mean")


@dataclass
class Table:
    """Rows (dicts keyed by ``run``, the differing keys and :data:`COLUMNS` keys) plus context."""

    keys: list[str]
    rows: list[dict]
    target: float | None
    target_note: str
    columns: tuple[Column, ...] = field(default=COLUMNS)

    @property
    def key_fields(self) -> list[str]:
        """Row keys of the differing config keys; "config." marks one a column also uses."""
        return [key_field(k) for k in self.keys]

    @property
    def fieldnames(self) -> list[str]:
        return ["run", *self.key_fields, *(c.key for c in self.columns)]


def key_field(key: str) -> str:
    return f"config.{key}" if key in _COLUMN_KEYS or key == "run" else key


def final_accuracy(run: Run) -> float | None:
    """The averaged model's last logged test accuracy, else the summary's."""
    acc = run.final("avg_test_accuracy")
    if acc is None and run.summary:
        acc = _num(run.summary.get("test_accuracy"))
    return acc


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
    steps, acc = run.curve("avg_test_accuracy", x="step")
    reached = steps[acc >= target]
    if len(reached):
        step = float(reached[0])
        out["epochs_to_target"] = run.at_step("epoch", step)
        out["rounds_to_target"] = run.at_step("rounds", step)
        out["wall_s_to_target"] = run.at_step("wall_s", step)
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
    row["final_acc"] = run.final("avg_test_accuracy")
    row["best_acc"] = run.best("avg_test_accuracy")
    row["final_acc_ranks"] = run.final("test_accuracy")
    row["best_acc_ranks"] = run.best("test_accuracy")
    for key in SUMMARY_KEYS:
        row[key] = _num(run.summary.get(key)) if run.summary else None
    row.update(to_target(run, target))
    for key in COST_KEYS:
        row[key] = _from_summary_or_records(run, SUMMARY_KEY.get(key, key))
    return row


def _sort_key(run: Run, keys: list[str]):
    # Numbers sort as numbers and before strings; None last: q=2 before q=10.
    def one(v):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return (0, float(v), "")
        return (1 if v is not None else 2, 0.0, json.dumps(v, sort_keys=True, default=str))

    return tuple(one(run.config.get(k)) for k in keys) + ((3, 0.0, run.name),)


def build_table(runs: list[Run], target: float | None = None) -> Table:
    """Rows for ``runs``, sorted by the config keys that differ among them.

    Args:
        target: accuracy the to-target columns measure; default :func:`default_target`.
    """
    keys = differing_keys(runs)
    if target is None:
        target = default_target(runs)
        note = (
            f"target accuracy {target:.4f} = {TARGET_FRACTION:g} x best final accuracy"
            if target is not None
            else "no run logged a test accuracy: no target"
        )
    else:
        note = f"target accuracy {target:.4f} (given)"
    ordered = sorted(runs, key=lambda r: _sort_key(r, keys))
    return Table(keys=keys, rows=[run_row(r, keys, target) for r in ordered], target=target, target_note=note)


def _bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _cell(value, fmt: str) -> str:
    if value is None:
        return MISSING
    if fmt == "bytes" and _num(value) is not None:
        return _bytes(float(value))
    if _num(value) is not None and fmt != "{}":
        return fmt.format(float(value))
    return format_value(value)


def _markdown_table(table: Table, columns: list[Column]) -> str:
    headers = ["run", *table.keys, *(c.header for c in columns)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in table.rows:
        cells = [
            row["run"],
            *(format_value(row[k]) for k in table.key_fields),
            *(_cell(row[c.key], c.fmt) for c in columns),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def to_markdown(table: Table) -> str:
    """Two Markdown tables (loss and accuracy; time to target and communication)."""
    quality = [c for c in table.columns if c.part == "quality"]
    cost = [c for c in table.columns if c.part == "cost"]
    grouped = ", ".join(table.keys) if table.keys else "nothing (all configs equal)"
    return "\n".join(
        [
            f"Runs differ in: {grouped}. \"last\"/\"best\" are logged rank means; \"acc\" is the "
            "averaged model, \"(ranks)\" the mean of each rank's own model; \"end\" columns are "
            "summary.json's full-split evaluation.",
            "",
            "### Loss and accuracy",
            "",
            _markdown_table(table, quality),
            "",
            f"### Time to target and communication ({table.target_note})",
            "",
            _markdown_table(table, cost),
            "",
        ]
    )


def write_markdown(table: Table, path: str | Path) -> None:
    Path(path).write_text(to_markdown(table))


def write_csv(table: Table, path: str | Path) -> None:
    """Full-precision values, one row per run; missing values are "-"."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=table.fieldnames)
        writer.writeheader()
        for row in table.rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in table.fieldnames})


def _csv_value(value):
    if value is None:
        return MISSING
    if isinstance(value, float):
        # Rank means carry float noise (5.930054999999999); ten digits is more than any timer has.
        return int(value) if value.is_integer() else float(f"{value:.10g}")
    return format_value(value) if isinstance(value, list) else value
