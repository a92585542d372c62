"""Two-phase block averaging over a lossy network: RPS's exchange (ALGORITHMS.md, RPS).

Phase 1 scatters block ``B_j`` of every rank's vector to rank ``j``, which averages what
arrived; phase 2 gathers the averages back. Three paths, bit-identical (the same arrival
masks; every path adds a block's rows in the tree order of hpcsgd/comm/blocks.py):

- ``alltoallv``: both phases are one ``Ialltoallv`` each, on views of the flat buffer itself:
  a dropped message gets count 0 (its bytes are never sent), phase 1 sends straight from the
  vector, and phase 2 receives straight into it, so a block whose average was lost keeps the
  rank's own values without any copy.
- ``shared-memory``: every live rank on one node; both phases through one shared window
  (hpcsgd/comm/shm.py).
- ``node-aware``: the live ranks span several nodes (ALGORITHMS.md, "Node-aware exchange");
  pairs on one node go through that node's window. Across nodes, phase 1 sends one sum per
  subtree of a node's ranks and block (the subtree's rows added in the window, where the
  tree adds them anyway), phase 2 each average once per node, to a relay that hands it on
  through its node's window: one ``Ialltoallv`` per phase whose counts are zero for same-node
  pairs and for what was not sent.

Every path counts the bytes that travelled, between ranks of one node as ``bytes_intra_node``,
across nodes as ``bytes_inter_node`` (nodes: hpcsgd/comm/nodes.py; ``ranks_per_node`` simulates
them); messages, drops and saved bytes are ALGORITHMS.md's ``i -> j`` on every path.
"""

from __future__ import annotations

import numpy as np
import torch
from mpi4py import MPI

from .blocks import TreeSum, block_offsets, maximal_subtrees
from .collectives import Collectives, CommCounters
from ..faults.lossy import LinkRates, arrival_mask
from . import ulfm
from .nodes import node_ids
from .shm import SharedWindow
from .watchdog import WATCHDOG

# How the two phases travel, when messages can be dropped (lossless exchanges are one Allreduce):
# auto: shared-memory where every live rank shares one node, node-aware where they span
# several and some node has two of them, else alltoallv.
PATHS = ("auto", "alltoallv", "shared-memory", "node-aware")


class BlockExchange:
    """Averages a flat vector block-wise over the live ranks, dropping messages by mask.

    Args:
        coll: the comm layer over the live ranks.
        numel: length of the vectors exchanged (fixed: receive buffers are preallocated).
        rates: per-link drop rates indexed by original (world) rank.
        seed: the run's seed, the key of the drop generator.
        align: block alignment in elements (1: sizes differ by at most one).
        path: ``auto``, ``alltoallv``, ``shared-memory`` or ``node-aware`` (see ``PATHS``);
            ``self.path`` says which one runs (``allreduce`` when nothing can be dropped).
        ranks_per_node: nodes of that many consecutive original ranks (simulated nodes on one
            machine, hpcsgd/comm/nodes.py); 0: the nodes the ranks share memory on.
        one_node_window: whether ``auto`` may take ``shared-memory`` when every live rank shares
            one node (an overlapped round does not: there the copies are CPU work that competes
            with the step it should hide behind, where messages leave the CPU free).
    """

    def __init__(self, coll: Collectives, numel: int, rates: LinkRates, seed: int, align: int = 1,
                 path: str = "auto", ranks_per_node: int = 0, one_node_window: bool = True):
        self.coll = coll
        self.numel = numel
        self.rates = rates
        self.seed = seed
        size = coll.size
        self.offsets = block_offsets(numel, size, align)
        self.sizes = np.diff(self.offsets)
        me = coll.rank
        self._my_size = int(self.sizes[me])
        self._stride = int(self.sizes.max()) if size else 0
        self._recv = np.empty((size, max(self._stride, 1)), dtype=np.float32)
        self._avg = np.empty(max(self._my_size, 1), dtype=np.float32)
        # The world-rank submatrix of each phase's rates, for the live ranks only.
        live = np.ix_(coll.world_ranks, coll.world_ranks)
        self._rates = {phase: rates.for_phase(phase)[live] for phase in (1, 2)}
        self._lossless = not (self._rates[1].any() or self._rates[2].any())
        self._all = np.ones((size, size), dtype=bool)
        if path not in PATHS:
            raise ValueError(f"exchange path must be one of {', '.join(PATHS)}, not {path!r}")
        # Each live rank's node (collective), and which ranks share this rank's node.
        self.nodes = node_ids(coll.comm, coll.world_ranks, ranks_per_node) if size > 1 else np.zeros(size, np.int64)
        self._near = self.nodes == self.nodes[me] if size else np.zeros(0, bool)
        self._tree = TreeSum()
        # The node-aware path's plan: each node's ranks cut into the largest subtrees of the
        # summation tree (hpcsgd/comm/blocks.py); a subtree adds its rows for a block on another
        # node before they cross, and one member per node relays each average that comes back.
        self._subtrees = [(lo, hi, n) for n in range(int(self.nodes.max()) + 1 if size else 0)
                          for lo, hi in maximal_subtrees(self.nodes == n)]
        self._subtree_of = {i: (lo, hi) for lo, hi, _ in self._subtrees for i in range(lo, hi)}
        self._members = [np.flatnonzero(self.nodes == n) for n in range(int(self.nodes.max()) + 1 if size else 0)]
        self._partials: np.ndarray | None = None  # a combiner's sums for other nodes' blocks
        self.path, self._window = self._open_window(path, one_node_window)

    def _open_window(self, path: str, one_node_window: bool = True) -> tuple[str, SharedWindow | None]:
        """The path that runs and its shared window (None: messages only), as ``path`` asks and
        the nodes allow (collective)."""
        if self._lossless:
            return "allreduce", None
        counts = np.bincount(self.nodes)
        if self.coll.size == 1 or path == "alltoallv" or (path == "auto" and counts.max() < 2):
            return "alltoallv", None
        if path == "auto" and len(counts) == 1 and not one_node_window:
            return "alltoallv", None
        if path == "auto" and ulfm.active():
            # Open MPI's one-sided windows are not fault tolerant: a peer's death surfaces in a
            # fence as MPI_ERR_OTHER, not as a process failure the job could survive.
            return "alltoallv", None
        one_node = path == "shared-memory" or (path == "auto" and len(counts) == 1)
        window = SharedWindow.create(self.coll.comm, self.numel, max(self._stride, 1),
                                     None if one_node else self.nodes)
        if window is None and path != "auto":
            raise ValueError(f"exchange path {path} needs {'every live rank on one node' if one_node else 'its nodes'}"
                             ", with room for the window on /dev/shm")
        if window is None:
            return "alltoallv", None
        self.coll.keep_window(window)  # freed when the live ranks change, and at close
        return ("shared-memory" if one_node else "node-aware"), window

    def masks(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Arrival masks (live-rank indexed) of phases 1 and 2 at ``step``."""
        if self._lossless:
            return self._all, self._all
        world = self.coll.world_ranks
        full = {
            phase: arrival_mask(self.seed, step, phase, self.rates.for_phase(phase))
            for phase in (1, 2)
        }
        return full[1][np.ix_(world, world)], full[2][np.ix_(world, world)]

    def average(
        self, tensor: torch.Tensor, step: int, contributors: np.ndarray | None = None, count_round: bool = True,
        prescaled: bool = False, weights: np.ndarray | None = None,
    ) -> CommCounters:
        """Replace ``tensor`` in place by its block-wise average over the messages that arrived.

        Returns what this exchange did on this rank (the layer's counters keep the totals).

        Args:
            contributors: bool per live rank, None for all: a block's average counts only
                the contributing ranks among those whose message arrived (a rank that
                skipped a non-finite step); a block with none of them has no average, and
                every rank keeps its own values there, as where an average is lost.
            count_round: whether this exchange is a round of its own (momentum riding with
                the model's round is not).
            prescaled: every rank already multiplied its vector by ``1/L`` (only where
                nothing can be dropped, so the round is one Allreduce of the sum).
            weights: ``w_i`` per live rank (``average_weights = "samples"``), None for equal:
                block j's average over its arrived set ``N_j`` weighs rank i by
                ``w_i / sum_{k in N_j} w_k`` (ALGORITHMS.md, "Fractional and per-rank redundancy").
        """
        if tensor.numel() != self.numel or tensor.dtype != torch.float32:
            raise ValueError(f"exchange expects a float32 vector of {self.numel} elements")
        if prescaled and (self.path != "allreduce" or contributors is not None or weights is not None):
            raise ValueError("a prescaled exchange must be lossless, with every rank contributing, its weights applied")
        if self.coll.size == 1:
            report = CommCounters(rounds=int(count_round))
            self.coll.counters += report
            return report
        if contributors is not None and not contributors.any():
            return CommCounters()  # nothing to average: every rank keeps its values
        buf, host = self.coll.mpi_view(tensor, "exchange")
        arrived1, arrived2 = self._round_masks(step, contributors)
        count = 1
        sent = self._pair_bytes(arrived1, arrived2)  # floats each rank sends each, per phase
        if self._lossless:
            count = self._sum_lossless(buf, contributors, weights)
        elif self.path == "node-aware":
            sent = self._average_node_aware(buf, arrived1, arrived2, contributors, weights)
        elif self._window is not None:
            self._average_shared(buf, arrived1, arrived2, contributors, weights)
        else:
            self._average_alltoallv(buf, arrived1, arrived2, contributors, weights)
        if host is not None:
            tensor.copy_(host.view_as(tensor))
        if count > 1 and not prescaled:
            tensor.mul_(1.0 / count)
        return self._account(arrived1, arrived2, sent, tensor.element_size(), count_round)

    def _round_masks(self, step: int, contributors: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The phases' arrival masks at ``step``, phase 2 restricted to blocks that have an average."""
        arrived1, arrived2 = self.masks(step)
        if contributors is not None and not self._lossless:
            # A block whose arrived messages all came from non-contributors has no average:
            # its owner sends none, and every rank keeps its own values there.
            arrived2 = arrived2 & (arrived1 & contributors[:, None]).any(axis=0)[:, None]
        return arrived1, arrived2

    def received_spans(self, step: int, contributors: np.ndarray | None = None) -> list[tuple[int, int]]:
        """The ``[lo, hi)`` element ranges that :meth:`average` at ``step`` replaces by an
        average on this rank (the blocks whose average reached it); elsewhere it keeps its values."""
        if contributors is not None and not contributors.any():
            return []
        if self.coll.size == 1 or self._lossless:
            return [(0, self.numel)]
        _, arrived2 = self._round_masks(step, contributors)
        off = self.offsets
        return [(int(off[j]), int(off[j + 1])) for j in np.flatnonzero(arrived2[:, self.coll.rank])]

    def _sum_lossless(self, buf, contributors, weights=None) -> int:
        """Nothing can be dropped: both phases together are the mean of the live ranks' vectors.

        The MPI library's tuned Allreduce computes the sum faster than two Alltoallv's; the
        caller divides by the count returned. It equals the two-phase result up to float
        summation order (the Allreduce may add in another order: 1-2 ulp apart for P=4, see
        the tests). Traffic is counted as the exchange's, message for message.
        """
        if weights is not None:
            weights = weights if contributors is None else weights * contributors
            weights = weights if weights.sum() > 0 else None
        if contributors is not None and not contributors[self.coll.rank]:
            buf[...] = 0  # everything arrives, so its own values are replaced anyway
        elif weights is not None:  # each rank scales by its share: the sum is the weighted mean
            np.multiply(buf, np.float32(_share(weights, self.coll.rank)), out=buf)
        timing = self.coll.ring_timing(self.numel * 4)
        with WATCHDOG.guard("Allreduce [block exchange, lossless]", self.coll.comm):
            self.coll.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        if timing is not None:
            timing.hold()
        if weights is not None:
            return 1
        return self.coll.size if contributors is None else int(contributors.sum())

    def _pair_bytes(self, arrived1, arrived2) -> tuple[np.ndarray, np.ndarray]:
        """Floats rank i sends rank j in each phase where every arrived message travels on its own
        (the flat and shared-memory paths): phase 1 ``i -> j`` carries block j, phase 2 ``j -> i`` too."""
        off_diagonal = ~np.eye(self.coll.size, dtype=bool)
        return (np.where(arrived1 & off_diagonal, self.sizes[None, :], 0),
                np.where(arrived2 & off_diagonal, self.sizes[:, None], 0))

    def _leaves(self, rows: np.ndarray, row, j: int, contributing: np.ndarray, weights=None) -> dict:
        """The tree's pieces of block j for ``rows`` (``row(i)``: rank i's values of the block).

        With ``weights`` each row is scaled by ``w_i / sum_{k in N_j} w_k`` (N_j: every rank whose
        row of block j counts, wherever it is added), so a node's partial sum needs no rescaling.
        """
        if weights is not None:
            counted = weights[np.flatnonzero(contributing[:, j])]
            total = counted.sum()
            if total > 0:
                return {(i, i + 1): np.float32(weights[i] / total) * row(i) for i in rows}
        return {(i, i + 1): row(i) for i in rows}

    def _average_own_block(self, pieces: dict, count: int, weighted: bool) -> None:
        """``self._avg <- `` the mean of this rank's block: its pieces added in the tree's order
        (hpcsgd/comm/blocks.py, the same on every path, so the paths agree bit for bit), then
        times ``1/|N_j|`` unless the pieces carry their weights."""
        avg = self._avg[:self._my_size]
        self._tree.into(avg, pieces, 0, self.coll.size)
        if not weighted:
            np.multiply(avg, np.float32(1.0 / count), out=avg)

    def _own_average(self, rows, row, contributing, weights=None) -> None:
        """The mean of this rank's block over ``rows``, each row read by ``row(i)``."""
        me = self.coll.rank
        pieces = self._leaves(rows, row, me, contributing, weights)
        weighted = weights is not None and weights[rows].sum() > 0
        self._average_own_block(pieces, len(rows), weighted)

    @staticmethod
    def _contributing(arrived1, contributors) -> np.ndarray:
        """``[i, j]``: rank i's row of block j arrived and counts in its average."""
        return arrived1 if contributors is None else arrived1 & contributors[:, None]

    def _average_alltoallv(self, buf, arrived1, arrived2, contributors, weights=None) -> None:
        """Both phases as one ``Ialltoallv`` each, a dropped message with count 0 (never sent)."""
        comm, size, me = self.coll.comm, self.coll.size, self.coll.rank
        offsets, sizes, stride, my_size = self.offsets[:-1], self.sizes, self._stride, self._my_size
        # Phase 1: v_i[B_j] -> rank j, received into row i of a (size, stride) matrix.
        send_counts = np.where(arrived1[me], sizes, 0)
        recv_counts = np.where(arrived1[:, me], my_size, 0)
        recv_displs = np.arange(size, dtype=np.int64) * stride
        starts = self._phase_starts()
        request = comm.Ialltoallv(
            [buf, (send_counts, offsets), MPI.FLOAT],
            [self._recv, (recv_counts, recv_displs), MPI.FLOAT],
        )
        self.coll.wait(request, "Ialltoallv [block exchange, phase 1]", can_sleep=False)
        self._hold_phase(starts, np.where(arrived1, sizes[None, :], 0))
        contributing = self._contributing(arrived1, contributors)
        rows = np.flatnonzero(contributing[:, me])
        if len(rows):  # else no average of this block is sent (see arrived2)
            self._own_average(rows, lambda i: self._recv[i, :my_size], contributing, weights)
        # Phase 2: w_j -> every rank i, received in place into v_i[B_j] where it arrived.
        send_counts2 = np.where(arrived2[me], my_size, 0)
        zero_displs = np.zeros(size, dtype=np.int64)  # every destination reads the same w_j
        recv_counts2 = np.where(arrived2[:, me], sizes, 0)
        starts = self._phase_starts()
        request = comm.Ialltoallv(
            [self._avg, (send_counts2, zero_displs), MPI.FLOAT],
            [buf, (recv_counts2, offsets), MPI.FLOAT],
        )
        self.coll.wait(request, "Ialltoallv [block exchange, phase 2]", can_sleep=False)
        self._hold_phase(starts, np.where(arrived2, sizes[:, None], 0))

    def _average_shared(self, buf, arrived1, arrived2, contributors, weights=None) -> None:
        """Both phases through the node's shared window (see hpcsgd/comm/shm.py).

        A rank copies into its region only the blocks whose phase-1 message arrives; block
        j's owner reads the arrived ones from its peers' regions (its own from its vector)
        and writes the average into its result slots; each rank copies the averages whose
        phase-2 message reached it. Three fences: the sends are visible, the averages are
        visible, and nobody still reads a region the next round overwrites.
        """
        win, me, off, sizes, my_size = self._window, self.coll.rank, self.offsets, self.sizes, self._my_size
        mine = win.views[me]
        starts = self._phase_starts()
        for j in np.flatnonzero(arrived1[me]):
            if j != me:
                mine[off[j]:off[j + 1]] = buf[off[j]:off[j + 1]]
        win.fence("phase 1 sent", self.coll.wait_mode)
        self._hold_phase(starts, np.where(arrived1, sizes[None, :], 0))
        contributing = self._contributing(arrived1, contributors)
        rows = np.flatnonzero(contributing[:, me])
        lo, hi = off[me], off[me + 1]
        starts = self._phase_starts()
        if len(rows):
            self._own_average(rows, lambda i: buf[lo:hi] if i == me else win.views[i][lo:hi], contributing, weights)
            win.result(me, my_size)[...] = self._avg[:my_size]
        win.fence("phase 2 sent", self.coll.wait_mode)
        self._hold_phase(starts, np.where(arrived2, sizes[:, None], 0))
        for j in np.flatnonzero(arrived2[:, me]):
            buf[off[j]:off[j + 1]] = win.result(j, int(sizes[j]))
        win.fence("round done", self.coll.wait_mode)

    def _average_node_aware(self, buf, arrived1, arrived2, contributors, weights=None):
        """Pairs on one node through the node's window; across nodes, one message per subtree and
        block in phase 1 and one per node and block in phase 2. Returns the floats each rank
        sent each in the two phases (see :meth:`_node_aware_plan`).

        Phase 1: a rank puts the rows it sends into its region of the window; block j's owner
        reads those of its node, and for a block on another node the subtree's combiner adds
        its members' rows (tree order) and sends the sum, which the owner adds where the flat
        path would have added those rows: the same bits. Phase 2: the owner writes its average
        into its result slots for its node, and sends it once to the relay of every other node
        that gets it, which receives it privately and puts it into its region after the
        fence; its node's ranks copy it from there.
        """
        win, comm, me, wait_mode = self._window, self.coll.comm, self.coll.rank, self.coll.wait_mode
        off, sizes, my_size, near, stride = self.offsets, self.sizes, self._my_size, self._near, self._stride
        mine = win.views[me]
        contributing = self._contributing(arrived1, contributors)
        lo, hi = self._subtree_of[me]
        across1, copies1, across2, relays2 = self._node_aware_plan(arrived1, arrived2, contributing)
        starts = self._phase_starts()
        for j in np.flatnonzero(arrived1[me] & near):
            if j != me:
                mine[off[j]:off[j + 1]] = buf[off[j]:off[j + 1]]
        for j in np.flatnonzero(copies1[me]):  # rows for the subtree's combiner
            mine[off[j]:off[j + 1]] = buf[off[j]:off[j + 1]]
        win.fence("phase 1 sent", wait_mode)
        send = buf
        if hi - lo > 1:  # this rank's rows cross added with its subtree's: it sends the sums it combines
            send = self._combine(buf, contributing, across1[me], lo, hi, weights)
        request = comm.Ialltoallv(
            [send, (across1[me], off[:-1]), MPI.FLOAT],
            [self._recv, (across1[:, me], np.arange(self.coll.size) * stride), MPI.FLOAT],
        )
        self.coll.wait(request, "Ialltoallv [node-aware exchange, phase 1]", can_sleep=False)
        sent1 = across1 + self._to_combiners(copies1) + np.where(arrived1 & near[:, None] & near[None, :], sizes, 0)
        np.fill_diagonal(sent1, 0)
        self._hold_phase(starts, sent1)
        rows = np.flatnonzero(contributing[:, me])
        b_lo, b_hi = off[me], off[me + 1]
        if len(rows):
            near_rows = rows[near[rows]]
            pieces = self._leaves(near_rows, lambda i: buf[b_lo:b_hi] if i == me else win.views[i][b_lo:b_hi],
                                  me, contributing, weights)
            pieces.update(self._far_pieces(rows, across1[:, me], contributing, weights))
            self._average_own_block(pieces, len(rows), weights is not None and weights[rows].sum() > 0)
            win.result(me, my_size)[...] = self._avg[:my_size]
        return sent1, self._node_aware_phase2(buf, arrived2, across2, relays2)

    def _node_aware_phase2(self, buf, arrived2, across2, relays2) -> np.ndarray:
        """Phase 2 of :meth:`_average_node_aware`, after this rank's average is in its result slots."""
        win, comm, me, wait_mode = self._window, self.coll.comm, self.coll.rank, self.coll.wait_mode
        off, sizes, near, mine = self.offsets, self.sizes, self._near, win.views[me]
        starts = self._phase_starts()
        # The averages for other nodes leave at once, and the relayed ones arrive in this rank's
        # private rows (phase 1's, read already): the transfer runs while the node's ranks meet
        # in the fence; they go into the window only after it (nobody reads phase 1's rows then).
        stride = self._stride
        request = comm.Ialltoallv(
            [self._avg, (across2[me], np.zeros(self.coll.size, dtype=np.int64)), MPI.FLOAT],
            [self._recv, (across2[:, me], np.arange(self.coll.size) * stride), MPI.FLOAT],
        )
        win.fence("phase 2 sent", wait_mode)  # the averages are visible and nobody reads phase 1's rows
        for j in np.flatnonzero(arrived2[:, me] & near):  # its own average too
            buf[off[j]:off[j + 1]] = win.result(j, int(sizes[j]))
        self.coll.wait(request, "Ialltoallv [node-aware exchange, phase 2]", can_sleep=False)
        for j in np.flatnonzero(across2[:, me]):
            mine[off[j]:off[j + 1]] = self._recv[j, :sizes[j]]
        sent2 = across2 + relays2 + np.where(arrived2 & near[:, None] & near[None, :], sizes[:, None], 0)
        np.fill_diagonal(sent2, 0)
        self._hold_phase(starts, sent2)
        win.fence("phase 2 relayed", wait_mode)
        node = int(self.nodes[me])
        for j in np.flatnonzero(arrived2[:, me] & ~near):
            relay = self._relay(node, j)
            buf[off[j]:off[j + 1]] = win.views[relay][off[j]:off[j + 1]]
        win.fence("round done", wait_mode)
        return sent2

    @staticmethod
    def _combiner(lo, hi, j):
        """The member of subtree ``[lo, hi)`` that adds its rows of block j and sends the sum
        (ints, or arrays elementwise: the one rule for the plan, the counters and the receiver)."""
        return lo + j % (hi - lo)

    def _relay(self, node: int, j: int) -> int:
        """The rank of ``node`` that receives block j's average for the node's ranks."""
        members = self._members[node]
        return int(members[j % len(members)])

    def _node_aware_plan(self, arrived1, arrived2, contributing):
        """Who sends what in a node-aware round (the same on every rank: the masks are).

        Returns float counts per ``[sender, receiver]``: ``across1`` phase 1's messages across
        nodes (a one-rank subtree's arrived row as on the flat path; a wider subtree's sum of its
        contributing rows, from its combiner), ``copies1`` a bool per ``[rank, block]`` for the
        rows a rank puts in the window for its combiner, ``across2`` phase 2's messages across
        nodes (owner to relay) and ``relays2`` the copies each relay hands its node's ranks.
        """
        size, sizes, nodes = self.coll.size, self.sizes, self.nodes
        blocks = np.arange(size)
        across1 = np.zeros((size, size), dtype=np.int64)
        copies1 = np.zeros((size, size), dtype=bool)
        for lo, hi, node in self._subtrees:
            far = nodes != node
            if hi - lo == 1:
                across1[lo] = np.where(far & arrived1[lo], sizes, 0)
                continue
            some = far & contributing[lo:hi].any(axis=0)
            combiner = self._combiner(lo, hi, blocks)
            across1[combiner[some], blocks[some]] = sizes[some]
            members = contributing[lo:hi] & far[None, :]
            members[combiner - lo, blocks] = False  # the combiner reads its own rows from its vector
            copies1[lo:hi] = members
        across2 = np.zeros((size, size), dtype=np.int64)
        relays2 = np.zeros((size, size), dtype=np.int64)
        for node, members in enumerate(self._members):
            for j in np.flatnonzero(nodes != node):
                wanted = arrived2[j, members]
                if wanted.any():
                    relay = self._relay(node, j)
                    across2[j, relay] = sizes[j]
                    relays2[relay, members[wanted & (members != relay)]] += sizes[j]
        return across1, copies1, across2, relays2

    def _to_combiners(self, copies1) -> np.ndarray:
        """Floats per ``[member, combiner]`` of the rows ``copies1`` marks (``[member, block]``)."""
        floats = np.zeros(copies1.shape, dtype=np.int64)
        rows, blocks = np.nonzero(copies1)
        span = np.array([self._subtree_of[int(i)] for i in rows], dtype=np.int64).reshape(-1, 2)
        combiners = self._combiner(span[:, 0], span[:, 1], blocks)
        np.add.at(floats, (rows, combiners), self.sizes[blocks])
        return floats

    def _combine(self, buf, contributing, counts, lo: int, hi: int, weights) -> np.ndarray:
        """The sums this rank sends as its subtree's combiner: for each block j with a count,
        the subtree's contributing rows of block j added in tree order, at ``off[j]`` of the result."""
        if self._partials is None:
            self._partials = np.empty(self.numel, dtype=np.float32)
        win, off, me = self._window, self.offsets, self.coll.rank
        for j in np.flatnonzero(counts):
            a, b = off[j], off[j + 1]
            rows = lo + np.flatnonzero(contributing[lo:hi, j])
            pieces = self._leaves(rows, lambda i: buf[a:b] if i == me else win.views[i][a:b], j, contributing, weights)
            self._tree.into(self._partials[a:b], pieces, lo, hi)
        return self._partials

    def _far_pieces(self, rows, incoming, contributing, weights) -> dict:
        """The pieces of this rank's block that came from other nodes, keyed by tree range:
        a lone rank's row (scaled if weighted) or a subtree's sum (scaled by its combiner)."""
        me, near, my_size = self.coll.rank, self._near, self._my_size
        pieces = {}
        lone = [i for i in rows if not near[i] and self._subtree_of[i][1] - self._subtree_of[i][0] == 1]
        pieces.update(self._leaves(np.array(lone, dtype=np.int64), lambda i: self._recv[i, :my_size], me,
                                   contributing, weights))
        for lo, hi, _ in self._subtrees:
            if hi - lo > 1 and not near[lo]:
                sender = self._combiner(lo, hi, me)
                if incoming[sender]:
                    pieces[(lo, hi)] = self._recv[sender, :my_size]
        return pieces

    def _phase_starts(self) -> np.ndarray | None:
        """On an emulated network, every live rank's port-ready time for the phase it starts
        now (one Allgather; collective), None otherwise."""
        clock = self.coll.clock
        if clock is None:
            return None
        starts = np.empty(self.coll.size)
        with WATCHDOG.guard("Allgather [emulated network: start times]", self.coll.comm):
            self.coll.comm.Allgather(np.array([clock.ready(clock.now())]), starts)
        return starts

    def _hold_phase(self, starts: np.ndarray | None, counts: np.ndarray) -> None:
        """On an emulated network, hold until the phase would complete on this rank.

        ``counts[i, j]``: floats rank ``i`` sends rank ``j`` in the phase (live-rank indexed).
        Each sender's messages leave its one port in ring order (``i+1, i+2, ...``), so the
        message from ``i`` completes at ``starts[i]`` + the sends queued before it + its own
        transfer + the link's latency; this rank's phase ends when its last incoming message
        has and its own sends have left its port (ALGORITHMS.md, "Network emulation").
        """
        if starts is None:
            return
        clock, world, me, size = self.coll.clock, self.coll.world_ranks, self.coll.rank, self.coll.size
        net = clock.network
        seconds = counts * 4.0 / net.bandwidth[np.ix_(world, world)]
        np.fill_diagonal(seconds, 0.0)  # a rank's own block stays home
        incoming = []
        for i in np.flatnonzero(counts[:, me]):
            if i == me:
                continue
            before = [(i + k) % size for k in range(1, (me - i) % size)]
            queue = float(seconds[i, before].sum())
            incoming.append((float(starts[i]), queue + float(seconds[i, me]) + float(net.latency[world[i], world[me]])))
        clock.hold(clock.phase_deadline(float(starts[me]), float(seconds[me].sum()), incoming))

    def _account(self, arrived1, arrived2, sent, itemsize, count_round: bool = True) -> CommCounters:
        """Count this rank's sends: ``sent`` (floats per ``[sender, receiver]``, per phase) as the
        bytes that travelled, apart to ranks on its node and on other nodes; messages, drops and
        saved bytes per message of ALGORITHMS.md (``i -> j`` per phase, its own block excluded)."""
        me, sizes, my_size = self.coll.rank, self.sizes, self._my_size
        others = np.ones(self.coll.size, dtype=bool)
        others[me] = False
        sent1, sent2 = arrived1[me] & others, arrived2[me] & others
        lost1, lost2 = ~arrived1[me] & others, ~arrived2[me] & others
        floats = sent[0][me] + sent[1][me]
        report = CommCounters(
            rounds=int(count_round),
            bytes_sent=int(floats.sum() * itemsize),
            bytes_intra_node=int(floats[self._near].sum() * itemsize),
            bytes_inter_node=int(floats[~self._near].sum() * itemsize),
            bytes_saved=int((sizes[lost1].sum() + my_size * lost2.sum()) * itemsize),
            messages_sent=int(sent1.sum() + sent2.sum()),
            messages_dropped=int(lost1.sum() + lost2.sum()),
        )
        self.coll.counters += report
        return report


def _share(weights: np.ndarray, i: int) -> float:
    """``w_i / sum w``, in float64 (the caller rounds it once to the vector's float32)."""
    return float(weights[i] / weights.sum())
