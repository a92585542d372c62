"""Run-directory output: per-rank JSONL metrics, config.toml's TOML, and the atomic writes.

The run directory is the interface between training and analysis (DESIGN.md): analysis reads
``metrics/rank-K.jsonl``, ``summary.json`` and ``config.toml`` and nothing else. A write that
fails (a full disk, a read-only folder) raises OSError and leaves no temporary file;
:func:`cannot_write` says why in one line, with the space the write needed.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsync and rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename.

    A write that cannot fit (less free space than ``data``) fails before the temporary file
    is made, as ENOSPC; a write that fails half-way removes its temporary file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    free = free_bytes(path.parent)
    if free is not None and free < len(data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)  # a full disk must not leave the temporary behind
        except OSError:
            pass
        raise


def free_bytes(directory: str | Path) -> int | None:
    """Bytes this user may still write in ``directory`` (None where that cannot be told)."""
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def size_text(n: float) -> str:
    """A byte count as people read it: 812 B, 3.4 KiB, 1.2 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def cannot_write(path: str | Path, exc: BaseException, needed: int | None = None) -> str:
    """One line: which file could not be written, why, and the space it needed beside what is free.

    h5py's and Python's messages carry a long trace or the temporary name; the errno says it
    in three words.
    """
    path = Path(path)
    code = getattr(exc, "errno", None)
    reason = os.strerror(code) if code else (getattr(exc, "strerror", None) or str(exc))
    free = free_bytes(path.parent if path.parent.exists() else Path.cwd())
    space = [f"needs {size_text(needed)}"] if needed is not None else []
    if free is not None:
        space.append(f"{size_text(free)} free there")
    return f"cannot write {path}: {reason}" + (f" ({', '.join(space)})" if space else "")


def _clean(value):
    """JSON has no NaN/Inf: write them as null so every line parses everywhere."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def dumps(record: dict) -> str:
    return json.dumps(_clean(record), sort_keys=False, allow_nan=False)


def toml_text(config: dict, comment: str) -> str:
    """``config`` as a TOML file (``key = value`` lines after ``# comment``); None values are left out.

    The one TOML writer: ``hpcsgd train``'s resolved config, :class:`~hpcsgd.RunLog`'s
    config.toml and the bench's demo config; ``tomllib`` reads each back to the same values.
    """
    lines = [f"# {comment}"] + [f"{key} = {toml_value(v)}" for key, v in config.items() if v is not None]
    return "\n".join(lines) + "\n"


def toml_value(value) -> str:
    """One TOML value: booleans, numbers, strings, lists of them; anything else as its string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    # A JSON string is a TOML basic string, except that JSON writes characters beyond the
    # BMP as surrogate escapes (TOML refuses them) and leaves DEL raw (TOML wants it escaped).
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


class MetricsWriter:
    """Appends one JSON object per logged step to ``RUN_DIR/metrics/rank-K.jsonl``.

    On resume from step k, lines logged after k by the interrupted run are dropped first, so
    the file reads as one uninterrupted trajectory. Each line goes to the file in one
    unbuffered write, so a crashed run keeps every line it logged, and a write that fails (a
    full disk) is cut back to the last whole line before it is reported.
    """

    def __init__(self, run_dir: str | Path, rank: int, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics" / f"rank-{rank}.jsonl"
        self._fd: int | None = None
        self._open(resume_step)

    def restart(self, step: int) -> None:
        """Continue after ``step`` (the step survivors redo after a repair): later lines go, as on resume."""
        self.close()
        self._open(step)

    def _open(self, resume_step: int | None) -> None:
        try:
            if resume_step is not None:
                self._truncate_after(resume_step)
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if resume_step is None else 0)
            self._fd = os.open(self.path, flags, 0o644)
        except OSError as exc:  # a full disk or a read-only run directory: one clean message
            from .errors import TrainingError

            raise TrainingError(cannot_write(self.path, exc)) from None

    def _truncate_after(self, step: int) -> None:
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break  # a torn last line from a crash
                if record.get("step", 0) <= step:
                    kept.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def write(self, record: dict) -> None:
        """Append one line; a failed write raises TrainingError naming the file and the space needed.

        ``hpcsgd train`` agrees on it over the live ranks (``comm.agree``), so that every rank
        ends with the same message.
        """
        data = (dumps(record) + "\n").encode()
        end = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            from .errors import TrainingError

            try:
                os.ftruncate(self._fd, end)  # no torn line: the file ends with the last whole record
            except OSError:
                pass
            raise TrainingError(cannot_write(self.path, exc, len(data))) from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
