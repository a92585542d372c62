"""The communicator wrapper every strategy talks to: averaging, broadcast, counters.

Strategies never call MPI themselves; they call this layer, so byte counts and injected
faults see every message. One naming rule for every op (Horovod's): ``op`` returns a new
result (``sum_float64``, ``allgather_flags``), ``op_`` works in place on the tensor given
(``allreduce_mean_``, ``allreduce_sum_``, ``bcast_``), ``op_async_`` starts it in place and
returns a request whose ``wait()`` completes it (``allreduce_mean_async_``), and ``op_async``
returns a request whose ``wait()`` gives the new result (``allreduce_max_async``). Tensors go to MPI as zero-copy NumPy views on the CPU; CUDA tensors
go directly when MPI is CUDA-aware, else through a pinned host buffer reused between calls.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from mpi4py import MPI

from ..faults.netem import LinkNetwork, NetworkClock, agreed_offset
from .nodes import ALLREDUCE, NodeAllreduce
from .waiting import default_wait_mode, wait_request
from .watchdog import WATCHDOG


@dataclass
class CommCounters:
    """Cumulative per-rank traffic. Bytes are payload bytes this rank puts on the wire.

    The one counters type: a strategy's running totals, what one block exchange did, what a
    round in flight adds when it is applied, and the traffic failed ranks hand to the
    survivors are all ``CommCounters``, combined with ``+`` (``+=`` adds in place, so layers
    sharing one object keep sharing it).

    An Allreduce of n bytes is counted as ``2 (L-1)/L * n`` (the bandwidth-optimal
    reduce-scatter + allgather volume), so it compares fairly with a two-phase block exchange.
    ``bytes_intra_node`` and ``bytes_inter_node`` split ``bytes_sent`` by where the bytes go,
    where the path knows it (the block exchange, the node-aware Allreduce); the library's
    Allreduce does not say, and leaves both alone.
    """

    rounds: int = 0
    bytes_sent: int = 0
    bytes_saved: int = 0
    messages_sent: int = 0
    messages_dropped: int = 0
    bytes_intra_node: int = 0
    bytes_inter_node: int = 0

    TRAFFIC = ("bytes_sent", "bytes_saved", "messages_sent", "messages_dropped", "bytes_intra_node", "bytes_inter_node")

    @property
    def arrival(self) -> float | None:
        """Fraction of this rank's off-diagonal block messages that arrived (None: none sent)."""
        total = self.messages_sent + self.messages_dropped
        return self.messages_sent / total if total else None

    def __add__(self, other: "CommCounters") -> "CommCounters":
        return CommCounters(**{key: getattr(self, key) + getattr(other, key) for key in self.as_dict()})

    def __iadd__(self, other: "CommCounters") -> "CommCounters":
        for key in self.as_dict():
            setattr(self, key, getattr(self, key) + getattr(other, key))
        return self

    def as_dict(self) -> dict:
        return {
            "rounds": self.rounds,
            "bytes_sent": self.bytes_sent,
            "bytes_saved": self.bytes_saved,
            "messages_sent": self.messages_sent,
            "messages_dropped": self.messages_dropped,
            "bytes_intra_node": self.bytes_intra_node,
            "bytes_inter_node": self.bytes_inter_node,
        }

    def traffic(self) -> np.ndarray:
        """The four traffic figures (not ``rounds``) as float64, in :attr:`TRAFFIC` order, for one Allreduce."""
        return np.array([getattr(self, key) for key in self.TRAFFIC], dtype=np.float64)

    @classmethod
    def from_traffic(cls, values) -> "CommCounters":
        """Counters holding the traffic ``values`` (in :attr:`TRAFFIC` order; ``rounds`` 0)."""
        return cls(**{key: int(value) for key, value in zip(cls.TRAFFIC, values)})

    def load(self, state: dict) -> None:
        """Take the figures of :meth:`as_dict`'s ``state``, in place (layers sharing this object see them)."""
        for key, value in state.items():
            setattr(self, key, int(value))


def cuda_aware_from_env() -> bool:
    """Whether the user declared MPI CUDA-aware (HPCSGD_CUDA_AWARE=1); never assumed."""
    return os.environ.get("HPCSGD_CUDA_AWARE", "0").lower() in ("1", "true", "yes")


class HostStaging:
    """Pinned host buffers for CUDA tensors when MPI cannot read GPU memory."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}

    def host(self, tensor: torch.Tensor, tag: str = "") -> torch.Tensor:
        key = (tag, tensor.numel(), tensor.dtype)
        buf = self._buffers.get(key)
        if buf is None:
            buf = torch.empty(tensor.numel(), dtype=tensor.dtype, pin_memory=True)
            self._buffers[key] = buf
        return buf


class RingTiming:
    """When an Allreduce on the emulated network completes: its ring time from the moment its
    last participant got its port, which the ranks learn by a one-number Iallreduce (MAX)
    started beside the data's."""

    def __init__(self, coll: "Collectives", nbytes: int):
        clock = self.clock = coll.clock
        self.latency, self.transfer = clock.network.ring_seconds(coll.world_ranks, nbytes)
        ready = clock.ready(clock.now())
        clock.port_free = ready + self.transfer  # its own share now; the agreed start at completion
        self._start = np.array([ready])
        self._request = coll.comm.Iallreduce(MPI.IN_PLACE, self._start, op=MPI.MAX)
        self._comm, self._wait_mode = coll.comm, coll.wait_mode
        self._deadline: float | None = None

    def test(self) -> bool:
        """Whether the emulated transfer is over (its start times known and its deadline passed)."""
        if self._deadline is None and not self._request.Test():
            return False
        return self.clock.done(self.deadline())

    def deadline(self) -> float:
        if self._deadline is None:
            wait_request(self._request, "Iallreduce [emulated network: start times]", self._comm, self._wait_mode)
            self._deadline = self.clock.deadline(float(self._start[0]), self.latency, self.transfer)
        return self._deadline

    def hold(self) -> None:
        self.clock.hold(self.deadline())


class AverageRequest:
    """A pending in-place average; owns its staging buffer; ``wait()``/``test()`` like MPI."""

    def __init__(self, request: MPI.Request, tensor: torch.Tensor, host: torch.Tensor | None, divisor: int,
                 comm: MPI.Comm | None = None, op: str = "Iallreduce", timing: RingTiming | None = None,
                 wait_mode: str = "spin"):
        self._wait_mode = wait_mode
        self._timing = timing  # an emulated network: done no earlier than its deadline
        self._request = request
        self._comm = comm if comm is not None else MPI.COMM_WORLD
        self._op = op
        self._tensor = tensor
        self._host = host
        self._divisor = divisor
        self._done = False

    def test(self) -> bool:
        if not self._done and self._request.Test():
            if self._timing is None or self._timing.test():
                self._finish()
        return self._done

    def wait(self) -> torch.Tensor:
        if not self._done:
            wait_request(self._request, self._op, self._comm, self._wait_mode)
            if self._timing is not None:
                self._timing.hold()
            self._finish()
        return self._tensor

    def _finish(self) -> None:
        if self._host is not None:
            self._tensor.copy_(self._host.view_as(self._tensor), non_blocking=False)
        if self._divisor != 1:
            self._tensor.mul_(1.0 / self._divisor)  # (1/L) * sum, as specified; mul_ beats div_
        self._done = True


class ArrayRequest:
    """A pending Allreduce into a new NumPy array; ``wait()`` returns it (the stop flag's exchange)."""

    def __init__(self, request: MPI.Request, send: np.ndarray, out: np.ndarray, comm: MPI.Comm, op: str):
        self._request, self._send, self._out = request, send, out  # MPI reads send until it completes
        self._comm, self._op = comm, op

    def wait(self) -> np.ndarray:
        WATCHDOG.wait(self._request, self._op, self._comm)
        return self._out

    def abandon(self) -> None:
        """End it without a result: its communicator was revoked after a rank died (ULFM)."""
        try:
            self._request.Wait()  # returns at once with MPI_ERR_REVOKED (or completed)
        except MPI.Exception:
            pass


class Collectives:
    """Collectives over the live ranks, with traffic counters.

    Args:
        comm: the communicator of the ranks currently training.
        world_ranks: the original (COMM_WORLD) rank of each member of ``comm``, in order;
            drop masks and fault schedules are indexed by these ids.
        cuda_aware: pass CUDA tensors straight to MPI instead of staging through host memory.
        network: an emulated network (see hpcsgd/faults/netem.py); None: the real one only.
    """

    def __init__(self, comm: MPI.Comm, world_ranks: list[int] | None = None, cuda_aware: bool | None = None,
                 network: LinkNetwork | None = None):
        self.comm = comm
        self.world_ranks = np.asarray(world_ranks if world_ranks is not None else range(comm.size), dtype=np.int64)
        if len(self.world_ranks) != comm.size:
            raise ValueError("world_ranks must name one original rank per member of comm")
        self.cuda_aware = cuda_aware_from_env() if cuda_aware is None else cuda_aware
        self.counters = CommCounters()
        self._staging = HostStaging()
        # The emulated network's clock, agreed among the ranks (collective when network is set).
        self.clock = NetworkClock(network, agreed_offset(comm)) if network is not None else None
        # How requests are waited for (see hpcsgd/comm/waiting.py): spinning in MPI, or
        # polling and giving the core to ranks or threads that share it.
        self.wait_mode = default_wait_mode()
        self._windows: list = []  # shared-memory windows over comm (hpcsgd/comm/shm.py), freed together
        # How averaging rounds sum (see hpcsgd/comm/nodes.py): the library's Allreduce, or the
        # node-aware one, built at its first use over these ranks and R.
        self.allreduce_kind = "library"
        self.ranks_per_node = 0
        self._node_allreduce: NodeAllreduce | None = None

    @property
    def size(self) -> int:
        return self.comm.size

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_rank(self) -> int:
        return int(self.world_ranks[self.comm.rank])

    # -- buffers -----------------------------------------------------------------------
    def mpi_view(self, tensor: torch.Tensor, tag: str = "") -> tuple[object, torch.Tensor | None]:
        """A buffer MPI can use for ``tensor`` and, when staged, the host tensor behind it."""
        if not tensor.is_contiguous():
            raise ValueError("collectives need contiguous tensors (use the flat buffer)")
        if tensor.device.type == "cpu":
            return tensor.numpy(), None
        if self.cuda_aware:
            torch.cuda.current_stream().synchronize()  # MPI reads memory the stream may still write
            return tensor, None
        host = self._staging.host(tensor, tag)
        host.copy_(tensor.reshape(-1))
        return host.numpy(), host

    def wait(self, request: MPI.Request, op: str, can_sleep: bool = True) -> None:
        """Wait for ``request`` under the watchdog, the :attr:`wait_mode` way (see :func:`wait_request`)."""
        wait_request(request, op, self.comm, self.wait_mode, can_sleep)

    # -- averaging ---------------------------------------------------------------------
    def allreduce_mean_async_(
        self, tensor: torch.Tensor, tag: str = "avg", count: int | None = None, count_round: bool = True
    ) -> AverageRequest:
        """Start averaging ``tensor`` in place over the live ranks; finish with ``wait()``.

        ``count``: how many ranks contributed (the others sent zeros); default all of them.
        ``count_round``: whether this starts a communication round of the algorithm (one
        bucket of several is not a round of its own).
        """
        buf, host = self.mpi_view(tensor, tag)
        request = self.comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        timing = self.ring_timing(tensor.numel() * tensor.element_size())
        self._count_allreduce(tensor, count_round)
        return AverageRequest(
            request, tensor, host, self.size if count is None else max(count, 1), self.comm, f"Iallreduce [{tag}]",
            timing, self.wait_mode,
        )

    def use_allreduce(self, kind: str, ranks_per_node: int = 0) -> None:
        """Sum the averaging rounds of :meth:`allreduce_sum_` the ``kind`` way (``library``,
        ``node-aware`` or ``nonblocking``, see hpcsgd/comm/nodes.py); ``ranks_per_node``:
        simulated nodes of that many ranks."""
        if kind not in ALLREDUCE:
            raise ValueError(f"allreduce must be one of {', '.join(ALLREDUCE)}, not {kind!r}")
        self.allreduce_kind, self.ranks_per_node = kind, int(ranks_per_node)

    @property
    def allreduce_path(self) -> str:
        """How :meth:`allreduce_sum_` sums: ``allreduce`` (the library's), ``node-aware-allreduce``
        or ``nonblocking-allreduce`` (the library's Iallreduce)."""
        return {"library": "allreduce", "node-aware": "node-aware-allreduce",
                "nonblocking": "nonblocking-allreduce"}[self.allreduce_kind]

    def allreduce_sum_(self, tensor: torch.Tensor, tag: str = "avg", count_round: bool = True) -> torch.Tensor:
        """Sum ``tensor`` in place over the live ranks (one blocking Allreduce by default).

        Blocking, not a request and ``Wait``: with nothing to overlap, MPICH's blocking
        Allreduce of a large buffer measured about 10% faster than Iallreduce + Wait on one
        node. Across nodes MPICH's blocking call runs its per-node stages one after the other
        and the Iallreduce was faster; ``use_allreduce("nonblocking")`` takes it, opt-in since
        the two may add in different orders (hpcsgd/comm/nodes.py).
        """
        buf, host = self.mpi_view(tensor, tag)
        timing = self.ring_timing(tensor.numel() * tensor.element_size())
        if self.allreduce_kind == "node-aware" and self.wait_mode != "yield" and self.size > 1:
            self._sum_node_aware(buf, tensor, count_round)
        elif self.wait_mode == "yield" or self.allreduce_kind == "nonblocking":
            # A worker thread beside the training thread (overlapped rounds), or asked for.
            self.wait(self.comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM), f"Iallreduce [{tag}]")
        else:
            with WATCHDOG.guard(f"Allreduce [{tag}]", self.comm):
                self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        if timing is not None:
            timing.hold()
        if self.allreduce_kind != "node-aware" or self.wait_mode == "yield" or self.size == 1:
            self._count_allreduce(tensor, count_round)
        if host is not None:
            tensor.copy_(host.view_as(tensor))
        return tensor

    def _sum_node_aware(self, buf, tensor: torch.Tensor, count_round: bool) -> None:
        """The node-aware sum of ``buf`` (built at first use: collective, as every use is), counted per node."""
        if self._node_allreduce is None:
            self._node_allreduce = NodeAllreduce(self.comm, self.world_ranks, self.ranks_per_node)
        self._node_allreduce.sum_(buf)
        intra, inter = self._node_allreduce.traffic(tensor.numel() * tensor.element_size())
        self.counters += CommCounters(rounds=int(count_round), bytes_sent=intra + inter, bytes_intra_node=intra,
                                      bytes_inter_node=inter)

    def allreduce_mean_(
        self, tensor: torch.Tensor, tag: str = "avg", count: int | None = None, count_round: bool = True
    ) -> torch.Tensor:
        """Average ``tensor`` in place over the live ranks: ``(1/L) * sum``, as ALGORITHMS.md writes it.

        The multiply (cheaper than a divide) is one more pass over ``tensor``; local SGD
        folds it into the optimizer step instead and calls :meth:`allreduce_sum_`. ``count``:
        how many ranks contributed (the others sent zeros); with none the sum, zero, is kept.
        ``count_round``: whether this Allreduce is a communication round of the algorithm
        (momentum averaged beside a model round is not one of its own).
        """
        self.allreduce_sum_(tensor, tag, count_round)
        divisor = self.size if count is None else count
        if divisor > 1:
            tensor.mul_(1.0 / divisor)
        return tensor

    def ring_timing(self, nbytes: int) -> RingTiming | None:
        """Collective on an emulated network (None otherwise): the timing of an Allreduce of
        ``nbytes`` this rank starts now; every rank starts it beside the same Allreduce."""
        return RingTiming(self, nbytes) if self.clock is not None else None

    def network_stats(self) -> dict:
        """Emulated network time of this rank's rounds, and how much of it was not hidden ({} when off)."""
        if self.clock is None:
            return {}
        return {"network_emulated_s": self.clock.emulated_seconds, "network_held_s": self.clock.held_seconds}

    def _count_allreduce(self, tensor: torch.Tensor, count_round: bool = True) -> None:
        size = self.size
        self.counters.rounds += int(count_round)
        if size > 1:
            self.counters.bytes_sent += int(2 * (size - 1) * tensor.numel() * tensor.element_size() // size)

    # -- other collectives -------------------------------------------------------------
    def bcast_(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Overwrite ``tensor`` on every rank with root's copy (identical initialisation)."""
        buf, host = self.mpi_view(tensor, "bcast")
        with WATCHDOG.guard("Bcast [model]", self.comm):
            self.comm.Bcast(buf, root=root)
        if host is not None:
            tensor.copy_(host.view_as(tensor))
        return tensor

    def allgather_flags(self, flag: bool) -> np.ndarray:
        """Every live rank's boolean, in live-rank order (who skipped a non-finite step)."""
        out = np.empty(self.size, dtype=np.uint8)
        with WATCHDOG.guard("Allgather [who skipped a non-finite step]", self.comm):
            self.comm.Allgather(np.array([flag], dtype=np.uint8), out)
        return out.astype(bool)

    def allreduce_max_async(self, values: np.ndarray, tag: str = "stop flag") -> ArrayRequest:
        """Start the element-wise maximum of ``values`` over the live ranks into a new array.

        Nonblocking, so a flag raised on one rank (a signal) reaches every rank one step later
        without a lockstep; ``values`` is copied, so the caller may change it meanwhile.
        """
        send = np.array(values, copy=True)
        out = np.zeros_like(send)
        request = self.comm.Iallreduce(send, out, op=MPI.MAX)
        return ArrayRequest(request, send, out, self.comm, f"Iallreduce [{tag}]")

    def sum_float64(self, values: np.ndarray) -> np.ndarray:
        """Allreduce-sum of a float64 array (diagnostics: consensus distance, eval counts)."""
        values = np.ascontiguousarray(values, dtype=np.float64)
        out = np.empty_like(values)
        with WATCHDOG.guard("Allreduce [float64 sums: evaluation, consensus distance]", self.comm):
            self.comm.Allreduce(values, out, op=MPI.SUM)
        return out

    def sum_with_squared_norms(self, vector: torch.Tensor) -> tuple[np.ndarray, float]:
        """``(sum_i v_i, sum_i ||v_i||^2)`` over live ranks in float64, by one Allreduce."""
        v = vector.detach().to("cpu", torch.float64).numpy()
        packed = np.empty(v.size + 1, dtype=np.float64)
        packed[:-1] = v
        packed[-1] = float(np.dot(v, v))
        total = self.sum_float64(packed)
        return total[:-1], float(total[-1])

    def mean_and_consensus(self, flat: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The mean model over live ranks and the consensus distance ``(1/L) sum_i ||x_i - mean||^2``.

        Two passes (the mean, then one float64 Allreduce of the squared deviations), not the
        one-pass identity ``(1/L) sum_i ||x_i||^2 - ||mean||^2``: where ``L`` is not a power of
        two that identity leaves rounding residue for replicas that are identical, which must
        read exactly 0. The float64 mean of identical float32 replicas is exact, so they do.
        """
        v = flat.detach().to("cpu", torch.float64).numpy()
        mean = self.sum_float64(v) / self.size
        deviation = v - mean
        squares = self.sum_float64(np.array([np.dot(deviation, deviation)]))
        distance = float(squares[0]) / self.size
        return torch.from_numpy(mean).to(flat.device, flat.dtype), distance

    # -- shared-memory windows ----------------------------------------------------------
    def keep_window(self, window) -> None:
        """Own ``window`` (a :class:`~hpcsgd.comm.shm.SharedWindow` over :attr:`comm`) until :meth:`free_windows`."""
        self._windows.append(window)

    def free_windows(self) -> None:
        """Collective over :attr:`comm`: free the shared-memory windows opened over it.

        Each holds its node's share of a vector on /dev/shm until freed: without this, every
        exchange rebuilt after a failure (model and momentum) kept its window until finalize.
        The exchanges that used them must not run again.
        """
        windows, self._windows = self._windows, []
        for window in windows:
            window.free()
        if self._node_allreduce is not None:
            self._node_allreduce.free()
            self._node_allreduce = None

    def split_live(self, alive: bool) -> "Collectives | None":
        """Collective over the current ranks: a new layer over those still alive (None if not).

        The windows over the current ranks are freed first, while every rank that opened them
        is still here: the strategies rebuild their exchanges over the new layer.
        """
        self.free_windows()
        color = 0 if alive else MPI.UNDEFINED
        with WATCHDOG.guard("Split [the live ranks, after a failure]", self.comm):
            new_comm = self.comm.Split(color, key=self.comm.rank)
            flags = np.array(self.comm.allgather(alive), dtype=bool)
        if not alive:
            return None
        return self.over(new_comm, list(self.world_ranks[flags]))

    def over(self, comm: MPI.Comm, world_ranks: list[int]) -> "Collectives":
        """A layer over ``comm`` (the live ranks ``world_ranks``) that keeps counting in these counters.

        This layer's windows stay where they are: freeing is collective, and under ULFM some of
        their ranks are dead (the shared-memory path is off there by default).
        """
        live = Collectives(comm, world_ranks, self.cuda_aware)
        live.counters = self.counters
        live.clock = self.clock  # one emulated link per rank, before and after
        live.wait_mode = self.wait_mode
        live.use_allreduce(self.allreduce_kind, self.ranks_per_node)
        return live
