"""Where a rank's redundant chunks come from: cyclic or spread over nodes (ALGORITHMS.md,
"Topology-aware placement and node-scoped links").

A node is ``R`` consecutive ranks (block rank placement, what mpiexec and srun do by default):
rank ``i`` is on node ``i // R``. Cyclic placement gives rank ``i`` chunks ``(i + k) mod P``,
whose copies then sit on the same node when ``q <= R``, so one lost node can take every copy
of a chunk. Spread gives ``(i + k*R) mod P``: with ``q*R <= P`` the ``q`` holders of a chunk
are ``R`` ranks apart, hence on ``q`` different nodes. Pure functions of ``(P, q, R, rank)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

from hpcsgd.config import PLACEMENTS
from hpcsgd.errors import ConfigError


def node_of(rank: int, ranks_per_node: int) -> int:
    """The node of ``rank`` under block placement of ``ranks_per_node`` ranks per node."""
    return int(rank) // int(ranks_per_node)


def node_ranks(node: int, ranks_per_node: int, P: int) -> list[int]:
    """The ranks of ``node`` (the last node of ``P`` ranks may hold fewer than ``R``)."""
    R = int(ranks_per_node)
    return list(range(node * R, min((node + 1) * R, P)))


def node_count(P: int, ranks_per_node: int) -> int:
    """How many nodes ``P`` ranks fill, ``R`` per node (the last one possibly partly)."""
    return -(-int(P) // int(ranks_per_node))


@dataclass(frozen=True)
class Placement:
    """How the ``q`` chunks of a rank are chosen: ``kind`` (cyclic | spread) and ``R`` ranks per node."""

    kind: str = "cyclic"
    ranks_per_node: int = 1

    def __post_init__(self):
        if self.kind not in PLACEMENTS:
            raise ConfigError(f"placement must be one of {', '.join(PLACEMENTS)}, got {self.kind!r}")
        R = self.ranks_per_node
        if isinstance(R, bool) or not isinstance(R, Integral) or R < 1:
            raise ConfigError(f"ranks_per_node must be an integer >= 1, got {R!r}")

    def check(self, P: int, q: int) -> None:
        """Refuse a spread placement whose copies cannot sit on ``q`` different nodes."""
        if self.kind == "spread" and q * self.ranks_per_node > P:
            raise ConfigError(
                f"placement 'spread' puts the q={q} copies of a chunk on q different nodes, which needs "
                f"q <= P/R = {P}/{self.ranks_per_node} (P={P} ranks, R={self.ranks_per_node} ranks per node, "
                f"{node_count(P, self.ranks_per_node)} node(s)): lower q, use placement 'cyclic', or set ranks_per_node "
                f"(nodes of R ranks simulated on one machine)"
            )

    def chunks(self, P: int, q: int, rank: int) -> tuple[int, ...]:
        """The chunks ``rank`` holds, its own first: ``(rank + k*step) mod P`` for ``k = 0..q-1``."""
        self.check(P, q)
        step = self.ranks_per_node if self.kind == "spread" else 1
        return tuple((int(rank) + k * step) % int(P) for k in range(int(q)))

    def describe(self) -> str:
        """For messages and the report: ``cyclic`` or ``spread (R=2)``."""
        return self.kind if self.kind == "cyclic" else f"{self.kind} (R={self.ranks_per_node})"


CYCLIC = Placement()


def placement_chunks(P: int, q: int, R: int, rank: int, kind: str = "spread") -> tuple[int, ...]:
    """The chunks of ``rank`` under ``kind`` placement with ``R`` ranks per node (pure)."""
    return Placement(kind, R).chunks(P, q, rank)


__all__ = ["CYCLIC", "PLACEMENTS", "Placement", "node_count", "node_of", "node_ranks", "placement_chunks"]
