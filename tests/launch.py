"""Run hpcsgd commands as a user would: subprocesses under mpiexec, with a deadline."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def hpcsgd(*args: str, timeout: float = 120) -> Result:
    """``python -m hpcsgd ARGS`` on one process."""
    return _run([sys.executable, "-m", "hpcsgd", *map(str, args)], timeout)


def mpi(n: int, *args: str, timeout: float = 120) -> Result:
    """``mpiexec -n N python -m mpi4py -m hpcsgd ARGS``, the documented launch line."""
    mpiexec = BIN / "mpiexec"
    cmd = [str(mpiexec), "-n", str(n), sys.executable, "-m", "mpi4py", "-m", "hpcsgd", *map(str, args)]
    return _run(cmd, timeout)


def _run(cmd: list[str], timeout: float) -> Result:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=ROOT)
    return Result(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start)
