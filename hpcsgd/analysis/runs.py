"""Read run directories (config.toml, metrics/rank-K.jsonl, summary.json) into :class:`Run`.

Reading is forgiving: a run that crashed or is still going is as worth a look as a finished
one, so a torn or garbage line, a missing rank file, a missing summary or config each become a
line in ``Run.warnings`` instead of an error. Only a path that is no run directory at all
raises :class:`~hpcsgd.errors.ConfigError`.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import ConfigError

FINISHED, UNFINISHED = "finished", "running/crashed"

# Keys that say where or how a run was executed, not what was trained.
IGNORED_KEYS = frozenset(
    {"run_dir", "data", "progress", "threads", "resume", "overwrite", "log_every", "eval_every", "checkpoint_every",
     "collective_timeout"}
)
# What names a run when nothing differs among the runs compared (a single run, say).
DEFAULT_LABEL_KEYS = ("algorithm", "q", "tau", "drop_rate")
# summary.json keys that stand in for the config when config.toml is missing.
_SUMMARY_CONFIG_KEYS = ("algorithm", "q", "tau", "drop_rate", "model", "seed", "batch_size", "lr", "epochs")
_RANK_FILE = re.compile(r"^rank-(\d+)\.jsonl$")


@dataclass
class Run:
    """One run directory as read from disk.

    ``records`` maps a rank to its logged records in file order; ``label`` names the run in
    tables and legends (set by :func:`label_runs` from the keys that differ among runs).
    """

    path: Path
    config: dict
    summary: dict | None
    records: dict[int, list[dict]]
    warnings: list[str] = field(default_factory=list)
    label: str = ""

    def __post_init__(self):
        if not self.label:
            self.label = self.name

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def status(self) -> str:
        return FINISHED if self.summary is not None else UNFINISHED

    @property
    def ranks(self) -> list[int]:
        return sorted(self.records)

    def has(self, key: str) -> bool:
        """Whether any rank logged a non-null ``key``."""
        return any(_number(r.get(key)) is not None for recs in self.records.values() for r in recs)

    def curve(self, key: str, x: str = "epoch", ranks: int | str = "mean") -> tuple[np.ndarray, np.ndarray]:
        """``key`` against ``x`` over the logged steps, as two float arrays.

        Args:
            key: a record key (``loss``, ``avg_test_accuracy``, ...).
            x: the record key on the x axis (``epoch``, ``step``, ``wall_s``, ``rounds``).
            ranks: ``"mean"`` averages over the ranks that logged the step (a failed rank
                stops counting once it stops writing), or one rank's id.

        Steps where no rank has a number for ``key`` or ``x`` are left out, so an
        evaluation-only key gives the evaluation steps.
        """
        if ranks == "mean":
            sources = list(self._steps.values())
        else:
            sources = [self._steps.get(int(ranks), {})]
        xs: dict[int, list[float]] = {}
        ys: dict[int, list[float]] = {}
        for by_step in sources:
            for step, rec in by_step.items():
                xv, yv = _number(rec.get(x)), _number(rec.get(key))
                if xv is None or yv is None:
                    continue
                xs.setdefault(step, []).append(xv)
                ys.setdefault(step, []).append(yv)
        steps = sorted(ys)
        return (
            np.array([np.mean(xs[s]) for s in steps], dtype=float),
            np.array([np.mean(ys[s]) for s in steps], dtype=float),
        )

    def final(self, key: str) -> float | None:
        """Rank mean of ``key`` at the last step that logged it, or None."""
        _, y = self.curve(key, x="step")
        return float(y[-1]) if len(y) else None

    def best(self, key: str, lowest: bool = False) -> float | None:
        """Best rank-mean value of ``key`` over the run (highest, or lowest for a loss)."""
        _, y = self.curve(key, x="step")
        if not len(y):
            return None
        return float(y.min() if lowest else y.max())

    def at_step(self, key: str, step: float) -> float | None:
        """Rank mean of ``key`` at exactly ``step``, or None."""
        s, y = self.curve(key, x="step")
        hit = np.flatnonzero(s == step)
        return float(y[hit[0]]) if len(hit) else None

    def last_records(self) -> list[dict]:
        """Each rank's record at the last logged step (ranks that stopped earlier left out)."""
        steps = [max(by) for by in self._steps.values() if by]
        if not steps:
            return []
        end = max(steps)
        return [by[end] for by in self._steps.values() if end in by]

    @cached_property
    def _steps(self) -> dict[int, dict[int, dict]]:
        """Each rank's records keyed by step, built once: every curve reads it."""
        return {r: _by_step(recs) for r, recs in self.records.items()}


def _by_step(records: list[dict]) -> dict[int, dict]:
    """Records keyed by step; a repeated step keeps the later line (it was written last)."""
    out = {}
    for rec in records:
        step = _number(rec.get("step"))
        if step is not None:
            out[int(step)] = rec
    return out


def _number(value) -> float | None:
    """A finite float, or None for null, NaN, strings and the like."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "config.toml").is_file() or (path / "metrics").is_dir())


def load_run(path: str | os.PathLike) -> Run:
    """Read one run directory; problems that leave something to show become warnings.

    Raises:
        ConfigError: ``path`` has neither ``config.toml`` nor ``metrics/``.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"run directory {path} does not exist")
    if not is_run_dir(path):
        raise ConfigError(
            f"{path} is not a run directory: it has neither config.toml nor metrics/ "
            "(expected the --run-dir of `hpcsgd train`, or a folder of such directories)"
        )
    warnings: list[str] = []
    summary = _read_summary(path / "summary.json", warnings)
    config = _read_config(path / "config.toml", summary, warnings)
    records = _read_metrics(path / "metrics", warnings)
    _check_ranks(records, summary, warnings)
    if summary is None:
        warnings.append("no summary.json: the run is still going or it crashed")
    return Run(path=path, config=config, summary=summary, records=records, warnings=warnings)


def _read_summary(path: Path, warnings: list[str]) -> dict | None:
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        warnings.append(f"summary.json is unreadable ({exc}); treated as missing")
        return None
    if not isinstance(summary, dict):
        warnings.append("summary.json is not a JSON object; treated as missing")
        return None
    return summary


def _read_config(path: Path, summary: dict | None, warnings: list[str]) -> dict:
    if path.is_file():
        try:
            with open(path, "rb") as fh:
                return tomllib.load(fh)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            warnings.append(f"config.toml is unreadable ({exc})")
    else:
        warnings.append("no config.toml")
    # The summary repeats the keys that tell runs apart: better than an empty config.
    return {k: summary[k] for k in _SUMMARY_CONFIG_KEYS if summary and k in summary}


def _read_metrics(metrics: Path, warnings: list[str]) -> dict[int, list[dict]]:
    if not metrics.is_dir():
        warnings.append("no metrics/ directory")
        return {}
    records: dict[int, list[dict]] = {}
    for entry in sorted(metrics.iterdir()):
        match = _RANK_FILE.match(entry.name)
        if match and entry.is_file():
            records[int(match.group(1))] = _read_jsonl(entry, warnings)
    if not any(records.values()):
        warnings.append("no metrics records")
    return records


def _read_jsonl(path: Path, warnings: list[str]) -> list[dict]:
    """Records of one rank file; lines that do not parse are skipped and counted."""
    lines = path.read_text(errors="replace").splitlines()
    out, bad = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict):
            out.append(rec)
        else:
            bad.append(number)
    if bad:
        # A torn last line is what a crash mid-write leaves; say which so a user can tell.
        last = " (truncated last line)" if bad == [len(lines)] else ""
        where = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        warnings.append(f"metrics/{path.name}: skipped {len(bad)} unreadable line(s){last}: line {where}")
    return out


def _check_ranks(records: dict[int, list[dict]], summary: dict | None, warnings: list[str]) -> None:
    """Warn about rank files that should be there and are not."""
    expected = max(records, default=-1) + 1
    if summary and isinstance(summary.get("ranks"), int):
        expected = max(expected, summary["ranks"])
    for recs in records.values():
        # The first record's live_ranks is the world size unless a rank failed at once.
        live = _number(recs[0].get("live_ranks")) if recs else None
        if live is not None:
            expected = max(expected, int(live))
    missing = sorted(set(range(expected)) - set(records))
    if missing:
        warnings.append(f"missing metrics for rank(s) {', '.join(map(str, missing))} of {expected}")


def find_run_dirs(path: Path) -> list[Path]:
    """``path`` if it is a run directory, else every run directory below it (not inside runs)."""
    if is_run_dir(path):
        return [path]
    found = []
    for root, dirs, _ in os.walk(path):
        dirs.sort()
        here = Path(root)
        if here != path and is_run_dir(here):
            found.append(here)
            dirs[:] = []  # checkpoints/ and metrics/ inside a run hold no runs
    return found


def load_runs(paths) -> list[Run]:
    """Read run directories, expanding folders of runs; labels each run (see :func:`label_runs`).

    Raises:
        ConfigError: a path does not exist or holds no run directory.
    """
    runs, seen = [], set()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ConfigError(f"run directory {path} does not exist")
        if not path.is_dir():
            raise ConfigError(f"{path} is not a run directory (it is a file)")
        found = find_run_dirs(path)
        if not found:
            raise ConfigError(
                f"{path} is not a run directory: neither it nor any folder below it has "
                "config.toml or metrics/ (expected the --run-dir of `hpcsgd train`)"
            )
        for run_dir in found:
            key = run_dir.resolve()
            if key not in seen:
                seen.add(key)
                runs.append(load_run(run_dir))
    label_runs(runs)
    return runs


def _hashable(value):
    return json.dumps(value, sort_keys=True, default=str)


def differing_keys(runs: list[Run]) -> list[str]:
    """Config keys with more than one value among ``runs``, in config file order.

    Only the runs that have a key count: a key that a run's config lacks (written by an older
    trainer, or rebuilt from summary.json) is unknown there, not different. Keys in
    :data:`IGNORED_KEYS` never differ.
    """
    order: dict[str, None] = {}
    for run in runs:
        order.update(dict.fromkeys(run.config))
    return [
        k
        for k in order
        if k not in IGNORED_KEYS and len({_hashable(run.config[k]) for run in runs if k in run.config}) > 1
    ]


def format_value(value) -> str:
    """A config value as it reads in a label or table cell."""
    if value is None:
        return "-"
    if isinstance(value, list):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


_EVERY_STEP = ("sync", "lossy-allreduce")  # strategies that communicate every step


def label_runs(runs: list[Run]) -> list[str]:
    """Name each run by the config keys that differ among ``runs``; returns the keys used.

    The algorithm is shown bare ("rps, q=2"), other keys as key=value. Runs whose labels
    still collide (identical configs) get their directory name appended.
    """
    keys = differing_keys(runs) or [k for k in DEFAULT_LABEL_KEYS if any(k in r.config for r in runs)]
    for run in runs:
        parts = [
            format_value(run.config.get(k)) if k == "algorithm" else f"{k}={format_value(run.config.get(k))}"
            for k in keys
            if not (k == "tau" and run.config.get("algorithm") in _EVERY_STEP)  # tau means nothing there
        ]
        run.label = ", ".join(parts) or run.name
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.label] = counts.get(run.label, 0) + 1
    for run in runs:
        if counts[run.label] > 1:
            run.label = f"{run.label} ({run.name})"
    return keys
