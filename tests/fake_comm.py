"""An in-process stand-in for an MPI communicator: P ranks as P threads of one process.

The strategies take their comm layer as ``collectives=``; a real
:class:`~hpcsgd.comm.Collectives` over a :class:`FakeComm` runs every strategy's step logic,
the comm layer's own code and the block exchange included, with no ``mpiexec`` and no MPI
traffic: each collective is a plain function over the ranks' buffers, met at a
``threading.Barrier``. Only the calls hpcsgd's comm layer makes are here, with MPI's
semantics (in-place Allreduce, Alltoallv counts and displacements, Split colours); a
nonblocking call completes when it is started, which every rank does in the same order.

Reductions add in rank order, as a single-process reference does, so results compare with
``tests/reference.py`` to float32 rounding.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from mpi4py import MPI

_OPS = ((MPI.SUM, np.add, sum), (MPI.MAX, np.maximum, max), (MPI.MIN, np.minimum, min),
        (MPI.LAND, np.logical_and, all), (MPI.LOR, np.logical_or, any))  # MPI.Op is not hashable


def _op(op, which: int):
    return next(entry[which] for entry in _OPS if entry[0] == op)


class _Group:
    """What the ranks of one communicator share: a barrier and one slot per rank."""

    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size)
        self.slots: list = [None] * size
        self.made = None  # what rank 0 built for everyone (Split, Dup)


class _Done:
    """The request of a call that completed when it started."""

    def Test(self) -> bool:  # noqa: N802 (MPI's names)
        return True

    def Wait(self) -> None:  # noqa: N802
        return None


class FakeComm:
    """Rank ``rank`` of a communicator of ``group.size`` thread-ranks (see :func:`run_ranks`)."""

    def __init__(self, group: _Group, rank: int):
        self._group, self.rank, self.size = group, rank, group.size

    # -- the meeting point -------------------------------------------------------------
    def _gather(self, value) -> list:
        """Every rank's ``value``, in rank order; no rank leaves before all have read."""
        group = self._group
        group.slots[self.rank] = value
        group.barrier.wait()
        out = list(group.slots)
        group.barrier.wait()
        return out

    def _shared(self, make):
        """``make(values)`` computed once by rank 0 over every rank's value, handed to all."""
        group = self._group
        values = self._gather(None)  # a first meeting: nobody reads ``made`` of a former call
        if self.rank == 0:
            group.made = make(values)
        group.barrier.wait()
        made = group.made
        group.barrier.wait()
        return made

    # -- MPI's buffer calls ------------------------------------------------------------
    def Allreduce(self, sendbuf, recvbuf, op=MPI.SUM):  # noqa: N802
        mine = np.array(recvbuf if sendbuf is MPI.IN_PLACE else sendbuf, copy=True)
        values = self._gather(mine)
        total = values[0].copy()
        for value in values[1:]:
            _op(op, 1)(total, value, out=total)
        recvbuf[...] = total.reshape(np.shape(recvbuf))

    def Iallreduce(self, sendbuf, recvbuf, op=MPI.SUM):  # noqa: N802
        self.Allreduce(sendbuf, recvbuf, op)
        return _Done()

    def Bcast(self, buf, root=0):  # noqa: N802
        values = self._gather(np.array(buf, copy=True) if self.rank == root else None)
        buf[...] = values[root]

    def Allgather(self, sendbuf, recvbuf):  # noqa: N802
        values = self._gather(np.array(sendbuf, copy=True).reshape(-1))
        recvbuf[...] = np.concatenate(values).reshape(np.shape(recvbuf))

    def Ialltoallv(self, send, recv):  # noqa: N802
        sbuf, (scounts, sdispls), _ = send
        rbuf, (rcounts, rdispls), _ = recv
        sbuf, rbuf = sbuf.reshape(-1), rbuf.reshape(-1)  # MPI sees flat memory
        assert np.shares_memory(rbuf, recv[0]) or rbuf.size == 0
        posted = self._group.slots
        posted[self.rank] = (sbuf, np.asarray(scounts), np.asarray(sdispls))
        self._group.barrier.wait()
        for i in range(self.size):
            other, counts, displs = posted[i]
            n = int(rcounts[i])
            if int(counts[self.rank]) != n:
                raise RuntimeError(f"Alltoallv: rank {i} sends {counts[self.rank]} to {self.rank}, which expects {n}")
            lo = int(displs[self.rank])
            rbuf[int(rdispls[i]):int(rdispls[i]) + n] = other[lo:lo + n]
        self._group.barrier.wait()  # every rank has read before a sender changes its buffer
        return _Done()

    # -- MPI's object calls and communicators ------------------------------------------
    def allgather(self, value) -> list:
        return self._gather(value)

    def allreduce(self, value, op=MPI.SUM):
        values = self._gather(value)
        if op == MPI.SUM:
            return sum(values[1:], values[0])
        return _op(op, 2)(values)

    def bcast(self, value, root=0):
        return self._gather(value)[root]

    def Barrier(self):  # noqa: N802
        self._gather(None)

    def Dup(self) -> "FakeComm":  # noqa: N802
        return FakeComm(self._shared(lambda _: _Group(self.size)), self.rank)

    def Split(self, color=0, key=0) -> "FakeComm | None":  # noqa: N802
        colours = self._gather((color, key, self.rank))
        built = self._shared(lambda _: _split_groups(colours))
        if color == MPI.UNDEFINED:
            return None
        group, order = built[color]
        return FakeComm(group, order.index(self.rank))

    def Split_type(self, split_type, key=0) -> "FakeComm":  # noqa: N802
        """Every thread-rank its own node: no shared-memory window, the message path."""
        return FakeComm(_Group(1), 0)

    def Free(self) -> None:  # noqa: N802
        pass

    def Abort(self, code=1):  # noqa: N802
        raise SystemExit(code)


def _split_groups(colours) -> dict:
    """Colour -> (its group, the old ranks in new-rank order: by key, then old rank)."""
    out = {}
    for colour in {c for c, _, _ in colours if c != MPI.UNDEFINED}:
        members = sorted((key, rank) for c, key, rank in colours if c == colour)
        out[colour] = (_Group(len(members)), [rank for _, rank in members])
    return out


def run_ranks(size: int, fn, timeout: float = 120.0) -> list:
    """``fn(comm)`` on ``size`` thread-ranks, each with its :class:`FakeComm`; their results in rank order.

    An exception on any rank is raised here (the barrier is broken, so the others stop too).
    """
    group = _Group(size)
    comms = [FakeComm(group, r) for r in range(size)]

    def one(comm):
        try:
            return fn(comm)
        except BaseException:
            group.barrier.abort()  # the other ranks leave their wait with BrokenBarrierError
            raise

    with ThreadPoolExecutor(max_workers=size, thread_name_prefix="fake-rank") as pool:
        futures = [pool.submit(one, comm) for comm in comms]
        errors = [f.exception(timeout=timeout) for f in futures]
    first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)), None)
    if first is not None or any(errors):
        raise first or errors[0]
    return [f.result() for f in futures]


__all__ = ["FakeComm", "run_ranks"]
