"""`hpcsgd report --follow RUN_DIR`: watch a running job from its metrics files.

Every ``--interval`` seconds the rank files (metrics/rank-K.jsonl) are read from where the last
read stopped; a line still being written (no newline yet) waits for the next read, so a torn
last line is never an error. One row per logged step: the rank mean of what the ranks logged
there, shown once every live rank has logged it. On a terminal the screen is redrawn (progress
bar, the latest rows, where each rank is); otherwise each new row is printed once, so the
output reads well in a log file or through a pipe. Following ends with exit 0 when
summary.json appears (the run is done) or on Ctrl-C (the run goes on), and with exit 2 when
the run's job is gone without a summary (the process named in ``RUN_DIR/.hpcsgd.lock`` has
exited: it crashed or was killed) or when nothing changed for ``--give-up-after`` seconds (a
hung job, or a directory that never appears); the last line says which.

Plain text and ANSI clear-screen only: no curses or rich, which would be a dependency for a
table of a dozen columns.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import textwrap
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..train.rundir import job_gone
from .runs import (DEFAULT_LABEL_KEYS, RANK_FILE, config_label, find_run_dirs, finite_number, is_run_dir,
                   number_text)

CLEAR = "\x1b[H\x1b[2J"  # cursor home, erase screen
BAR_WIDTH = 30
# (header, width, record key, format): the columns of a row, rank means of the step's records.
COLUMNS = (
    ("epoch", 7, "epoch", "{:.2f}"),
    ("batch loss", 10, "loss", "{:.4f}"),
    ("lr", 9, "lr", "{:.3g}"),
    ("test acc", 8, "avg_test_accuracy", "{:.4f}"),
    ("own acc", 8, "test_accuracy", "{:.4f}"),
    ("rounds", 7, "rounds", "{:.0f}"),
    ("live", 4, "live_ranks", "{:.0f}"),
    ("consensus", 9, "consensus_distance", "{:.3g}"),
    ("wall s", 8, "wall_s", "{:.1f}"),
)
LEGEND = (
    "batch loss: training-batch loss, mean over each rank's last log window and over the ranks; "
    "test acc: averaged model, own acc: each rank's own model (rank mean), at evaluation steps, "
    "on the whole test split."
)


class RankTail:
    """The complete lines appended to one rank file since the previous :meth:`read`."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.inode: int | None = None
        self.partial = b""  # the start of a line whose newline has not been written yet
        self.bad = 0  # complete lines that were no JSON object
        self.mtime: float | None = None  # when the file was last written

    def read(self) -> tuple[list[dict], bool]:
        """(new records, whether the file was rewritten and must be read again from its start).

        A resumed run rewrites its rank files (lines after the checkpoint dropped) through a
        new file: a new inode, or a file shorter than what was read, starts over.
        """
        try:
            st = self.path.stat()
            self.mtime = st.st_mtime
            with open(self.path, "rb") as fh:
                restart = st.st_ino != self.inode or st.st_size < self.offset
                if restart:
                    self.offset, self.partial, self.inode = 0, b"", st.st_ino
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return [], False
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        records = []
        for line in lines:
            rec = _parse(line)
            if rec is not None:
                records.append(rec)
            elif line.strip():
                self.bad += 1
        return records, restart


def _parse(line: bytes) -> dict | None:
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return rec if isinstance(rec, dict) and finite_number(rec.get("step")) is not None else None


@dataclass
class Follower:
    """What has been read of one run directory so far."""

    run_dir: Path
    config: dict | None = None
    summary: dict | None = None
    tails: dict[int, RankTail] = field(default_factory=dict)
    steps: dict[int, dict[int, dict]] = field(default_factory=dict)  # step -> rank -> record
    last_step: dict[int, int] = field(default_factory=dict)  # rank -> its latest step
    rewritten: bool = False  # a rank file started over at the last poll (the run resumed)

    def poll(self) -> None:
        """Read what was appended since the last poll. summary.json is looked at first: the
        ranks flush every line before it is written, so the metrics read after it are whole."""
        self.summary = _read_json(self.run_dir / "summary.json")
        if self.config is None:
            self.config = _read_toml(self.run_dir / "config.toml")
        metrics = self.run_dir / "metrics"
        if metrics.is_dir():
            for entry in sorted(metrics.iterdir()):
                match = RANK_FILE.match(entry.name)
                if match:
                    self.tails.setdefault(int(match.group(1)), RankTail(entry))
        self.rewritten = False
        for rank, tail in self.tails.items():
            records, restart = tail.read()
            if restart and rank in self.last_step:
                self._forget(rank)
                self.rewritten = True
            for rec in records:
                step = int(rec["step"])
                self.steps.setdefault(step, {})[rank] = rec
                self.last_step[rank] = max(self.last_step.get(rank, 0), step)

    def signature(self) -> tuple:
        """What changes when the run makes progress: bytes read, rank files, config, summary."""
        return (sum(t.offset for t in self.tails.values()), len(self.tails), self.config is not None,
                self.summary is not None)

    def _forget(self, rank: int) -> None:
        for by_rank in self.steps.values():
            by_rank.pop(rank, None)
        self.last_step.pop(rank, None)

    def idle_s(self) -> float | None:
        """Seconds since any rank file was last written (a stalled or hung job shows here)."""
        times = [t.mtime for t in self.tails.values() if t.mtime is not None]
        return max(0.0, time.time() - max(times)) if times else None

    @property
    def bad_lines(self) -> int:
        return sum(t.bad for t in self.tails.values())

    def complete_steps(self) -> list[int]:
        """Logged steps every live rank has written (or that a later step, or the end, closed).

        Logging is collective: no rank writes step s' > s before every live rank has written
        s. So a step is whole once as many ranks logged it as its records say are live, or once
        any rank is past it (a failed rank never writes it), or once the run has ended.
        """
        latest = max(self.last_step.values(), default=0)
        done = []
        for step in sorted(self.steps):
            records = list(self.steps[step].values())
            live = max((finite_number(r.get("live_ranks")) or 0 for r in records), default=0)
            if records and (len(records) >= live or step < latest or self.summary is not None):
                done.append(step)
        return done

    def row(self, step: int) -> dict[str, float | None]:
        """Rank means of the step's records, per :data:`COLUMNS` key."""
        out: dict[str, float | None] = {"step": float(step)}
        for _, _, key, _ in COLUMNS:
            values = [v for r in self.steps[step].values() if (v := finite_number(r.get(key))) is not None]
            if key == "live_ranks":
                out[key] = max(values) if values else None
            else:
                out[key] = sum(values) / len(values) if values else None
        return out

    def total_steps(self) -> int | None:
        """The run's total steps: summary.json's, else config's ``steps``, else its epochs
        times the steps per epoch that the records show (step / epoch)."""
        for source in (self.summary or {}, self.config or {}):
            steps = finite_number(source.get("steps"))
            if steps and steps > 0:
                return int(steps)
        epochs = finite_number((self.config or {}).get("epochs"))
        for step in sorted(self.steps, reverse=True):
            for rec in self.steps[step].values():
                epoch = finite_number(rec.get("epoch"))
                if epochs and epoch:
                    return max(1, round(epochs * round(step / epoch)))
        return None

    def describe(self) -> str:
        """The run as `report` labels it: algorithm, q, tau, drop rate, ranks."""
        config = self.config or {}
        label = config_label(config, [k for k in DEFAULT_LABEL_KEYS if k in config])
        ranks = len(self.tails)
        return ", ".join(p for p in (label, f"{ranks} rank file(s)" if ranks else "") if p)


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # absent, or caught between open and write: the next poll sees it whole
    return value if isinstance(value, dict) else None


def _read_toml(path: Path) -> dict | None:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None


# -- rendering -------------------------------------------------------------------------------
def _fmt(value: float | None, fmt: str, width: int = 10) -> str:
    return "-" if value is None else number_text(value, fmt, width)


def header_line(total: int | None) -> str:
    width = 2 * len(str(total or 99999)) + 1
    cells = [f"{'step':>{width}}", f"{'%':>6}"] + [f"{h:>{w}}" for h, w, _, _ in COLUMNS]
    return "  ".join(cells)


def format_row(row: dict, total: int | None) -> str:
    """One step as a fixed-width line: step/total, percent, then :data:`COLUMNS`."""
    step = int(row["step"])
    digits = len(str(total or 99999))
    where = f"{step}/{total}" if total else str(step)
    percent = f"{100 * step / total:5.1f}%" if total else "-"
    cells = [f"{where:>{2 * digits + 1}}", f"{percent:>6}"]
    cells += [f"{_fmt(row.get(key), fmt, w):>{w}}" for _, w, key, fmt in COLUMNS]
    return "  ".join(cells)


def duration(seconds: float) -> str:
    """0.5s, 42s, 3m07s, 2h05m: as precise as a glance at a running job needs."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def progress_line(f: Follower, rows: list[dict], total: int | None) -> str:
    """Bar, steps, epochs, wall time, estimated time left, and how fresh the last line is."""
    if not rows:
        return "no metrics line yet"
    last = rows[-1]
    step, wall = int(last["step"]), last.get("wall_s")
    parts = []
    if total:
        filled = min(BAR_WIDTH, round(BAR_WIDTH * step / total))
        parts.append("[" + "#" * filled + "-" * (BAR_WIDTH - filled) + "]")
        parts.append(f"{step}/{total} steps ({100 * step / total:.1f}%)")
    else:
        parts.append(f"step {step}")
    config = f.config or {}
    epochs = finite_number(config.get("epochs")) if not config.get("steps") else None  # steps win over epochs
    if last.get("epoch") is not None:
        parts.append(f"epoch {last['epoch']:.2f}" + (f"/{epochs:g}" if epochs else ""))
    if wall is not None:
        parts.append(f"wall {duration(wall)}")
        if total and step and f.summary is None:
            parts.append(f"eta {duration(wall / step * (total - step))}")  # at the mean pace so far
    idle = f.idle_s()
    if idle is not None and f.summary is None:
        parts.append(f"last line {duration(idle)} ago")
    return "  ".join(parts)


def eval_line(rows: list[dict]) -> str:
    """The latest evaluation: on a screen it scrolls out of the table between evaluations."""
    for row in reversed(rows):
        if row.get("avg_test_accuracy") is not None or row.get("test_accuracy") is not None:
            return (
                f"last evaluation: step {row['step']:.0f}, test accuracy "
                f"{_fmt(row.get('avg_test_accuracy'), '{:.4f}')} (averaged model), "
                f"{_fmt(row.get('test_accuracy'), '{:.4f}')} (own models, rank mean)"
            )
    return "last evaluation: none yet (every eval_every epochs, and at the end)"


def ranks_line(f: Follower) -> str:
    """Each rank's latest step; a rank behind the others has stopped (failed) or lags."""
    latest = max(f.last_step.values(), default=0)
    cells = [f"{r}@{s}" + ("" if s == latest else " (behind)") for r, s in sorted(f.last_step.items())]
    return "ranks (rank@latest step): " + (" ".join(cells) if cells else "none yet")


def summary_line(summary: dict) -> str:
    """The end of the run in the words of the `done:` line of `hpcsgd train`."""
    def num(key: str, fmt: str) -> str:
        value = finite_number(summary.get(key))
        return "-" if value is None else fmt.format(value)

    return (
        f"finished: {num('steps', '{:.0f}')} steps, {num('rounds', '{:.0f}')} rounds, "
        f"{num('wall_s', '{:.1f}')}s; averaged model: train loss {num('train_loss', '{:.4f}')} "
        f"(full train set), test accuracy {num('test_accuracy', '{:.4f}')}"
    )


class LineView:
    """Not a terminal: each new row printed once, in step order."""

    def __init__(self, out):
        self.out = out
        self.shown = 0  # the last step printed
        self.started = self.headed = False

    def show(self, f: Follower) -> None:
        total = f.total_steps()
        steps = f.complete_steps()
        if not self.started and (steps or f.config):
            self.started = True
            print(f"following {f.run_dir} ({f.describe()})", file=self.out)
            print(LEGEND, file=self.out)
        if not self.headed and steps:
            # With the first rows: the total steps (and so the width of the step column) may
            # need a record's steps per epoch.
            self.headed = True
            print(header_line(total), file=self.out)
        if f.rewritten:
            # A resume dropped the lines after its checkpoint: print the steps again from there.
            self.shown = min(self.shown, max(f.last_step.values(), default=0))
            print(f"(the run resumed: rank files rewritten after step {self.shown})", file=self.out)
        for step in steps:
            if step > self.shown:
                print(format_row(f.row(step), total), file=self.out)
                self.shown = step
        self.out.flush()

    def finish(self, f: Follower) -> None:
        print(summary_line(f.summary or {}), file=self.out, flush=True)


class ScreenView:
    """A terminal: the screen redrawn, the latest rows that fit under the header."""

    def __init__(self, out, interval: float):
        self.out = out
        self.interval = interval

    def show(self, f: Follower) -> None:
        total = f.total_steps()
        rows = [f.row(s) for s in f.complete_steps()]
        size = shutil.get_terminal_size()
        lines = [
            f"hpcsgd report --follow {f.run_dir}",
            f"{f.describe()}   (refreshed every {self.interval:g}s, Ctrl-C to stop following)",
            progress_line(f, rows, total),
            eval_line(rows),
            "",
            header_line(total),
        ]
        footer = ["", ranks_line(f), *textwrap.wrap(LEGEND, max(40, size.columns - 1))]
        if f.bad_lines:
            footer.append(f"skipped {f.bad_lines} unreadable metrics line(s)")
        room = max(1, size.lines - len(lines) - len(footer) - 1)
        lines += [format_row(r, total) for r in rows[-room:]] + footer
        self.out.write(CLEAR + "\n".join(line[: size.columns] for line in lines) + "\n")
        self.out.flush()

    def finish(self, f: Follower) -> None:
        print(summary_line(f.summary or {}), file=self.out, flush=True)


MAX_INTERVAL = 3600.0  # seconds: time.sleep overflows near 1e308, and a slower refresh shows nothing


def check_follow_times(args: argparse.Namespace) -> None:
    """--interval and --give-up-after: finite seconds in range, named when they are not."""
    interval = args.interval
    if not (math.isfinite(interval) and 0 < interval <= MAX_INTERVAL):
        raise ConfigError(f"--interval must be > 0 and at most {MAX_INTERVAL:g} seconds, got {interval:g}")
    give_up = getattr(args, "give_up_after", None)
    if give_up is not None and not (math.isfinite(give_up) and give_up > 0):
        raise ConfigError(f"--give-up-after must be a finite number of seconds > 0, got {give_up:g}")


def follow(run_dir: Path, interval: float, out=None, tty: bool | None = None, sleep=time.sleep,
           give_up_after: float | None = None, clock=time.monotonic) -> bool | str:
    """Show ``run_dir`` until summary.json appears (True), Ctrl-C (False), or the run ends without
    one (a line saying why: its job is gone, or nothing changed for ``give_up_after`` seconds).

    Args:
        out: the stream written to (default stdout); tty: redraw a screen (default: whether
            ``out`` is a terminal); sleep, clock: waits between polls and the time (tests pass
            their own).
    """
    out = out or sys.stdout
    tty = out.isatty() if tty is None else tty
    view = ScreenView(out, interval) if tty else LineView(out)
    f = Follower(Path(run_dir))
    seen, changed = None, clock()
    try:
        while True:
            f.poll()
            view.show(f)
            if f.summary is not None:
                view.finish(f)
                return True
            if seen != f.signature():
                seen, changed = f.signature(), clock()
            ended = _ended(f, clock() - changed, give_up_after)
            if ended:
                print(f"hpcsgd report: {ended}", file=sys.stderr, flush=True)
                return ended
            sleep(interval)
    except KeyboardInterrupt:
        print(f"\nhpcsgd report: stopped following {run_dir} (the run goes on)", file=sys.stderr)
        return False


def _ended(f: Follower, idle: float, give_up_after: float | None) -> str | None:
    """Why following ``f`` ends without a summary, or None while the run may still go on."""
    where = f"at step {max(f.last_step.values())}" if f.last_step else "before its first metrics line"
    gone = job_gone(f.run_dir)
    if gone is not None:
        f.poll()  # the job may have written summary.json just before it exited
        if f.summary is None:
            return (f"stopped following {f.run_dir}: its job is gone ({gone}) {where}, without summary.json: "
                    f"it crashed or was killed; resume it with --resume")
    if give_up_after is not None and idle >= give_up_after:
        what = "its directory never appeared" if not f.run_dir.exists() else f"nothing changed in it, {where}"
        return f"stopped following {f.run_dir}: {what} for {duration(idle)} (--give-up-after {give_up_after:g})"
    return None


def run_follow(args: argparse.Namespace) -> bool | str:
    """Check the --follow arguments, then :func:`follow`: True when the run has finished, False
    on Ctrl-C, else why it ended without finishing."""
    if len(args.runs) != 1:
        raise ConfigError(f"--follow watches one run directory, got {len(args.runs)}: {' '.join(args.runs)}")
    check_follow_times(args)
    path = Path(args.runs[0])
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run directory {path} is not a directory")
    if not path.exists() and not path.parent.is_dir():
        raise ConfigError(f"run directory {path} does not exist, nor does its parent {path.parent}")
    if not is_run_dir(path) and (inside := find_run_dirs(path)):
        raise ConfigError(
            f"{path} holds {len(inside)} run directories; --follow watches one, e.g. {inside[0]}"
        )
    give_up = getattr(args, "give_up_after", None)
    # A missing or empty directory may be a job that has not started yet (queued, or importing
    # torch): wait for it, and say so, so that a mistyped name does not wait unnoticed.
    if not path.exists() or not is_run_dir(path):
        until = f"up to {give_up:g}s" if give_up else "Ctrl-C to stop, or --give-up-after SECONDS"
        print(f"hpcsgd report: waiting for {path} to get config.toml or metrics/ ({until})",
              file=sys.stderr, flush=True)
    return follow(path, args.interval, give_up_after=give_up)
