"""Per-link drop rates and emulated networks for the strategies (``rates=``, ``network=``).

The public builders :func:`link_rates` and :func:`link_network` (``hpcsgd.link_rates``,
``hpcsgd.link_network``), and what a strategy needs to check them and carry them over to a
run of another size.
"""

from __future__ import annotations

import numpy as np

from ..comm import LinkRates
from ..faults.netem import LinkNetwork
from ..errors import ConfigError


def link_rates(world, drop_rate: float = 0.0, drop_rate_phase1: float | None = None,
               drop_rate_phase2: float | None = None, link_drop=(), matrix=None, ranks_per_node: int = 0) -> LinkRates:
    """Drop rates per link, for :class:`~hpcsgd.RPS` and :class:`~hpcsgd.LossyAllreduce` (``rates=``).

    Lowest precedence first: one ``drop_rate``; a rate per phase; a P x P ``matrix``; then the
    ``link_drop`` rules, as the CLI's ``--link-drop``: ``"to:R=x"``, ``"from:R=x"``, ``"S->D=x"``,
    ``"inter-node=x"``, ``"node:A->node:B=x"`` (nodes of ``ranks_per_node`` ranks; 0: as many
    as share rank 0's node). Every rate must be in [0, 1).
    """
    return LinkRates.build(world.size, drop_rate, drop_rate_phase1, drop_rate_phase2, tuple(link_drop), matrix,
                           _nodes(world, link_drop, ranks_per_node))


def link_network(world, latency_ms: float = 0.0, gbps: float = 0.0, latency_rules=(), bandwidth_rules=(),
                 ranks_per_node: int = 0):
    """An emulated network for any strategy (``network=``); None when nothing is emulated.

    ``latency_ms`` per message and ``gbps`` (gigabits/s; 0 = unlimited) on every link, then
    per-link rules as the CLI's ``--link-latency`` / ``--link-bandwidth``: ``"to:R=x"``,
    ``"from:R=x"``, ``"S->D=x"``, ``"inter-node=x"``, ``"node:A->node:B=x"`` (milliseconds,
    Gb/s; nodes as in :func:`link_rates`). See ALGORITHMS.md, "Network emulation".
    """
    nodes = _nodes(world, [*latency_rules, *bandwidth_rules], ranks_per_node)
    return LinkNetwork.build(world.size, latency_ms, gbps, tuple(latency_rules), tuple(bandwidth_rules), nodes)


def _nodes(world, rules, ranks_per_node: int) -> list[int] | None:
    """Each rank's node for rules that name nodes (None when no rule does: nothing to agree on)."""
    if not any("node" in str(rule) for rule in rules):
        return None
    if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, (int, np.integer)) or ranks_per_node < 0:
        raise ConfigError(f"ranks_per_node must be an integer >= 0 (0: from the node), got {ranks_per_node!r}")
    R = int(ranks_per_node) or world.comm.bcast(world.local_size, root=0)
    return [r // R for r in range(world.size)]


def check_rates(world, drop_rate, rates) -> LinkRates:
    """``rates`` if it came from :func:`link_rates`, else the uniform ``drop_rate`` on every link."""
    if rates is not None:
        if not isinstance(rates, LinkRates):
            raise ConfigError(f"rates must come from hpcsgd.link_rates(), got {type(rates).__name__}")
        return rates
    return link_rates(world, drop_rate)


def resized_rates(rates: LinkRates, drop_rate: float | None, size: int) -> LinkRates:
    """``rates`` for a run of ``size`` ranks: rebuilt from ``drop_rate`` when the strategy was
    given one number, else the same uniform per-phase rates (per-link rates: refused)."""
    if rates.phase1.shape[0] == size:
        return rates
    if drop_rate is not None:
        return LinkRates.build(size, drop_rate)
    mats = []
    for phase in (1, 2):
        m = rates.for_phase(phase)
        off = m[~np.eye(len(m), dtype=bool)]
        if off.size and not np.all(off == off[0]):
            raise ConfigError("per-link drop rates (link_rates with rules or a matrix) are built for "
                              f"{len(m)} ranks and cannot be carried over to a run of {size}; "
                              "resume on as many ranks as the run had")
        full = np.full((size, size), float(off[0]) if off.size else 0.0)
        np.fill_diagonal(full, 0.0)
        mats.append(full)
    return LinkRates(mats[0], mats[1])


class LossyLinks:
    """What the strategies over lossy links (RPS, LossyAllreduce) share: per-link drop rates
    indexed by run rank, the seed of their masks, and carrying both over to a run of another P."""

    def take_links(self, world, drop_rate, rates, seed) -> None:
        """Check and keep ``rates`` (or the uniform ``drop_rate``) and ``seed``; before the base's constructor."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
        self.seed = int(seed)
        self._drop_rate = drop_rate if rates is None else None  # one number: rebuilt for another P
        self.rates = check_rates(world, drop_rate, rates)

    def resize_options(self, world) -> None:
        self.rates = resized_rates(self.rates, self._drop_rate, world.size)

    @property
    def exchange_path(self) -> str:
        """The block exchange's path: ``allreduce`` (lossless), ``shared-memory`` or ``alltoallv``."""
        return self.exchange.path


__all__ = ["LossyLinks", "check_rates", "link_network", "link_rates", "resized_rates"]
