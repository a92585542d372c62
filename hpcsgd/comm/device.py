"""Which device and how many threads each rank uses.

The local rank comes from ``Split_type(COMM_TYPE_SHARED)``, so the binding works under any
launcher (mpirun, srun, mpiexec.hydra) without reading launcher-specific variables.
"""

from __future__ import annotations

import torch
from mpi4py import MPI

from ..errors import ConfigError
from .threads import limit_loaded_pools, threads_per_rank, warn_if_oversubscribed
from .waiting import decide_for_node
from .watchdog import WATCHDOG


def local_rank_and_size(comm: MPI.Comm, decide_waits: bool = False) -> tuple[int, int]:
    """This rank's index among the ranks on its node, and how many share the node.

    ``decide_waits``: also decide, with the node's ranks, whether they share cores
    (hpcsgd/comm/waiting.py: how a rank waits for its peers).
    """
    with WATCHDOG.guard("Split_type [ranks per node]", comm):
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
    try:
        if decide_waits:
            with WATCHDOG.guard("Allgather [CPU affinity of the node's ranks]", node):
                decide_for_node(node)
        return node.rank, node.size
    finally:
        node.Free()


def select_device(comm: MPI.Comm, choice: str = "auto") -> torch.device:
    """One GPU per rank (local_rank % device_count) when there is one, else the CPU."""
    if choice not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be one of auto, cpu, cuda, got {choice!r}")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but torch sees no CUDA device on this node")
    local_rank, _ = local_rank_and_size(comm)
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def default_threads(local_size: int) -> int:
    """Intra-op threads per rank: OMP_NUM_THREADS or SLURM_CPUS_PER_TASK if set, else the node's cores shared out."""
    return threads_per_rank(local_size)


def apply_threads(comm: MPI.Comm, requested: int = 0) -> int:
    """Size this rank's thread pools for the ranks sharing its node; returns threads per rank.

    torch's intra-op pool (and its MKL) by ``torch.set_num_threads``; a BLAS pool numpy has
    already started (the Python API: numpy was imported before hpcsgd could set the
    environment) through threadpoolctl. Warns once per node when threads x ranks exceed the
    cores (see ``hpcsgd.comm.threads``).
    """
    local_rank, local_size = local_rank_and_size(comm)
    threads = threads_per_rank(local_size, requested)
    torch.set_num_threads(threads)
    limit_loaded_pools(threads)
    warn_if_oversubscribed(threads, local_size, local_rank)
    return threads
