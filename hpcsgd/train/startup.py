"""Start-up phase timers: where a rank's seconds go between launch and its first step.

The command line marks the end of each phase (config read, MPI up, the run's collective
checks, torch and hpcsgd imported); training marks the end of its setup and rank 0 prints
one line with them all, so a slow start says what was slow. Standard library only: it is
imported first.
"""

from __future__ import annotations

import time

_START = time.perf_counter()
_marks: list[tuple[str, float]] = []


def mark(phase: str) -> None:
    """The phase that just ended."""
    _marks.append((phase, time.perf_counter()))


def line() -> str:
    """``ready after 6.1s: config 0.2s, MPI 0.3s, checks 0.1s, imports 3.9s, setup 1.6s`` (marks so far)."""
    parts, last = [], _START
    for phase, t in _marks:
        parts.append(f"{phase} {t - last:.1f}s")
        last = t
    total = (_marks[-1][1] if _marks else time.perf_counter()) - _START
    return f"ready after {total:.1f}s" + (": " + ", ".join(parts) if parts else "")
