"""Two-phase block averaging over a lossy network: RPS's exchange (ALGORITHMS.md, RPS).

Phase 1 scatters block ``B_j`` of every rank's vector to rank ``j``, which averages what
arrived; phase 2 gathers the averages back. Both phases are one ``Ialltoallv`` each, on
views of the flat buffer itself: a dropped message gets count 0 (its bytes are never sent),
phase 1 sends straight from the vector, and phase 2 receives straight into it, so a block
whose average was lost keeps the rank's own values without any copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from mpi4py import MPI

from .blocks import block_offsets
from .collectives import Collectives
from .lossy import LinkRates, arrival_mask
from .watchdog import WATCHDOG


@dataclass
class ExchangeReport:
    """What one exchange did on this rank (the counters keep the running totals)."""

    bytes_sent: int
    bytes_saved: int
    messages_sent: int
    messages_dropped: int


class BlockExchange:
    """Averages a flat vector block-wise over the live ranks, dropping messages by mask.

    Args:
        coll: the comm layer over the live ranks.
        numel: length of the vectors exchanged (fixed: receive buffers are preallocated).
        rates: per-link drop rates indexed by original (world) rank.
        seed: the run's seed, the key of the drop generator.
        align: block alignment in elements (1: sizes differ by at most one).
    """

    def __init__(self, coll: Collectives, numel: int, rates: LinkRates, seed: int, align: int = 1):
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
        self, tensor: torch.Tensor, step: int, contributors: np.ndarray | None = None, count_round: bool = True
    ) -> ExchangeReport:
        """Replace ``tensor`` in place by its block-wise average over the messages that arrived.

        Args:
            contributors: bool per live rank, None for all: a block's average counts only
                the contributing ranks among those whose message arrived (a rank that
                skipped a non-finite step); a block with none of them has no average, and
                every rank keeps its own values there, as where an average is lost.
            count_round: whether this exchange is a round of its own (momentum riding with
                the model's round is not).
        """
        if tensor.numel() != self.numel or tensor.dtype != torch.float32:
            raise ValueError(f"exchange expects a float32 vector of {self.numel} elements")
        size, me = self.coll.size, self.coll.rank
        if size == 1:
            self.coll.counters.rounds += int(count_round)
            return ExchangeReport(0, 0, 0, 0)
        if contributors is not None and not contributors.any():
            return ExchangeReport(0, 0, 0, 0)  # nothing to average: every rank keeps its values
        buf, host = self.coll.mpi_view(tensor, "exchange")
        arrived1, arrived2 = self.masks(step)
        if contributors is not None and not self._lossless:
            # A block whose arrived messages all came from non-contributors has no average:
            # its owner sends none, and every rank keeps its own values there.
            arrived2 = arrived2 & (arrived1 & contributors[:, None]).any(axis=0)[:, None]
        if self._lossless:
            # Nothing can be dropped: both phases together are the mean of the live ranks'
            # vectors, which the MPI library's tuned Allreduce computes faster than two
            # Alltoallv's. It equals the two-phase result up to float summation order (the
            # Allreduce may add in another order: 1-2 ulp apart for P=4, see the tests).
            # Traffic is counted as the exchange's, message for message.
            if contributors is not None and not contributors[me]:
                buf[...] = 0  # everything arrives, so its own values are replaced anyway
            with WATCHDOG.guard("Allreduce [block exchange, lossless]", self.coll.comm):
                self.coll.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            if host is not None:
                tensor.copy_(host.view_as(tensor))
            count = size if contributors is None else int(contributors.sum())
            if count > 1:
                tensor.mul_(1.0 / count)
            return self._account(arrived1, arrived2, me, self.sizes, self._my_size, tensor.element_size(), count_round)
        comm = self.coll.comm
        offsets, sizes, stride = self.offsets[:-1], self.sizes, self._stride
        my_size = self._my_size

        # Phase 1: v_i[B_j] -> rank j, received into row i of a (size, stride) matrix.
        send_counts = np.where(arrived1[me], sizes, 0)
        from_rows = arrived1[:, me]
        recv_counts = np.where(from_rows, my_size, 0)
        recv_displs = np.arange(size, dtype=np.int64) * stride
        request = comm.Ialltoallv(
            [buf, (send_counts, offsets), MPI.FLOAT],
            [self._recv, (recv_counts, recv_displs), MPI.FLOAT],
        )
        WATCHDOG.wait(request, "Ialltoallv [block exchange, phase 1]", comm)
        # Sum the rows that arrived (row by row: about 20% faster than np.sum over axis 0,
        # which the profile showed as the round's third-largest cost), then divide.
        avg = self._avg[:my_size]
        counted = from_rows if contributors is None else from_rows & contributors
        arrived_rows = np.flatnonzero(counted)
        if len(arrived_rows):  # else no average of this block is sent (see arrived2)
            np.copyto(avg, self._recv[arrived_rows[0], :my_size])
            for i in arrived_rows[1:]:
                np.add(avg, self._recv[i, :my_size], out=avg)
            np.multiply(avg, np.float32(1.0 / len(arrived_rows)), out=avg)

        # Phase 2: w_j -> every rank i, received in place into v_i[B_j] where it arrived.
        send_counts2 = np.where(arrived2[me], my_size, 0)
        zero_displs = np.zeros(size, dtype=np.int64)  # every destination reads the same w_j
        recv_counts2 = np.where(arrived2[:, me], sizes, 0)
        request = comm.Ialltoallv(
            [self._avg, (send_counts2, zero_displs), MPI.FLOAT],
            [buf, (recv_counts2, offsets), MPI.FLOAT],
        )
        WATCHDOG.wait(request, "Ialltoallv [block exchange, phase 2]", comm)
        if host is not None:
            tensor.copy_(host.view_as(tensor))

        return self._account(arrived1, arrived2, me, sizes, my_size, tensor.element_size(), count_round)

    def _account(self, arrived1, arrived2, me, sizes, my_size, itemsize, count_round: bool = True) -> ExchangeReport:
        """Count this rank's sends: off-diagonal messages only (its own block stays home)."""
        others = np.ones(self.coll.size, dtype=bool)
        others[me] = False
        sent1, sent2 = arrived1[me] & others, arrived2[me] & others
        lost1, lost2 = ~arrived1[me] & others, ~arrived2[me] & others
        report = ExchangeReport(
            bytes_sent=int((sizes[sent1].sum() + my_size * sent2.sum()) * itemsize),
            bytes_saved=int((sizes[lost1].sum() + my_size * lost2.sum()) * itemsize),
            messages_sent=int(sent1.sum() + sent2.sum()),
            messages_dropped=int(lost1.sum() + lost2.sum()),
        )
        c = self.coll.counters
        c.rounds += int(count_round)
        c.bytes_sent += report.bytes_sent
        c.bytes_saved += report.bytes_saved
        c.messages_sent += report.messages_sent
        c.messages_dropped += report.messages_dropped
        return report
