"""Timing helpers of the bench: interleaved medians over ranks, paired ratios, result rows and their output."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

DEFAULT_PARAMS = 5_800_000  # flat model size of the exchange rows (a ResNet-18-like size)

class Medians(dict):
    """Median seconds per name; ``link_bytes``: median bytes per call that crossed the nodes'
    links, summed over nodes (empty unless :func:`count_link_bytes` is on)."""

    link_bytes: dict[str, float]


_LINKS = None  # a links.NodeLayout whose counters time_interleaved reads, or None


def count_link_bytes(placement) -> None:
    """Make :func:`time_interleaved` count each call's bytes over the links (``None``: stop).

    Only where the job spans nodes and the counters are readable; the reads and their sum
    over nodes happen outside the timed part of each call.
    """
    global _LINKS
    _LINKS = placement if placement is not None and placement.counts_bytes else None


def link_fields(m: Medians, name: str, per: int = 1, ref: str | None = None) -> dict:
    """A row's ``link_bytes`` (bytes over the links per call of ``name``, divided by ``per``
    calls' worth of rounds) and ``link_bytes_ref`` (the same for the row's reference side
    ``ref``), when they were counted."""
    out = {}
    if name in getattr(m, "link_bytes", {}):
        out["link_bytes"] = m.link_bytes[name] / per
    if ref is not None and ref in getattr(m, "link_bytes", {}):
        out["link_bytes_ref"] = m.link_bytes[ref] / per
    return out


def time_interleaved(comm, fns: dict[str, Callable[[], object]], reps: int, warmup: int) -> Medians:
    """Median seconds per call of each fn, interleaved, each round the slowest rank's time."""
    from mpi4py import MPI

    times: dict[str, list[float]] = {name: [] for name in fns}
    sent: dict[str, list[int]] = {name: [] for name in fns}
    links = _LINKS
    for i in range(warmup + reps):
        for name, fn in fns.items():
            comm.Barrier()
            before = links.sent() if links else 0
            t0 = time.perf_counter()
            fn()
            elapsed = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
            if links:
                nbytes = links.total(links.sent() - before)
            if i >= warmup:
                times[name].append(elapsed)
                if links:
                    sent[name].append(nbytes)
    out = Medians({name: statistics.median(ts) for name, ts in times.items()})
    out.link_bytes = {name: float(statistics.median(b)) for name, b in sent.items() if b}
    return out


def ratio_paired(comm, a: Callable[[], object], b: Callable[[], object], reps: int, warmup: int) -> tuple[float, float]:
    """(median seconds of ``a``, median of the per-round ratios a/b), timed as above.

    Each round times ``a`` and ``b`` back to back, in alternating order, and takes their
    ratio: a difference far below the machine's noise (a watchdog's two attribute writes)
    shows in the median of paired ratios long before it shows in a ratio of two medians.
    """
    from mpi4py import MPI

    ratios, times = [], []
    for i in range(warmup + reps):
        pair = {}
        for name, fn in ((("a", a), ("b", b)) if i % 2 == 0 else (("b", b), ("a", a))):
            comm.Barrier()
            t0 = time.perf_counter()
            fn()
            pair[name] = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
        if i >= warmup:
            ratios.append(pair["a"] / pair["b"])
            times.append(pair["a"])
    return statistics.median(times), statistics.median(ratios)


def row(name: str, seconds: float, ratio: float | None, target: float | None, higher_is_better: bool = False, *,
         key: str, **extra) -> dict:
    """One result; ``key`` is stable across runs and versions (``name`` is for people and may change)."""
    return {"key": key, "name": name, "seconds": seconds, "ratio": ratio, "target": target,
            "higher_is_better": higher_is_better, **extra}


def flat_mlp(params: int):
    import torch

    from ..comm import FlatParams
    from ..train.models import build_model, mlp_hidden_for_params

    torch.manual_seed(0)
    model = build_model("mlp", (3072,), 10, mlp_hidden_for_params(3072, 10, params))
    return model, FlatParams(model)



def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")



def node_cores(comm) -> int:
    """Cores the ranks of this node share (for the oversubscription factor of the model)."""
    from ..comm.device import local_rank_and_size

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = local_rank_and_size(comm)[1]
    # Under mpiexec each rank may be bound to one core: count the node's cores, not the mask.
    return max(cores, os.cpu_count() or 1) if local > 1 else cores


def format_rows(rows: list[dict]) -> str:
    """The rows as the table ``hpcsgd bench`` prints."""
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
        links = f"  {r['link_bytes'] / 1e6:.1f} MB over the links" if "link_bytes" in r else ""
        lines.append(f"{r['name']:<72} {ms:>10} {ratio:>8} {target:>8}  {ok}{links}".rstrip())
    return "\n".join(lines)


def check_writable(flag: str, path: Path) -> None:
    """``path`` can be written: checked when the bench starts, not after minutes of measuring."""
    from ..errors import ConfigError

    parent = path.parent
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory: give a file name")
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"{flag} {path}: not writable (permission denied)")


def write_json(path, rows) -> None:
    """The rows as JSON to ``path`` (nothing when None)."""
    from ..errors import ConfigError

    if path:
        try:
            with open(path, "w") as fh:
                json.dump(rows, fh, indent=1)
        except OSError as exc:
            raise ConfigError(f"--json {path}: cannot write it: {exc.strerror or exc}") from None


__all__ = ["DEFAULT_PARAMS", "Medians", "check_writable", "count_link_bytes", "flat_mlp", "format_rows", "link_fields", "node_cores", "ratio_paired", "row", "rss_mb", "time_interleaved", "write_json"]
