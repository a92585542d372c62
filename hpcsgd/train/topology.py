"""The run's nodes: R ranks per node, found at the start, fixed for the run (ALGORITHMS.md,
"Topology-aware placement and node-scoped links").

hpcsgd counts nodes as blocks of R consecutive ranks (rank ``i`` on node ``i // R``), the
default of mpiexec and srun. R comes from ``Split_type(COMM_TYPE_SHARED)`` unless the config
gives ``ranks_per_node`` (to simulate nodes on one machine, or to pin R). Once a run has
started, its R is kept in every checkpoint record, and a resume uses the recorded R: the
chunks stay where they were even when the job comes back on other nodes, or on fewer.
"""

from __future__ import annotations

import sys

from mpi4py import MPI

from ..comm.watchdog import WATCHDOG
from ..data.placement import Placement
from ..errors import ConfigError


def detect_ranks_per_node(comm) -> tuple[int, bool]:
    """(R, blocks): the ranks on rank 0's node, and whether every node is a block of R ranks.

    Collective over ``comm``. ``blocks`` is False when the launcher placed ranks round-robin
    over the nodes (``--map-by node``, ``--distribution cyclic``): then ``i // R`` is not the
    machine's node and spread placement protects against nothing real.
    """
    with WATCHDOG.guard("Split_type [ranks per node]", comm):
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
    try:
        with WATCHDOG.guard("Allgather [first rank of each node]", comm):
            first = comm.allgather(node.allreduce(comm.rank, op=MPI.MIN))
        size = comm.bcast(node.size, root=0)
    finally:
        node.Free()
    blocks = all(first[r] == (r // size) * size for r in range(len(first)))
    return size, blocks


def resolve_placement(kind: str, configured: int, detected: int, resume: dict | None, P: int, q: int) -> Placement:
    """The run's placement: the R of its checkpoint on a resume, else the configured or detected R.

    A configured R that differs from the recorded one under spread placement is refused (the
    chunks would move, and so would the trajectory). Refuses spread with ``q > P/R``.
    """
    recorded = (resume or {}).get("ranks_per_node")
    if recorded is not None:
        if configured and configured != recorded and kind == "spread":
            raise ConfigError(
                f"ranks_per_node = {configured}, but the run resumed from {resume['dir']} started with "
                f"ranks_per_node = {recorded}, which fixes where the chunks are under placement 'spread': "
                f"leave ranks_per_node out (0) or give {recorded}"
            )
        R = int(recorded)
    else:
        R = configured or detected
    placement = Placement(kind, R)
    placement.check(P, q)
    return placement


def warn_if_not_blocks(comm, placement: Placement, configured: int, blocks: bool) -> None:
    """Say so (rank 0) when spread placement runs on nodes that are not blocks of ranks."""
    if comm.rank == 0 and placement.kind == "spread" and not configured and not blocks:
        print(f"hpcsgd: warning: placement 'spread' assumes ranks 0..R-1 on the first node, R..2R-1 on the next "
              f"(R={placement.ranks_per_node}), but the launcher placed ranks round-robin over the nodes: launch "
              f"with block placement (mpirun --map-by slot, srun --distribution block) or a chunk's copies may "
              f"share a node", file=sys.stderr, flush=True)


__all__ = ["detect_ranks_per_node", "resolve_placement", "warn_if_not_blocks"]
