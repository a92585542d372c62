"""The MPI world a training script runs in: which rank, how many, which device.

:func:`init` is the first call of a user's script (and of ``hpcsgd train``). It is idempotent:
every call with the same communicator returns the same :class:`World`, so library code can
call it again without duplicating communicators or re-binding devices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_WORLDS: dict[int, "World"] = {}  # by id of the communicator: init() is idempotent


@dataclass(frozen=True)
class World:
    """One process's place in the job.

    Attributes:
        comm: the MPI communicator of the ranks that train together.
        rank: this process's rank in the run (0..size-1).
        size: the run's number of ranks P (data chunks, model replicas).
        local_rank: this process's index among the ranks on its node (GPU binding).
        local_size: how many ranks share this node.
        device: the torch device this rank trains on (a GPU of its own, else the CPU).
        roles: the run rank each member of ``comm`` plays, in ``comm`` order; ``range(size)``
            unless ``hpcsgd train`` resumed a run of P ranks on fewer processes.

    Example::

        world = hpcsgd.init()  # under mpiexec -n P; the same World on a second call
        model = Net().to(world.device)
        if world.is_root:
            print(f"{world.size} ranks, {world.local_size} on this node")
    """

    comm: object
    rank: int
    size: int
    local_rank: int
    local_size: int
    device: torch.device
    roles: tuple[int, ...] = field(default=())

    @property
    def is_root(self) -> bool:
        """Whether this is the process that writes shared files (rank 0 of ``comm``)."""
        return self.comm.rank == 0


def init(comm=None, device: str = "auto", threads: int = 0, collective_timeout: float | None = None) -> World:
    """Join the MPI world (``MPI.COMM_WORLD`` unless ``comm``), bind this rank's device, size
    its thread pools and arm the collective watchdog.

    Args:
        comm: an mpi4py communicator; default ``MPI.COMM_WORLD``.
        device: ``"auto"`` (a GPU per rank, ``local_rank % device_count``, when there is one),
            ``"cpu"`` or ``"cuda"``.
        threads: torch and BLAS threads per rank; 0 (default) as ``hpcsgd train`` does:
            OMP_NUM_THREADS, SLURM_CPUS_PER_TASK, else the node's cores over its ranks. Without
            this, numpy's BLAS pool (one thread per core in every rank) spins between calls and
            several ranks on a node slow each other down many times over.
        collective_timeout: seconds any collective of hpcsgd may wait before the job is
            aborted with exit code 4 and a message naming the call and the ranks that did
            not arrive (:mod:`hpcsgd.comm.watchdog`); None: the CLI's default; 0: off. So a
            rank that takes one step more than the others, or hangs, ends the job instead
            of leaving the others waiting forever. A later call may change it (collective).

    Returns:
        The :class:`World`; calling again with the same communicator returns the same one.
    """
    from mpi4py import MPI  # imported here: importing hpcsgd must not start MPI

    from .comm.device import apply_threads, local_rank_and_size, select_device

    comm = MPI.COMM_WORLD if comm is None else comm
    timeout = _check_timeout(collective_timeout)
    known = _WORLDS.get(id(comm))
    if known is not None and known.comm is comm:
        if collective_timeout is not None:
            _arm(comm, timeout)
        return known
    _arm(comm, timeout)
    apply_threads(comm, threads)
    local_rank, local_size = local_rank_and_size(comm, decide_waits=True)
    world = World(comm, comm.rank, comm.size, local_rank, local_size, select_device(comm, device),
                  tuple(range(comm.size)))
    _WORLDS[id(comm)] = world
    return world


def _check_timeout(value) -> float:
    """The watchdog's timeout: ``value`` checked, or the CLI's default when None."""
    from .config import TrainConfig
    from .errors import ConfigError

    if value is None:
        return float(TrainConfig.collective_timeout)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(f"collective_timeout must be a number of seconds >= 0 (0: no watchdog), got {value!r}")
    return float(value)


def _arm(comm, timeout: float) -> None:
    """Arm the process's watchdog over ``comm`` (an untimed rendezvous of its ranks)."""
    from .comm.watchdog import WATCHDOG

    WATCHDOG.arm(comm, timeout)


def world_for_run(comm, roles: list[int], run_size: int, device: torch.device) -> World:
    """The world of a run of ``run_size`` ranks played by ``comm``'s members as ``roles``.

    ``hpcsgd train`` uses it when a run resumes on fewer processes than it started with.
    """
    from .comm.device import local_rank_and_size

    local_rank, local_size = local_rank_and_size(comm, decide_waits=True)
    return World(comm, roles[comm.rank], run_size, local_rank, local_size, device, tuple(roles))


__all__ = ["World", "init", "world_for_run"]
