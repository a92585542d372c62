"""Network emulation, the loss layer's second half: per-link latency and bandwidth.

ALGORITHMS.md, "Network emulation": a message of ``n`` bytes that its *sender* starts at
``t_s`` completes no earlier than ``t_s + queue + lat + n / bw``, on a clock the ranks agree
on; each rank has one port, so its outgoing messages queue behind each other. An Allreduce
of ``n`` bytes over ``L`` ranks is charged as a ring, ``2 (L-1) lat + 2 (L-1)/L * n / bw``,
from the moment its last participant started (and got its port). So a late sender delays
its receivers by its lateness plus the transfer. The ranks exchange their start times with
each round (a one-number Allreduce, or an Allgather per exchange phase) and the comm layer
enforces the result where a request is waited on: after the real wait it holds until the
emulated completion time, so a round that runs nonblocking behind computation hides its
emulated time exactly as it would hide a slow network's.

Only the algorithm's traffic is emulated (averaging rounds, the block exchange, sync's
gradient buckets); diagnostics (metrics, evaluation, agreements) run at the real speed.
Off (the default) the comm layer holds no emulator at all: nothing is timed or compared.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .lossy import apply_link_rules


@dataclass(frozen=True)
class LinkNetwork:
    """Per-link latency (seconds) and bandwidth (bytes/s, ``inf`` = unlimited), world-rank indexed."""

    latency: np.ndarray
    bandwidth: np.ndarray

    @classmethod
    def build(cls, size: int, latency_ms: float = 0.0, gbps: float = 0.0,
              latency_rules: tuple[str, ...] | list[str] = (),
              bandwidth_rules: tuple[str, ...] | list[str] = (), nodes: list[int] | None = None) -> "LinkNetwork | None":
        """The network of a config, or None when nothing is emulated.

        ``latency_ms`` and ``gbps`` (gigabits per second; 0 = unlimited) apply to every link;
        rules ``"to:R=x"``, ``"from:R=x"``, ``"S->D=x"`` (as ``link_drop``'s) override links,
        in milliseconds for latency and Gb/s for bandwidth; ``"inter-node=x"`` and
        ``"node:A->node:B=x"`` set the links between nodes (``nodes[r]``: rank r's node).
        """
        _check("link_latency_ms", latency_ms)
        _check("link_gbps", gbps)
        latency = np.full((size, size), float(latency_ms))
        rate = np.full((size, size), float(gbps))
        apply_link_rules([latency], latency_rules, size, "link_latency", _check, nodes)
        apply_link_rules([rate], bandwidth_rules, size, "link_bandwidth", _check, nodes)
        if not (latency.any() or rate.any()):
            return None
        bandwidth = np.where(rate > 0, rate * 1e9 / 8, np.inf)  # Gb/s -> bytes/s
        return cls(latency / 1e3, bandwidth)

    def message_seconds(self, src: int, dst: int, nbytes: int) -> tuple[float, float]:
        """(latency, transfer time) of one message on link ``src -> dst``."""
        return float(self.latency[src, dst]), nbytes / float(self.bandwidth[src, dst])

    def ring_seconds(self, ranks, nbytes: int) -> tuple[float, float]:
        """(latency, transfer time) of an Allreduce of ``nbytes`` over ``ranks`` as a ring.

        With per-link values a ring moves at its slowest link's pace.
        """
        ranks = list(ranks)
        L = len(ranks)
        if L < 2:
            return 0.0, 0.0
        links = [(ranks[k], ranks[(k + 1) % L]) for k in range(L)]
        lat = max(float(self.latency[s, d]) for s, d in links)
        bw = min(float(self.bandwidth[s, d]) for s, d in links)
        return 2 * (L - 1) * lat, 2 * (L - 1) / L * nbytes / bw


class NetworkClock:
    """This rank's port on the emulated network: when transfers complete, and holding until they have.

    Times are on the clock the ranks agree on (:meth:`now`: ``time.perf_counter`` plus the
    offset :func:`agreed_offset` found at construction), so a deadline built from another
    rank's start means the same instant on every rank. ``port_free`` is when this rank's one
    port has pushed out everything queued on it so far.

    ``held_seconds`` counts only what the training thread (the thread that built the clock)
    waited for the emulated network: its own holds, and, through :meth:`charge_wait`, the part
    of its waits for a worker thread's round that fell on that thread's holds. A worker's hold
    behind computation is hidden network time and is not counted.
    """

    def __init__(self, network: LinkNetwork, offset: float = 0.0):
        self.network = network
        self.offset = offset
        self.port_free = 0.0  # agreed-clock time this rank's port is free again
        self.emulated_seconds = 0.0  # modelled network time of this rank's transfers
        self.held_seconds = 0.0  # time the training thread spent holding (emulated time not hidden)
        self._owner = threading.get_ident()
        self._lock = threading.Lock()
        self._worker_holds: list[tuple[float, float]] = []  # (from, until) of other threads' holds

    def now(self) -> float:
        """Seconds on the agreed clock."""
        return time.perf_counter() + self.offset

    def ready(self, t0: float) -> float:
        """When a transfer this rank starts at ``t0`` gets its port: after what is queued on it."""
        return max(t0, self.port_free)

    def deadline(self, start: float, latency: float, transfer: float) -> float:
        """Completion of a collective whose last participant got its port at ``start`` (a ring:
        every participant's port carries ``transfer`` seconds of it)."""
        self.port_free = max(self.port_free, start + transfer)
        self.emulated_seconds += latency + transfer
        return start + transfer + latency

    def phase_deadline(self, ready: float, send_seconds: float, incoming) -> float:
        """Completion of one phase of point-to-point messages on this rank.

        ``ready``: when this rank's port is free for the phase; ``send_seconds``: its sends,
        queued on it; ``incoming``: ``(sender ready, delay)`` of each message it receives,
        ``delay`` = the sender's queue before it + its transfer + the link's latency. A
        message completes no earlier than its sender's start plus its delay.
        """
        delays = [delay for _, delay in incoming]
        self.port_free = max(self.port_free, ready + send_seconds)
        self.emulated_seconds += max([send_seconds] + delays)
        return max([ready + send_seconds] + [start + delay for start, delay in incoming])

    def hold(self, deadline: float) -> None:
        """Return no earlier than ``deadline`` (agreed clock)."""
        begin = self.now()
        remaining = deadline - begin
        if remaining <= 0:
            return
        time.sleep(remaining)
        if threading.get_ident() == self._owner:
            self.held_seconds += remaining
        else:
            with self._lock:
                self._worker_holds.append((begin, deadline))

    def charge_wait(self, begin: float, end: float) -> None:
        """The training thread waited for a worker thread over ``[begin, end]`` (agreed clock):
        count the part of it that the worker spent holding for the emulated network."""
        with self._lock:
            holds, self._worker_holds = self._worker_holds, [h for h in self._worker_holds if h[1] > end]
        self.held_seconds += sum(max(0.0, min(end, until) - max(begin, since)) for since, until in holds)

    def done(self, deadline: float) -> bool:
        return self.now() >= deadline


def agreed_offset(comm) -> float:
    """Collective: seconds to add to this rank's ``time.perf_counter`` to read rank 0's.

    Ranks under one kernel (one node, or network namespaces of one host) share
    CLOCK_MONOTONIC, which ``perf_counter`` reads: 0. Otherwise the best of a few round
    trips to rank 0 (Cristian's method): error at most half the shortest round trip.
    """
    boot = _boot_id()
    if boot and all(other == boot for other in comm.allgather(boot)):
        return 0.0
    offset = 0.0
    ping = comm.Dup()
    try:
        for r in range(1, ping.size):
            if ping.rank == 0:
                for _ in range(_ROUND_TRIPS):
                    ping.recv(source=r)
                    ping.send(time.perf_counter(), dest=r)
            elif ping.rank == r:
                best = float("inf")
                for _ in range(_ROUND_TRIPS):
                    sent = time.perf_counter()
                    ping.send(None, dest=0)
                    theirs = ping.recv(source=0)
                    back = time.perf_counter()
                    if back - sent < best:
                        best, offset = back - sent, theirs - (sent + back) / 2
    finally:
        ping.Free()
    return offset


_ROUND_TRIPS = 8


def _boot_id() -> str:
    """This kernel's boot id ("" where unknown): equal ids share one monotonic clock."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _check(name: str, value: float) -> None:
    if not (value >= 0 and np.isfinite(value)):
        raise ConfigError(f"{name} must be a finite number >= 0 (0: not emulated), got {value}")


__all__ = ["LinkNetwork", "NetworkClock", "agreed_offset"]
