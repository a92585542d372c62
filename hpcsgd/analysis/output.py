"""Writing the report's files: each one whole or not at all.

A file goes to a temporary name and is renamed into place, so a full disk or a read-only
``--out`` leaves neither a torn file nor a temporary; the failure is one line (exit 2) naming
``--out``, the file, the reason and the space the file needed.
"""

from __future__ import annotations

import io
from pathlib import Path

from ..errors import ConfigError
from ..metrics import atomic_write_bytes, cannot_write


def make_dir(path: Path) -> None:
    """Create the report directory (and its parents)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {path}: cannot create it: {exc.strerror or exc}") from None


def write_file(path: Path, data: bytes | str) -> None:
    """``data`` (text is written as UTF-8) to ``path``, atomically."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise ConfigError(f"--out: {cannot_write(path, exc, len(data))}") from None


def save_figure(fig, path: Path) -> Path:
    """A matplotlib figure as a PNG at ``path``: rendered in memory, then written as one file."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    write_file(path, buffer.getvalue())
    return path


__all__ = ["make_dir", "save_figure", "write_file"]
