"""The live ranks' nodes, and the node-aware Allreduce (ALGORITHMS.md, "Node-aware exchange").

A node is a set of ranks that share memory (``Split_type(COMM_TYPE_SHARED)``). With
``ranks_per_node = R`` the ranks are also cut into blocks of R consecutive original ranks
(rank ``i`` on node ``i // R``, hpcsgd/data/placement.py): simulated nodes on one machine, so
that the node-aware paths run and are tested without a cluster. A node is then the ranks that
share memory *and* the same block, so no window ever spans two machines.

The node-aware Allreduce sums inside each node (Reduce to its first rank), across the nodes'
first ranks (Allreduce), and hands the sum back inside each node (Bcast). It adds in another
order than the library's Allreduce, so the two differ by rounding (a few ulp); it is
deterministic (same ranks, same nodes: same bits), and it is exact wherever the sum is.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

from .watchdog import WATCHDOG

# How averaging rounds (local SGD, sync SGD) sum: the MPI library's Allreduce (the exact default,
# whatever the library's own order), the node-aware one above, or the library's nonblocking
# Allreduce waited for (``nonblocking``: faster across nodes with MPICH, whose blocking one
# composes per-node stages one after the other, but it may add in another order than the
# blocking one, e.g. where a node's ranks do not come first, so it is opt-in).
ALLREDUCE = ("library", "node-aware", "nonblocking")


def node_ids(comm: MPI.Comm, world_ranks, ranks_per_node: int = 0) -> np.ndarray:
    """Collective over ``comm``: the node of each member (ids ``0..N-1`` in order of first member).

    ``ranks_per_node`` > 0 also splits by blocks of that many original ranks (``world_ranks``).
    """
    with WATCHDOG.guard("Split_type [the live ranks' nodes]", comm):
        shared = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
        try:
            leader = shared.allreduce(comm.rank, op=MPI.MIN)
        finally:
            shared.Free()
        block = int(world_ranks[comm.rank]) // ranks_per_node if ranks_per_node else 0
        keys = comm.allgather((leader, block))
    ids: dict = {}
    return np.array([ids.setdefault(key, len(ids)) for key in keys], dtype=np.int64)


class NodeAllreduce:
    """In-place sum over ``comm`` in three stages: reduce in the node, allreduce across, bcast in the node.

    Build it collectively over ``comm``; :meth:`free` (collective) releases its communicators.
    """

    def __init__(self, comm: MPI.Comm, world_ranks, ranks_per_node: int = 0):
        self.nodes = node_ids(comm, world_ranks, ranks_per_node)
        me = comm.rank
        with WATCHDOG.guard("Split [node-aware Allreduce]", comm):
            self.node = comm.Split(int(self.nodes[me]), key=me)
            first = self.node.rank == 0
            self.leaders = comm.Split(0 if first else MPI.UNDEFINED, key=me)
        self.comm = comm

    @property
    def node_count(self) -> int:
        return int(self.nodes.max()) + 1

    def sum_(self, buf: np.ndarray) -> None:
        """``buf`` <- the sum of every rank's ``buf`` (collective over the communicator it was built on)."""
        node = self.node
        if node.size > 1:
            with WATCHDOG.guard("Reduce [node-aware Allreduce, in the node]", node):
                if node.rank == 0:
                    node.Reduce(MPI.IN_PLACE, buf, op=MPI.SUM, root=0)
                else:
                    node.Reduce(buf, None, op=MPI.SUM, root=0)
        if self.leaders != MPI.COMM_NULL and self.leaders.size > 1:
            with WATCHDOG.guard("Allreduce [node-aware Allreduce, across nodes]", self.leaders):
                self.leaders.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        if node.size > 1:
            with WATCHDOG.guard("Bcast [node-aware Allreduce, in the node]", node):
                node.Bcast(buf, root=0)

    def traffic(self, nbytes: int) -> tuple[int, int]:
        """(intra-node, inter-node) bytes this rank sends for one sum of ``nbytes``.

        The bandwidth-optimal volumes, as the library's Allreduce is counted: a member sends its
        buffer to the node's first rank, which sends the sum back to each member; the first
        ranks send ``2 (N-1)/N`` buffers across ``N`` nodes.
        """
        members = self.node.size
        if self.node.rank != 0:
            return nbytes, 0
        nodes = self.node_count
        return nbytes * (members - 1), 2 * (nodes - 1) * nbytes // nodes

    def free(self) -> None:
        """Collective: release the node and leader communicators (once)."""
        if self.node != MPI.COMM_NULL:
            self.node.Free()
        if self.leaders != MPI.COMM_NULL:
            self.leaders.Free()
        self.node = self.leaders = MPI.COMM_NULL


def bench_allreduce(comm: MPI.Comm, numel: int, repeats: int = 5, ranks_per_node: int = 0,
                    world_ranks=None) -> dict:
    """Collective: the library's and the node-aware Allreduce of the same float32 buffer, timed.

    For ``hpcsgd bench``: the median seconds of ``repeats`` sums each (after one warm-up),
    the nodes seen, and how far apart the two results are (``max_ulp``: 0 when bit-identical;
    ``exact_on_integers``: both give the exact sum of small integers). Every rank returns the same dict.
    """
    world_ranks = range(comm.size) if world_ranks is None else world_ranks
    hier = NodeAllreduce(comm, world_ranks, ranks_per_node)
    rng = np.random.default_rng(comm.rank)
    data = rng.standard_normal(numel).astype(np.float32)
    results, seconds = {}, {}
    for name, run in (("library", lambda b: comm.Allreduce(MPI.IN_PLACE, b, op=MPI.SUM)), ("node-aware", hier.sum_)):
        times = []
        for _ in range(repeats + 1):
            buf = data.copy()
            comm.Barrier()
            start = time.perf_counter()
            run(buf)
            times.append(comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
        results[name], seconds[name] = buf, float(np.median(times[1:]))
    ints = np.full(numel, comm.rank + 1, dtype=np.float32)
    exact = ints.copy()
    hier.sum_(exact)
    ulp = _max_ulp(results["library"], results["node-aware"])
    report = {
        "numel": numel, "ranks": comm.size, "nodes": hier.node_count,
        "library_s": seconds["library"], "node_aware_s": seconds["node-aware"],
        "max_ulp": comm.allreduce(ulp, op=MPI.MAX),
        "exact_on_integers": bool(comm.allreduce(int(np.all(exact == comm.size * (comm.size + 1) / 2)), op=MPI.MIN)),
    }
    hier.free()
    return report


def _max_ulp(a: np.ndarray, b: np.ndarray) -> int:
    """The largest distance between ``a`` and ``b`` in float32 units in the last place."""
    ia, ib = a.view(np.int32).astype(np.int64), b.view(np.int32).astype(np.int64)
    # Map the sign-magnitude bit patterns onto one ordered integer line.
    ia = np.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = np.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int(np.abs(ia - ib).max()) if a.size else 0


__all__ = ["ALLREDUCE", "NodeAllreduce", "bench_allreduce", "node_ids"]
