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
from ..algorithms.registry import REGISTRY
from ..trajectory import NOT_TRAJECTORY

FINISHED, UNFINISHED = "finished", "running/crashed"

# What changes results besides the config keys, added to each run's config under these names
# (from summary.json, else the newest checkpoint's record, else the metrics): runs on other
# data, other shards or at another world size are never one group of seeds.
IDENTITY_KEYS = ("data_digest", "partition", "world_size")
# What names a run when nothing differs among the runs compared (a single run, say).
DEFAULT_LABEL_KEYS = ("algorithm", "q", "redundancy", "tau", "drop_rate")
# summary.json keys that stand in for the config when config.toml is missing.
_SUMMARY_CONFIG_KEYS = ("algorithm", "q", "redundancy", "tau", "drop_rate", "model", "seed", "batch_size", "lr", "epochs",
                        "placement")
RANK_FILE = re.compile(r"^rank-(\d+)\.jsonl$")
# Evaluation record key -> the summary.json key of the same quantity at the end of the run
# (same model, same split: the logged test evaluation uses the whole test split too).
_SUMMARY_EVAL = {
    "avg_test_accuracy": "test_accuracy",
    "avg_test_loss": "test_loss",
    "test_accuracy": "test_accuracy_rank_mean",
    "test_loss": "test_loss_rank_mean",
}
# Record key on the x axis -> its summary.json key at the end of the run.
_SUMMARY_X = {"epoch": "epochs", "rounds": "rounds", "wall_s": "wall_s"}


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
        return any(finite_number(r.get(key)) is not None for recs in self.records.values() for r in recs)

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
        _, xs, ys = self.series(key, x, ranks)
        return xs, ys

    def series(
        self, key: str, x: str = "epoch", ranks: int | str = "mean"
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(steps, x, rank-mean ``key``) as :meth:`curve` has them, with the steps they belong to."""
        if ranks == "mean":
            sources = list(self._steps.values())
        else:
            sources = [self._steps.get(int(ranks), {})]
        xs: dict[int, list[float]] = {}
        ys: dict[int, list[float]] = {}
        for by_step in sources:
            for step, rec in by_step.items():
                xv, yv = finite_number(rec.get(x)), finite_number(rec.get(key))
                if xv is None or yv is None:
                    continue
                xs.setdefault(step, []).append(xv)
                ys.setdefault(step, []).append(yv)
        steps = sorted(ys)
        return (
            np.array(steps, dtype=float),
            np.array([np.mean(xs[s]) for s in steps], dtype=float),
            np.array([np.mean(ys[s]) for s in steps], dtype=float),
        )

    def eval_series(self, key: str, x: str = "epoch") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`series` of an evaluation key, ending with the end-of-run evaluation.

        Training evaluates every ``eval_every`` epochs and once more at the end (summary.json).
        A run shorter than ``eval_every``, or whose last step is no evaluation step, has its
        last evaluation only in the summary: it is appended here, at the summary's step, so
        that "last evaluation" means the same thing for every run.
        """
        steps, xs, ys = self.series(key, x)
        end = self._summary_end(key, x)
        if end is not None and (not len(steps) or end[0] > steps[-1]):
            steps, xs, ys = (np.append(a, v) for a, v in zip((steps, xs, ys), end))
        return steps, xs, ys

    def _summary_end(self, key: str, x: str) -> tuple[float, float, float] | None:
        """(step, x, value) of ``key`` from summary.json's end-of-run evaluation, or None."""
        summary = self.summary or {}
        step = finite_number(summary.get("steps"))
        xv = step if x == "step" else finite_number(summary.get(_SUMMARY_X.get(x, x)))
        value = finite_number(summary.get(_SUMMARY_EVAL.get(key, "")))
        if step is None or xv is None or value is None:
            return None
        return step, xv, value

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
        step = finite_number(rec.get("step"))
        if step is not None:
            out[int(step)] = rec
    return out


def finite_number(value) -> float | None:
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
    config = {**config, **identity(path, summary, records), **redundancy_key(config)}
    if summary is None:
        warnings.append("no summary.json: the run is still going or it crashed")
    return Run(path=path, config=config, summary=summary, records=records, warnings=warnings)


def identity(path: Path, summary: dict | None, records: dict[int, list[dict]]) -> dict:
    """The run's :data:`IDENTITY_KEYS` that can be told (a key that cannot is left out: unknown,
    not different): the shards' content digest and partition, and the world size."""
    summary = summary or {}
    shards = summary.get("shards") if isinstance(summary.get("shards"), dict) else None
    record = _newest_record(path) if shards is None or "world_size" not in summary else {}
    shards = shards or (record.get("shards") if isinstance(record.get("shards"), dict) else {})
    out = {"data_digest": shards.get("digest"), "partition": summary.get("partition", shards.get("partition"))}
    world = summary.get("world_size", summary.get("ranks", record.get("ranks")))
    if not isinstance(world, int) and records:
        first = [finite_number(recs[0].get("live_ranks")) for recs in records.values() if recs]
        world = max([int(v) for v in first if v is not None] + [max(records) + 1])
    out["world_size"] = world
    return {k: v for k, v in out.items() if v is not None}


def redundancy_key(config: dict) -> dict:
    """The run's mean redundancy ``mu`` as a config key, whatever form it was given in (``q``,
    ``redundancy``, ``redundancy_per_rank``): a q = 2 run and a redundancy = 1 run are one group.
    A run written before these keys existed had neither spread nor per-rank values: it gets their
    defaults, so that it groups with the runs that state them."""
    per_rank = config.get("redundancy_per_rank")
    out = {"redundancy_per_rank": [] if per_rank is None else per_rank,
           "redundancy_spread": config.get("redundancy_spread", 0.0)}
    if isinstance(per_rank, list) and per_rank and all(finite_number(m) is not None for m in per_rank):
        return {**out, "redundancy": sum(per_rank) / len(per_rank)}
    if finite_number(config.get("redundancy")) is not None:
        return {**out, "redundancy": float(config["redundancy"])}
    q = config.get("q")
    return {**out, "redundancy": float(q - 1)} if isinstance(q, int) and not isinstance(q, bool) else {}


def _newest_record(path: Path) -> dict:
    """The newest complete checkpoint's record (COMPLETE, plain JSON), or {}: what a run that has
    no summary.json yet says about its shards and ranks."""
    for complete in sorted((path / "checkpoints").glob("step-*/COMPLETE"), reverse=True):
        try:
            record = json.loads(complete.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            return record
    return {}


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
        match = RANK_FILE.match(entry.name)
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
        live = finite_number(recs[0].get("live_ranks")) if recs else None
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
    :data:`hpcsgd.trajectory.NOT_TRAJECTORY` (where or how a run was executed, not what was
    trained: what a checkpoint may be resumed with changed) never differ.
    """
    order: dict[str, None] = {}
    for run in runs:
        order.update(dict.fromkeys(run.config))
    keys = [
        k
        for k in order
        if k not in NOT_TRAJECTORY and len({_hashable(run.config[k]) for run in runs if k in run.config}) > 1
    ]
    if "redundancy" in keys and _integer_redundancy(runs):  # q says it all: q = 1 + redundancy
        keys.remove("redundancy")
    return keys


def _integer_redundancy(runs: list[Run]) -> bool:
    """Whether every run's redundancy is its ``q - 1`` (no fractional or per-rank redundancy)."""
    return all(r.config.get("redundancy") == r.config.get("q", 0) - 1 for r in runs)


def format_value(value) -> str:
    """A config value as it reads in a label or table cell."""
    if value is None:
        return "-"
    if isinstance(value, list):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


CELL_WIDTH = 10  # longest number a table cell shows as its format asks


def number_text(value: float, fmt: str, width: int = CELL_WIDTH) -> str:
    """``value`` in ``fmt``, or in three significant digits with an exponent where that would
    be wider than ``width``: a diverged loss reads 1.76e+29, not 30 digits that break the table."""
    text = fmt.format(value)
    return text if len(text) <= width else f"{value:.3g}"


def _every_step(algorithm) -> bool:
    """Whether ``algorithm`` communicates every step (then tau means nothing); unknown names: no."""
    known = REGISTRY.get(algorithm) if isinstance(algorithm, str) else None
    return known is not None and known.every_step


def config_label(config: dict, keys: list[str]) -> str:
    """``config`` named by ``keys``: the algorithm bare ("rps, q=2"), other keys as key=value."""
    return ", ".join(
        format_value(config.get(k)) if k == "algorithm" else f"{k}={format_value(config.get(k))}"
        for k in keys
        if not (k == "tau" and _every_step(config.get("algorithm")))  # tau means nothing there
    )


def _label_keys(runs: list[Run], keys: list[str]) -> list[str]:
    keys = keys or [k for k in DEFAULT_LABEL_KEYS if any(k in r.config for r in runs)]
    if "q" in keys and "redundancy" in keys:  # one says the other: name runs by one of them
        keys = [k for k in keys if k != ("redundancy" if _integer_redundancy(runs) else "q")]
    return keys


def label_runs(runs: list[Run]) -> list[str]:
    """Name each run by the config keys that differ among ``runs``; returns the keys used.

    Runs whose labels still collide (identical configs) get their directory name appended.
    """
    keys = _label_keys(runs, differing_keys(runs))
    for run in runs:
        run.label = config_label(run.config, keys) or run.name
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.label] = counts.get(run.label, 0) + 1
    for run in runs:
        if counts[run.label] > 1:
            run.label = f"{run.label} ({run.name})"
    return keys


# -- groups of seeds -------------------------------------------------------------------------
SEED_KEYS = frozenset({"seed"})  # what repeats of one experiment may differ in


@dataclass
class Group:
    """Runs whose configs differ only in :data:`SEED_KEYS` (one run when nothing repeats)."""

    runs: list[Run]
    label: str = ""

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def config(self) -> dict:
        """The first run's config: every key but the seed is the same in all runs."""
        return self.runs[0].config

    @property
    def repeated_seeds(self) -> list:
        """Seeds that more than one run of the group has: the same experiment run twice, not a
        sample of seeds (its spread then says nothing about seeds)."""
        seeds = [_hashable(r.config.get("seed")) for r in self.runs]
        return [json.loads(s) for s in sorted(set(seeds), key=seeds.index) if seeds.count(s) > 1]

    @property
    def seeds(self) -> str:
        """The runs' seeds, compact ("0-4", "1,3,7"); "-" where a config has none."""
        seeds = [r.config.get("seed") for r in self.runs]
        if any(not isinstance(s, int) for s in seeds):
            return ",".join(format_value(s) for s in seeds)
        seeds = sorted(seeds)
        if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
            return f"{seeds[0]}-{seeds[-1]}"
        return ",".join(map(str, seeds))

    @property
    def status(self) -> str:
        finished = sum(r.status == FINISHED for r in self.runs)
        if finished == self.n:
            return FINISHED
        return UNFINISHED if finished == 0 else f"{finished}/{self.n} {FINISHED}"

    @property
    def legend(self) -> str:
        """The label with the number of runs when there is more than one."""
        return self.label if self.n == 1 else f"{self.label} (n={self.n})"


def sort_key(config: dict, keys: list[str], name: str = ""):
    """Order of rows and legend entries: numbers as numbers (q=2 before q=10), None last."""

    def one(v):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return (0, float(v), "")
        return (1 if v is not None else 2, 0.0, json.dumps(v, sort_keys=True, default=str))

    return tuple(one(config.get(k)) for k in keys) + ((3, 0.0, name),)


def group_keys(runs: list[Run]) -> list[str]:
    """The config keys that tell groups apart: those that differ, less the seed."""
    return [k for k in differing_keys(runs) if k not in SEED_KEYS]


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs grouped by every config key but the seed, sorted by the keys that differ.

    A group of one run is labelled like the run itself (``Run.label``), so a report of runs
    without repeats reads as before; a group of repeats is named by the keys that differ
    among the groups.
    """
    keys = group_keys(runs)
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(_hashable(run.config.get(k)) for k in keys), []).append(run)
    label_keys = _label_keys(runs, keys)
    out = []
    for members in groups.values():
        members.sort(key=lambda r: sort_key(r.config, ["seed"], r.name))
        label = members[0].label if len(members) == 1 else config_label(members[0].config, label_keys)
        out.append(Group(members, label or members[0].name))
    out.sort(key=lambda g: sort_key(g.config, keys, g.runs[0].name))
    return out


def aggregate(values: list[float]) -> tuple[float, float, float, float]:
    """(mean, sample std, min, max) of ``values``; the std of a single value is 0.

    Equal values give their value and a std of exactly 0, and the mean never leaves [min, max]:
    the mean of seven equal floats is not always that float, and an error bar below zero is
    an error to matplotlib.
    """
    a = np.asarray(values, dtype=float)
    lo, hi = float(a.min()), float(a.max())
    if lo == hi:
        return lo, 0.0, lo, hi
    std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    return min(max(float(a.mean()), lo), hi), std, lo, hi


@dataclass
class Band:
    """A group's curve: the mean over runs, its spread, and how many runs each point has."""

    x: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    count: np.ndarray


def group_curve(group: Group, key: str, x: str = "epoch", evaluation: bool = False) -> Band:
    """Mean and spread of ``key`` against ``x`` over the runs of ``group``, step by step.

    Runs are aligned by step (the x of a step is the mean over the runs that logged it): a run
    that stopped early leaves the later points to the others, as a failed rank does for the
    rank mean. ``evaluation`` reads :meth:`Run.eval_series` (with the end-of-run evaluation).
    """
    xs: dict[float, list[float]] = {}
    ys: dict[float, list[float]] = {}
    for run in group.runs:
        steps, rx, ry = run.eval_series(key, x) if evaluation else run.series(key, x)
        for s, xv, yv in zip(steps, rx, ry):
            xs.setdefault(s, []).append(xv)
            ys.setdefault(s, []).append(yv)
    steps = sorted(ys)
    stats = np.array([aggregate(ys[s]) for s in steps]).reshape(-1, 4)
    return Band(
        x=np.array([np.mean(xs[s]) for s in steps], dtype=float),
        mean=stats[:, 0], std=stats[:, 1], lo=stats[:, 2], hi=stats[:, 3],
        count=np.array([len(ys[s]) for s in steps], dtype=int),
    )


# -- gradient diversity ----------------------------------------------------------------------
# Measure -> (record keys, summary.json keys), first found wins. "grad_diversity" is the
# inter-worker measure under its older name.
DIVERSITY = {
    "inter": (("grad_diversity_inter", "grad_diversity"), ("grad_diversity_inter", "grad_diversity_mean")),
    "intra": (("grad_diversity_intra",), ("grad_diversity_intra",)),
}


def diversity(run: Run, measure: str) -> float | None:
    """A run's gradient diversity (``"inter"`` or ``"intra"``): the mean over its logged
    steps, else the number summary.json gives; None if the run has neither."""
    record_keys, summary_keys = DIVERSITY[measure]
    for key in record_keys:
        _, ys = run.curve(key, x="step")
        if len(ys):
            return float(np.mean(ys))
    for key in summary_keys:
        value = finite_number((run.summary or {}).get(key))
        if value is not None:
            return value
    return None
