"""The ``allreduce`` option of the averaging strategies (local SGD, sync SGD): which Allreduce sums their rounds.

``"library"`` (default) is the MPI library's Allreduce; ``"node-aware"`` reduces inside each
node, across nodes and broadcasts inside each node (hpcsgd/comm/nodes.py); ``"nonblocking"``
is the library's Iallreduce, waited for (across nodes MPICH's blocking call runs its per-node
stages one after the other). They may add in different orders, so they may differ by
rounding; each is deterministic.
"""

from __future__ import annotations

from ..comm.nodes import ALLREDUCE
from ..errors import ConfigError
from .base import check_int


class AllreduceOption:
    """Keeps ``allreduce`` and ``ranks_per_node`` and hands them to every comm layer the strategy runs on."""

    allreduce = "library"
    ranks_per_node = 0

    def take_allreduce(self, allreduce: str, ranks_per_node: int) -> None:
        """Check and keep the option; before the base's constructor (it refuses bad values by name)."""
        if allreduce not in ALLREDUCE:
            raise ConfigError(f"allreduce must be one of {', '.join(ALLREDUCE)}, got {allreduce!r}")
        self.allreduce = allreduce
        self.ranks_per_node = check_int("ranks_per_node", ranks_per_node, 0)

    def set_collectives(self, coll) -> None:
        super().set_collectives(coll)
        coll.use_allreduce(self.allreduce, self.ranks_per_node)

    @property
    def exchange_path(self) -> str:
        """``allreduce`` (the library's) or ``node-aware-allreduce``."""
        return self.coll.allreduce_path


__all__ = ["AllreduceOption"]
