"""What a value must fit besides its own range: C time limits, float32, this machine's memory and cores.

A value that passes its range check can still fail far from where it was given: a learning
rate that overflows the float32 tensor it becomes, a duration ``time.sleep`` cannot take, an
array larger than the machine's memory, more threads than the node has CPUs. Each check here
raises :class:`ConfigError` naming the flag, before anything is allocated or started.

This module imports only the standard library (and hpcsgd.errors): the command line checks
values with it before numpy or torch load.
"""

from __future__ import annotations

import os

from .errors import ConfigError

# Durations (sleeps, timeouts, emulated latencies). time.sleep and threading's waits refuse
# more than about 9.2e9 s (a signed 64-bit count of nanoseconds); 1e9 s (31 years) leaves
# room for the sums a run makes (a deadline is now + latency + transfer).
MAX_SECONDS = 1e9
FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max
FLOAT32_TINY = 1.401298464324817e-45  # the smallest positive float32 (a subnormal)


def physical_memory() -> int | None:
    """Bytes of memory on this node (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def node_cpus() -> int:
    """Logical CPUs of this node (not this process's affinity mask: a launcher may bind a rank to one)."""
    return os.cpu_count() or 1


def human_bytes(n: float) -> str:
    """``n`` bytes as people read them: 7.3 TiB."""
    units, n, i = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"), float(n), 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.1f} {units[i]}"


def check_bytes(what: str, nbytes: int) -> None:
    """Refuse ``what`` when it needs more than this node's memory, before it is allocated."""
    total = physical_memory()
    if total is not None and nbytes > total:
        raise ConfigError(f"{what} needs {human_bytes(nbytes)}, more than this node's {human_bytes(total)} of memory")


def check_seconds(what: str, value: float, unit: str = "seconds", per_second: float = 1.0) -> None:
    """A duration time.sleep and the run's deadlines can take: finite, >= 0, at most MAX_SECONDS.

    ``value`` is in ``unit``, ``per_second`` of them to a second (milliseconds: "ms", 1e3).
    """
    if not 0 <= value <= MAX_SECONDS * per_second:  # False for NaN too
        raise ConfigError(f"{what} must be a duration in 0..{MAX_SECONDS * per_second:g} {unit}, got {value}")


def check_float32(what: str, value: float, nonzero: bool = False) -> None:
    """``value`` becomes a float32 tensor element: it must not overflow (nor, if ``nonzero``, round to 0)."""
    if not abs(value) <= FLOAT32_MAX:
        raise ConfigError(f"{what} must be at most {FLOAT32_MAX:.4g} in magnitude (it becomes a float32), got {value}")
    if nonzero and value != 0 and abs(value) < FLOAT32_TINY:
        raise ConfigError(f"{what} must be at least {FLOAT32_TINY:.4g} in magnitude (smaller rounds to 0 in float32), "
                          f"got {value}")


__all__ = ["FLOAT32_MAX", "FLOAT32_TINY", "MAX_SECONDS", "check_bytes", "check_float32", "check_seconds",
           "human_bytes", "node_cpus", "physical_memory"]
