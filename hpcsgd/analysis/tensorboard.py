"""``hpcsgd report RUN... --tensorboard DIR``: run directories as TensorBoard event files.

One subdirectory of DIR per run (named as the run directory; ``-2``, ``-3`` when two runs
share a name), so TensorBoard lists each run by name and overlays them. Every numeric key the
ranks logged becomes a scalar over steps, the mean over the ranks that logged the step (as the
report's curves); the numeric keys of ``summary.json`` go under ``summary/`` at the run's last
step. The files are written by ``torch.utils.tensorboard.SummaryWriter``, which needs the
``tensorboard`` package (the optional extra ``hpcsgd[tensorboard]``).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .runs import Run

_NOT_METRICS = {"step"}  # the x axis itself


def _writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises ImportError naming tensorboard when it is missing
        raise ConfigError("--tensorboard needs the tensorboard package: pip install 'hpcsgd[tensorboard]' "
                          "(or pip install tensorboard)") from None
    return SummaryWriter


def metric_keys(run: Run) -> list[str]:
    """Every key some rank logged a number for, sorted."""
    keys = set()
    for records in run.records.values():
        for record in records:
            keys.update(k for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    return sorted(keys - _NOT_METRICS)


def _directory_names(runs: list[Run]) -> list[str]:
    names: list[str] = []
    for run in runs:
        name, n = run.name, 1
        while name in names:
            n += 1
            name = f"{run.name}-{n}"
        names.append(name)
    return names


def export(runs: list[Run], out: str | Path) -> list[Path]:
    """Write each run's scalars under ``out/NAME``; returns the directories written."""
    SummaryWriter = _writer_class()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--tensorboard {out} exists and is not a directory")
    written = []
    for run, name in zip(runs, _directory_names(runs)):
        directory = out / name
        writer = SummaryWriter(log_dir=str(directory))
        try:
            last = 0
            for key in metric_keys(run):
                steps, _, values = run.series(key, x="step")
                for step, value in zip(steps, values):
                    writer.add_scalar(key, float(value), int(step))
                    last = max(last, int(step))
            summary = run.summary or {}
            end = int(summary.get("steps") or last)
            for key, value in sorted(summary.items()):
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(f"summary/{key}", float(value), end)
        finally:
            writer.close()
        written.append(directory)
    return written


__all__ = ["export", "metric_keys"]
