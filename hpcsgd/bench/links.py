"""Where a bench job runs (nodes, ranks per node) and the bytes that cross the nodes' links.

A job whose ranks span more than one node measures the same rows as on one node, keyed
``xnode_*`` (the cost of a round across a network is a different figure from the same round
through shared memory), with the bytes each measured call sent over the nodes' network
interfaces beside them. The bytes are the kernel's counters (``/sys/class/net/*/statistics``,
loopback left out), read by one rank per node and summed over the nodes: what crossed the
links, headers included, as ``tools/cluster counters`` shows for a namespace cluster. Traffic
that bypasses the kernel (RDMA) is not in them.
"""

from __future__ import annotations

from pathlib import Path

NET = Path("/sys/class/net")
XNODE = "xnode_"  # key prefix of rows measured across nodes
# Targets that differ across nodes (issue 23): a round over the network must not cost more than
# the raw Allreduce; RPS at drop 0.1 sends 10% fewer bytes over the links, so it must show.
XNODE_TARGETS = {"avg_vs_allreduce": 1.00, "avg_nonblocking_vs_allreduce": 1.00, "rps01_vs_allreduce": 0.95}
# The link probe's two sizes, as fractions of the buffer of the rows the cost model predicts:
# below them (the model is calibrated on measurements it is not checked on), yet past where a
# TCP stream is still in slow start and tbf's burst (a smaller transfer runs faster per byte
# than the rows' do, so a line through small sizes predicts them far too fast: README).
PROBE_FRACTIONS = (1 / 4, 1 / 2)
# What the probe measures (row key probe_<name>): the cost model's calibration.
PROBES = {
    "one_stream": "one stream each way between two nodes (rank 0 and rank P/2)",
    "node_streams": "every rank of a node sending to one of the other node at once",
    "allreduce": "the MPI library's blocking Allreduce",
    "iallreduce": "the MPI library's Iallreduce, waited for as hpcsgd waits",
}


class NodeLayout:
    """How the job's ranks lie on nodes, and this node's sent-bytes counter."""

    def __init__(self, comm, net: Path = NET):
        from mpi4py import MPI

        from ..comm.device import local_rank_and_size

        local_rank, self.ranks_per_node = local_rank_and_size(comm)
        self.comm = comm
        self.nodes = comm.allreduce(1 if local_rank == 0 else 0, op=MPI.SUM)
        self._sum = MPI.SUM
        # One reader per node: the node's interfaces carry all its ranks' traffic.
        files = sorted(net.glob("*/statistics/tx_bytes")) if local_rank == 0 else []
        self._files = [f for f in files if f.parent.parent.name != "lo"]
        counted = comm.allreduce(len(self._files), op=MPI.SUM)
        self.counts_bytes = self.nodes > 1 and counted > 0

    @property
    def prefix(self) -> str:
        return XNODE if self.nodes > 1 else ""

    def sent(self) -> int:
        """Bytes this node has sent over its links so far (0 on the ranks that do not read them)."""
        total = 0
        for f in self._files:
            try:
                total += int(f.read_text())
            except (OSError, ValueError):  # an interface that went away between glob and read
                pass
        return total

    def total(self, delta: int) -> int:
        """The sum over nodes of each node's ``delta`` (a collective: every rank calls it)."""
        return self.comm.allreduce(delta, op=self._sum)


def probe_rows(comm, nbytes: int, reps: int, warmup: int) -> list[dict]:
    """The link probe across nodes: :data:`PROBES` at two sizes (``PROBE_FRACTIONS`` of ``nbytes``).

    One row per probe, keyed ``probe_<name>``: ``seconds`` at the larger size and
    ``probe_bytes`` / ``probe_s`` at both, from which the cost model takes a latency and a time
    per byte (hpcsgd/bench/costmodel.py). Ranks pair as rank i and i + P/2 (the nodes are the
    two halves of the job, as the bench's cluster places them; with P odd the last rank waits).
    """
    import numpy as np
    from mpi4py import MPI

    from ..comm.waiting import default_wait_mode, wait_request
    from .timing import row, time_interleaved

    half, mode = comm.size // 2, default_wait_mode()
    peer = comm.rank + half if comm.rank < half else comm.rank - half if comm.rank < 2 * half else None
    sizes = [max(1, int(nbytes * f) // 4) for f in PROBE_FRACTIONS]
    medians = []
    for count in sizes:
        send, recv, x = (np.ones(count, dtype=np.float32) for _ in range(3))

        def swap(on: bool):
            if on and peer is not None:
                comm.Sendrecv(send, dest=peer, recvbuf=recv, source=peer)

        medians.append(time_interleaved(comm, {
            "one_stream": lambda: swap(comm.rank in (0, half)),
            "node_streams": lambda: swap(True),
            "allreduce": lambda: comm.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM),
            "iallreduce": lambda: wait_request(comm.Iallreduce(MPI.IN_PLACE, x, op=MPI.SUM), "Iallreduce [probe]",
                                               comm, mode),
        }, reps, warmup))
    nb = [4 * s for s in sizes]
    return [row(f"link probe: {what}, {nb[0] / 1e6:.1f} / {nb[1] / 1e6:.1f} MB", medians[1][name], None, None,
                key=f"probe_{name}", bytes=nb[1], probe_bytes=nb, probe_s=[m[name] for m in medians])
            for name, what in PROBES.items()]


def keyed_by_placement(rows: list[dict], placement: NodeLayout) -> list[dict]:
    """The rows with ``xnode_`` keys and their placement when the job spans nodes (else unchanged)."""
    if placement.nodes <= 1:
        return rows
    return [{**r, "key": placement.prefix + r["key"], "target": XNODE_TARGETS.get(r["key"], r["target"]),
             "nodes": placement.nodes, "ranks_per_node": placement.ranks_per_node} for r in rows]


__all__ = ["NET", "PROBES", "PROBE_FRACTIONS", "XNODE", "XNODE_TARGETS", "NodeLayout", "keyed_by_placement", "probe_rows"]
