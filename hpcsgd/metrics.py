"""Run-directory output: per-rank JSONL metrics and the atomic JSON/text writes.

The run directory is the interface between training and analysis (DESIGN.md): analysis reads
``metrics/rank-K.jsonl``, ``summary.json`` and ``config.toml`` and nothing else.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsync and rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)  # a full disk must not leave the temporary behind
        except OSError:
            pass
        raise


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


class MetricsWriter:
    """Appends one JSON object per logged step to ``RUN_DIR/metrics/rank-K.jsonl``.

    On resume from step k, lines logged after k by the interrupted run are dropped first, so
    the file reads as one uninterrupted trajectory.
    """

    def __init__(self, run_dir: str | Path, rank: int, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics" / f"rank-{rank}.jsonl"
        if resume_step is None:
            self._fh = open(self.path, "w")
        else:
            self._truncate_after(resume_step)
            self._fh = open(self.path, "a")

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
        try:
            self._fh.write(dumps(record) + "\n")
            self._fh.flush()  # a crashed run keeps every line it logged
        except OSError as exc:  # a full disk: one clean message from this rank, not a traceback
            from .errors import TrainingError

            raise TrainingError(f"cannot write metrics to {self.path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        self._fh.close()
