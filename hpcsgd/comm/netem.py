"""Network emulation, the loss layer's second half: per-link latency and bandwidth.

ALGORITHMS.md, "Network emulation": a message of ``n`` bytes started at ``t0`` on link
``i -> j`` completes no earlier than ``t0 + lat + n / bw``; an Allreduce of ``n`` bytes over
``L`` ranks is charged as a ring, ``2 (L-1) lat + 2 (L-1)/L * n / bw``. The comm layer
enforces it where a request is waited on: after the real wait it holds until the emulated
completion time, so a round that runs nonblocking behind computation hides its emulated
time exactly as it would hide a slow network's. A rank's link is one resource: transfers
started while an earlier one still occupies it queue behind it (sync's buckets share it).

Only the algorithm's traffic is emulated (averaging rounds, the block exchange, sync's
gradient buckets); diagnostics (metrics, evaluation, agreements) run at the real speed.
Off (the default) the comm layer holds no emulator at all: nothing is timed or compared.
"""

from __future__ import annotations

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
    """This rank's emulated link: when transfers complete, and holding until they have."""

    def __init__(self, network: LinkNetwork):
        self.network = network
        self._link_free_at = 0.0  # the link carries one transfer at a time
        self.emulated_seconds = 0.0  # modelled network time of this rank's transfers
        self.held_seconds = 0.0  # time spent holding (emulated time not hidden behind anything)

    def deadline(self, t0: float, latency: float, transfer: float) -> float:
        """Completion time of a transfer started at ``t0`` (queued behind the link's last one)."""
        start = max(t0, self._link_free_at)
        self._link_free_at = start + transfer
        self.emulated_seconds += latency + transfer
        return start + transfer + latency

    def hold(self, deadline: float) -> None:
        """Return no earlier than ``deadline`` (``time.perf_counter`` seconds)."""
        remaining = deadline - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
            self.held_seconds += remaining

    @staticmethod
    def done(deadline: float) -> bool:
        return time.perf_counter() >= deadline


def _check(name: str, value: float) -> None:
    if not (value >= 0 and np.isfinite(value)):
        raise ConfigError(f"{name} must be a finite number >= 0 (0: not emulated), got {value}")


__all__ = ["LinkNetwork", "NetworkClock"]
