"""Timing helpers of the bench: interleaved medians, result rows, their table and JSON."""

from __future__ import annotations

import json
import statistics
import time
from typing import Callable


def time_interleaved(comm, fns: dict[str, Callable[[], object]], reps: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each fn, interleaved, each round the slowest rank's time."""
    from mpi4py import MPI

    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + reps):
        for name, fn in fns.items():
            comm.Barrier()
            t0 = time.perf_counter()
            fn()
            elapsed = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
            if i >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}


def row(key: str, name: str, seconds: float, ratio: float | None, target: float | None, higher_is_better: bool = False,
         **extra) -> dict:
    """One result; ``key`` is stable across runs and versions (``name`` is for people and may change)."""
    return {"key": key, "name": name, "seconds": seconds, "ratio": ratio, "target": target,
            "higher_is_better": higher_is_better, **extra}


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'measurement':<72} {'median ms':>10} {'ratio':>8} {'target':>8}  met"]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        if r["target"] is None:
            target, ok = "", ""
        else:
            target = (">=" if r["higher_is_better"] else "<=") + f"{r['target']:g}"
            ok = "" if r["ratio"] is None else (
                "yes" if (r["ratio"] >= r["target"] if r["higher_is_better"] else r["ratio"] <= r["target"]) else "NO")
        seconds = r["seconds"]
        ms = f"{seconds * 1e3:.2f}" if seconds == seconds and r["name"].find("resident") < 0 else f"{seconds:.1f}MB"
        lines.append(f"{r['name']:<72} {ms:>10} {ratio:>8} {target:>8}  {ok}")
    return "\n".join(lines)


def write_json(path, rows) -> None:
    if path:
        with open(path, "w") as fh:
            json.dump(rows, fh, indent=1)
