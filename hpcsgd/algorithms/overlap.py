"""Overlapped rounds (ALGORITHMS.md, "Overlapped rounds"): a round runs behind the next step.

The round after step ``t`` starts on a snapshot ``s = x(t)`` in a worker thread, on a
communicator of its own, while the training thread takes step ``t+1``; at the end of step
``t+1`` the round is joined and ``x <- avg + (x - s)``: the average replaces the snapshot and
the local progress made since is kept (delayed averaging, Overlap Local-SGD). For RPS only
the blocks whose average arrived change; the others keep ``x`` as it is. The worker takes
the snapshot and forms ``avg - s`` itself, so the training thread pays one pass over ``x``
(``x + (avg - s)``, the spec's ``avg + (x - s)`` up to rounding).

A thread, not just a nonblocking request: MPICH moves a nonblocking collective only while
some MPI call runs, so an ``Iallreduce`` left alone during the forward and backward passes
would do its work at the ``Wait``. The worker thread sits in the blocking collective (which
releases the GIL, as torch's kernels do) and really runs beside the computation; on an
emulated network it also holds there, behind the step. Needs MPI_THREAD_MULTIPLE.

Counters of the round are added to the strategy's when it is applied, so the metrics line
of a step sees the same counts whatever the threads' timing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from mpi4py import MPI

from ..comm import Collectives, CommCounters
from ..errors import ConfigError


def check_thread_support() -> None:
    """Raise a ConfigError naming the problem when MPI cannot run a round in a second thread."""
    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        raise ConfigError("overlap_rounds needs MPI initialised with MPI_THREAD_MULTIPLE "
                          "(mpi4py's default; check mpi4py.rc.thread_level and your MPI build)")


class RoundInFlight:
    """At most one averaging round in flight, on its own duplicate of ``coll``'s communicator.

    Build it collectively (every live rank). ``start`` copies ``x`` and runs
    ``average(work, coll)`` in the worker thread; ``finish`` waits and applies it.
    """

    def __init__(self, coll: Collectives, like: torch.Tensor, snapshot_in_worker: bool = True):
        check_thread_support()
        # The worker may copy the model while the next forward runs only if that forward
        # writes nothing into it: BatchNorm's running statistics live in the flat buffer too.
        self._snapshot_in_worker = snapshot_in_worker
        self.coll = Collectives(coll.comm.Dup(), list(coll.world_ranks), coll.cuda_aware)
        self.coll.clock = coll.clock  # one emulated link per rank
        # A spinning wait would take the training thread's core (hpcsgd/comm/waiting.py).
        self.coll.wait_mode = "yield"
        self._main_counters = coll.counters
        self.snapshot = torch.empty_like(like)
        self.work = torch.empty_like(like)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpcsgd-round")
        self._future: Future | None = None
        self._spans: list[tuple[int, int]] = []
        self._snapshot_taken = threading.Event()

    @property
    def pending(self) -> bool:
        return self._future is not None

    def start(self, x: torch.Tensor, average: Callable[[torch.Tensor, Collectives], object],
              spans: list[tuple[int, int]] | None = None) -> None:
        """Start the round on a snapshot of ``x``; ``spans``: the ``[lo, hi)`` ranges the round
        will have averaged on this rank (None: all of ``x``).

        The worker thread takes the snapshot itself, while the next step's forward and
        backward only read ``x``; :meth:`wait_snapshot` must return before anything writes
        ``x`` (the strategies call it before the optimizer step).
        """
        if self._future is not None:
            raise RuntimeError("a round is already in flight: finish it first")
        self._snapshot_taken.clear()
        self._spans = [(0, x.numel())] if spans is None else spans
        if not self._snapshot_in_worker:
            self._take_snapshot(x)
        self._future = self._pool.submit(self._run, x, average, self._spans)

    def _take_snapshot(self, x: torch.Tensor) -> None:
        try:
            self.snapshot.copy_(x)
            self.work.copy_(self.snapshot)
        finally:
            self._snapshot_taken.set()

    def _run(self, x: torch.Tensor, average, spans) -> None:
        """The worker thread: snapshot, average, and leave ``avg - s`` where the round averaged."""
        if not self._snapshot_taken.is_set():
            self._take_snapshot(x)
        average(self.work, self.coll)
        for lo, hi in spans:
            self.work[lo:hi].sub_(self.snapshot[lo:hi])

    def wait_snapshot(self) -> None:
        """Return once the round in flight has copied the model (at once when none is)."""
        if self._future is not None:
            self._snapshot_taken.wait()

    def finish(self, x: torch.Tensor) -> None:
        """Wait for the round and apply ``x <- x + (avg - s)`` where it averaged (no-op when none).

        That is ALGORITHMS.md's ``avg + (x - s)`` up to rounding, with one pass over ``x``
        on the training thread; ``avg - s`` was formed in the worker.
        """
        if self._future is None:
            return
        future, self._future = self._future, None
        clock = self.coll.clock  # an emulated network: count the wait that fell on the worker's holds
        waited_from = clock.now() if clock is not None else 0.0
        future.result()  # re-raises what the round raised
        if clock is not None:
            clock.charge_wait(waited_from, clock.now())
        for lo, hi in self._spans:
            x[lo:hi].add_(self.work[lo:hi])
        self._merge_counters()

    def state_dict(self) -> dict | None:
        """The round in flight as checkpoint data: its correction ``avg - s`` and the spans it covers.

        Waits for the round to complete but does not apply it: a checkpoint must not move the
        step at which a round lands (ALGORITHMS.md, "Overlapped rounds"). Its traffic is
        counted now, so the counters saved with it already include the round.
        """
        if self._future is None:
            return None
        self._future.result()
        self._merge_counters()
        return {"correction": self.work.clone(), "spans": [[int(lo), int(hi)] for lo, hi in self._spans]}

    def load_state_dict(self, state: dict | None) -> None:
        """Hold the completed round ``state`` (from :meth:`state_dict`); :meth:`finish` applies it."""
        if self._future is not None:  # the model is being replaced: the round's correction is void
            future, self._future = self._future, None
            future.result()
            self.coll.counters = CommCounters()
        if state is None:
            return
        self.work.copy_(torch.as_tensor(state["correction"]).reshape(self.work.shape))
        self._spans = [(int(lo), int(hi)) for lo, hi in state["spans"]]
        done: Future = Future()
        done.set_result(None)
        self._future = done
        self._snapshot_taken.set()

    def _merge_counters(self) -> None:
        self._main_counters += self.coll.counters  # in place: the strategy's layers share that object
        self.coll.counters = CommCounters()

    def close(self) -> None:
        """Stop the worker thread (finish the round first)."""
        self._pool.shutdown(wait=True)


__all__ = ["RoundInFlight", "check_thread_support"]
