"""A really full filesystem for tests: a small tmpfs (root only) and a file that fills it."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(directory: Path, size: str = "2m", options: str = ""):
    """Mount a tmpfs of ``size`` on ``directory`` for the block; skipped where mount is not allowed."""
    directory.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (f",{options}" if options else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(directory)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root only): {done.stderr.strip() or done.returncode}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def resize(directory: Path, size: str) -> None:
    """Grow (or shrink) the tmpfs on ``directory``: the space an operator frees."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(directory)], check=True, capture_output=True)


def fill(directory: Path, leave: int = 0) -> Path:
    """A file that fills ``directory``'s filesystem up to ``leave`` free bytes (delete it to free them)."""
    filler = directory / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
                if free <= leave:
                    break
                fh.write(b"\0" * min(65536, free - leave))
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def leftovers(root: Path) -> list[str]:
    """Temporary files a failed write left behind (none may be)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp" in p.name or p.name.startswith(".rank-"))
