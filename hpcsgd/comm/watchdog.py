"""Collective watchdog: a collective that does not complete in time ends the job with exit 4.

A rank that stops (SIGSTOP, a swapped-out node, a stuck NIC) leaves every other rank waiting
inside a collective forever, burning the allocation. Every collective the comm layer issues
runs inside :meth:`Watchdog.guard`, which records what the rank is waiting in; a monitor
thread checks it once per ``interval`` and, when a call has run for ``collective_timeout``
seconds, finds out who did not arrive and aborts the whole job with exit code 4.

Why a monitor thread and not nonblocking calls polled with ``Test``: the guard costs two
attribute writes per collective and the blocking calls stay blocking, while MPICH's
``Iallreduce`` + ``Wait`` of a large buffer measured slower than ``Allreduce`` (README,
"Benchmarks"), and ``Test`` polling slower still (``hpcsgd bench`` rows ``watchdog_overhead`` and
``watchdog_polling_alternative``).

Who did not arrive: nothing is exchanged while all is well. A rank whose call times out sends
an alarm (a small point-to-point message on ``COMM_WORLD``, tag ``ALARM_TAG``) to the other
members of that call's communicator; every monitor thread answers alarms at its next tick
with what its rank is waiting in (or that it waits in nothing). Ranks waiting in the same
operation at the same step arrived; the others did not: busy elsewhere, waiting in another
collective, or not answering at all (stopped, hung or dead). The lowest rank that arrived
prints one message naming them and calls ``MPI_Abort(COMM_WORLD, 4)``; the launcher then
kills every process, the stopped one included. The monitor needs ``MPI_THREAD_MULTIPLE``
(mpi4py's default); without it the message cannot name the missing ranks.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
import time

from mpi4py import MPI

EXIT_TIMEOUT = 4
ALARM_TAG, REPLY_TAG = 0x7D0D, 0x7D0E  # point-to-point tags on COMM_WORLD (collectives never match them)


class _Call:
    """What this rank is waiting in: an operation, its communicator, since when, at which step."""

    __slots__ = ("op", "comm", "t0", "step")

    def __init__(self, op: str, comm: MPI.Comm, t0: float, step: int | None):
        self.op, self.comm, self.t0, self.step = op, comm, t0, step


class _Guard:
    """Records the call for the thread that makes it (an overlapped round waits in its own thread)."""

    __slots__ = ("dog", "call", "previous", "thread")

    def __init__(self, dog: "Watchdog", call: _Call):
        self.dog = dog
        self.call = call

    def __enter__(self):
        self.thread = threading.get_ident()
        self.previous = self.dog.calls.get(self.thread)
        self.dog.calls[self.thread] = self.call
        return self

    def __exit__(self, *exc):
        if self.previous is None:
            self.dog.calls.pop(self.thread, None)
        else:
            self.dog.calls[self.thread] = self.previous
        return False


class _NoGuard:
    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NO_GUARD = _NoGuard()


class Watchdog:
    """One per process (:data:`WATCHDOG`): the guard, the monitor thread and the abort.

    Attributes:
        timeout: seconds a guarded call may take (0: off, guards cost nothing).
        step: the training step named in messages (set by the trainer; None: setup).
    """

    def __init__(self):
        self.timeout = 0.0
        self.step: int | None = None
        self.calls: dict[int, _Call] = {}  # per thread: what it is waiting in
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._peers: dict[int, tuple[str, int]] = {}  # COMM_WORLD rank -> (host, pid)
        self._requests: list = []  # replies in flight (kept so their buffers live)

    @property
    def current(self) -> _Call | None:
        """The longest-waiting guarded call of any thread (None: none)."""
        calls = list(self.calls.values())
        return min(calls, key=lambda call: call.t0) if calls else None

    # -- the main thread's side ----------------------------------------------------------
    def arm(self, comm: MPI.Comm, timeout: float) -> None:
        """Collective over ``comm`` (every rank of the job): start watching with ``timeout``.

        Its gather of who runs where (for messages) is also a rendezvous that is not timed:
        ranks may arrive seconds apart after importing torch, which is no stall.
        """
        if comm.size > 1:
            me = (MPI.COMM_WORLD.rank, socket.gethostname(), os.getpid())
            self._peers.update({rank: (host, pid) for rank, host, pid in comm.allgather(me)})
        if comm.size == MPI.COMM_WORLD.size:
            _announce_joined(comm.rank)
        self.timeout = float(timeout)
        self.step = None
        if self.timeout > 0 and comm.size > 1 and self._thread is None:
            self._start()

    def disarm(self) -> None:
        self.timeout = 0.0

    def guard(self, op: str, comm: MPI.Comm):
        """Context manager around one collective call on ``comm`` named ``op`` in messages."""
        if self.timeout <= 0:
            return _NO_GUARD
        return _Guard(self, _Call(op, comm, time.monotonic(), self.step))

    def wait(self, request: MPI.Request, op: str, comm: MPI.Comm) -> None:
        """``request.Wait()`` under the watchdog."""
        with self.guard(op, comm):
            request.Wait()

    # -- the monitor thread ----------------------------------------------------------------
    def _start(self) -> None:
        self._multiple = MPI.Query_thread() == MPI.THREAD_MULTIPLE
        self._thread = threading.Thread(target=self._monitor, name="hpcsgd-watchdog", daemon=True)
        self._thread.start()
        atexit.register(self._shutdown)  # runs before mpi4py's MPI_Finalize (registered earlier)

    def shutdown(self) -> None:
        """Stop the monitor thread (before MPI_Finalize: no thread may call MPI during it)."""
        self._shutdown()

    def _shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def interval(self) -> float:
        """Seconds between two looks: a tenth of the timeout, within 0.05..1."""
        return min(1.0, max(0.05, self.timeout / 10))

    def _monitor(self) -> None:
        while not self._stop.wait(self.interval()):
            if self.timeout <= 0 or MPI.Is_finalized():
                continue
            if self._multiple:
                try:
                    self._answer_alarms()
                except MPI.Exception:  # a dead peer under ULFM (hpcsgd.train.recovery repairs the job)
                    from .ulfm import ack_world_failures

                    ack_world_failures()
            call = self.current
            if call is not None and time.monotonic() - call.t0 > self.timeout:
                self._fire(call)

    def _state(self) -> tuple:
        call = self.current
        if call is None:
            return (None, self.step, None)
        return (call.op, call.step, round(time.monotonic() - call.t0, 1))

    def _answer_alarms(self) -> None:
        world, status = MPI.COMM_WORLD, MPI.Status()
        while world.Iprobe(MPI.ANY_SOURCE, ALARM_TAG, status):
            source = status.Get_source()
            world.recv(source=source, tag=ALARM_TAG)
            self._requests.append(world.isend(self._state(), dest=source, tag=REPLY_TAG))

    def _fire(self, call: _Call) -> None:
        """Collect who arrived, print one message from the lowest rank that did, abort."""
        world = MPI.COMM_WORLD
        me = world.rank
        members = _world_ranks(call.comm)
        replies = self._collect([r for r in members if r != me]) if self._multiple else None
        arrived = [me] + sorted(r for r, s in (replies or {}).items() if s[:2] == (call.op, call.step))
        message = self._message(call, members, arrived, replies)
        if me != min(arrived):  # the lowest rank that arrived reports; speak only if it could not
            deadline = time.monotonic() + self._grace() + 5
            while time.monotonic() < deadline:
                self._answer_alarms()  # ranks that time out later still learn that this one arrived
                time.sleep(0.05)
        sys.stderr.write(f"hpcsgd: error: {message}\n")
        sys.stderr.flush()
        abort_job(EXIT_TIMEOUT)

    def _grace(self) -> float:
        """How long to wait for answers: a few of the others' ticks."""
        return 3 * self.interval() + 1.0

    def _collect(self, others: list[int]) -> dict[int, tuple]:
        world, status = MPI.COMM_WORLD, MPI.Status()
        self._requests += [world.isend(("alarm",), dest=r, tag=ALARM_TAG) for r in others]
        replies: dict[int, tuple] = {}
        deadline = time.monotonic() + self._grace()
        while time.monotonic() < deadline and len(replies) < len(others):
            self._answer_alarms()
            while world.Iprobe(MPI.ANY_SOURCE, REPLY_TAG, status):
                source = status.Get_source()
                replies[source] = world.recv(source=source, tag=REPLY_TAG)
            time.sleep(0.02)
        return replies

    def _message(self, call: _Call, members: list[int], arrived: list[int], replies: dict | None) -> str:
        where = f"in step {call.step}" if call.step is not None else "during setup"
        head = f"collective timeout: {call.op} {where} did not complete within {self.timeout:g} s"
        advice = ("; raise --collective-timeout (hpcsgd.init(collective_timeout=S) in a script) if the job is "
                  "only slow (0 turns the watchdog off)")
        if replies is None:
            return f"{head} on rank {MPI.COMM_WORLD.rank} (MPI lacks thread support: the missing ranks are unknown){advice}"
        missing = [r for r in members if r not in arrived]
        if not missing:
            return f"{head}: every rank ({_ranks(arrived)}) arrived; the collective itself stalled (network?){advice}"
        why = "; ".join(f"rank {r} ({self._who(r)}): {_reason(replies.get(r))}" for r in missing)
        return f"{head}: rank(s) {_ranks(missing)} did not arrive ({why}); rank(s) {_ranks(arrived)} waited{advice}"

    def _who(self, rank: int) -> str:
        if rank in self._peers:
            host, pid = self._peers[rank]
            return f"pid {pid} on {host}"
        return "unknown process"


def _announce_joined(rank: int) -> None:
    """Rank 0, once every rank of the job has met: create the file HPCSGD_READY_FILE names, if any.

    A launcher that watches the nodes through a job's start-up (tools/cluster run) stops there:
    from then on a silent rank is the watchdog's to name.
    """
    path = os.environ.get("HPCSGD_READY_FILE")
    if rank == 0 and path:
        try:
            with open(path, "a"):
                pass
        except OSError:
            pass  # the launcher keeps watching: nothing lost but its early stop


# How long a rank that aborts the job waits first, so that its message reaches the terminal.
ABORT_GRACE_S = 1.0


def abort_job(code: int) -> None:
    """``MPI_Abort(COMM_WORLD, code)``, after giving the launcher time to forward what this rank wrote.

    The launcher kills every rank on an abort, and MPICH's hydra could do so before it had
    forwarded the aborting rank's last lines: a NaN-loss job, where every rank aborts with its
    own message, ended with none of them printed in 2 of 12 runs (0 of 16 with the wait).
    """
    time.sleep(ABORT_GRACE_S)
    MPI.COMM_WORLD.Abort(code)


def _reason(state: tuple | None) -> str:
    if state is None:
        return "no answer: stopped, hung or dead"
    op, step, seconds = state
    if op is None:
        return "busy outside any collective" + (f" in step {step}" if step is not None else "")
    return f"waiting in {op}" + (f" in step {step}" if step is not None else "") + f" for {seconds:g} s"


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, sorted(ranks)))


def _world_ranks(comm: MPI.Comm) -> list[int]:
    """COMM_WORLD ranks of ``comm``'s members, in ``comm``'s order."""
    try:
        ranks = MPI.Group.Translate_ranks(comm.group, list(range(comm.size)), MPI.COMM_WORLD.group)
    except MPI.Exception:
        return list(range(MPI.COMM_WORLD.size))
    return [r for r in ranks if r != MPI.UNDEFINED]


WATCHDOG = Watchdog()


def guard(op: str, comm: MPI.Comm):
    """``with guard("Allreduce [avg]", comm): comm.Allreduce(...)``: the process's watchdog."""
    return WATCHDOG.guard(op, comm)


__all__ = ["ALARM_TAG", "EXIT_TIMEOUT", "REPLY_TAG", "WATCHDOG", "Watchdog", "guard"]
