"""How many threads each rank's compute libraries use, decided before they are loaded.

Why this matters: numpy's OpenBLAS starts a pool of one thread per core when numpy is
imported, whatever torch is told later, and after each BLAS call its workers keep spinning
(a ``sched_yield`` loop) for a while before they sleep. With 4 ranks on 2 cores each rank's
idle workers took the cores from the other ranks: the demo's training loop (two ``np.dot``
of the model per averaging round, for the consensus distance) ran several times slower than
with ``OMP_NUM_THREADS=1`` (README, "Threads and start-up"). The pools must be sized before
the libraries load, so the command line calls :func:`limit_before_import` first thing; a library user whose numpy is already
loaded is covered by :func:`limit_loaded_pools` (through threadpoolctl), which training calls
once MPI knows the exact number of ranks on the node.

This module imports only the standard library.
"""

from __future__ import annotations

import os
import sys

# What the pools read at load time. OpenBLAS also reads OMP_NUM_THREADS, MKL too; set all
# three so that a value a user gave for one of them is the only one that differs.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

# Ranks on this node, as launchers export it: MPICH's Hydra, Open MPI, MVAPICH, Cray PALS.
_LOCAL_SIZE_VARIABLES = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE",
                         "PALS_LOCAL_SIZE")

_warned = False


def node_cores() -> int:
    """CPUs this process may run on (its affinity mask: a cgroup or a binding shrinks it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _positive(value: str | None) -> int | None:
    value = (value or "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def _slurm_tasks_on_this_node() -> int | None:
    """Tasks of this srun step on this node, from e.g. SLURM_STEP_TASKS_PER_NODE="4(x2),3"."""
    spec = os.environ.get("SLURM_STEP_TASKS_PER_NODE", "")
    node = os.environ.get("SLURM_NODEID", "0")
    if not spec or not node.isdigit():
        return None
    counts: list[int] = []
    for item in spec.split(","):
        tasks, _, repeat = item.partition("(x")
        repeat = repeat.rstrip(")") or "1"
        if not (tasks.isdigit() and repeat.isdigit()):
            return None
        counts += [int(tasks)] * int(repeat)
    return counts[int(node)] if int(node) < len(counts) else None


def launcher_local_size() -> int | None:
    """Ranks on this node as the launcher says, before MPI is initialised (None: not said)."""
    for name in _LOCAL_SIZE_VARIABLES:
        size = _positive(os.environ.get(name))
        if size is not None:
            return size
    return _slurm_tasks_on_this_node()


def threads_per_rank(local_size: int | None, requested: int = 0) -> int | None:
    """Threads one rank should use (None: it depends on ``local_size``, which is unknown).

    In order: ``requested`` (the ``threads`` config key) if > 0; OMP_NUM_THREADS if set;
    SLURM_CPUS_PER_TASK (the CPUs Slurm gave each task); else this node's cores shared out
    over its ``local_size`` ranks, at least 1.
    """
    if requested > 0:
        return requested
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        value = _positive(os.environ.get(name))
        if value is not None:
            return value
    if local_size is None:
        return None
    return max(1, node_cores() // max(1, local_size))


def limit_before_import() -> int | None:
    """Size the OpenMP / OpenBLAS / MKL pools in the environment; call before numpy or torch loads.

    Variables the user set are kept. Does nothing (returns None) when the answer depends on
    the ranks on this node and the launcher did not say how many; training then sizes the
    pools once MPI knows (:func:`limit_loaded_pools`). Returns the threads per rank chosen.
    """
    threads = threads_per_rank(launcher_local_size())
    if threads is not None:
        for name in THREAD_VARIABLES:
            os.environ.setdefault(name, str(threads))
    return threads


def limit_loaded_pools(threads: int) -> bool:
    """Cap the BLAS pools already loaded in this process (numpy's OpenBLAS) at ``threads``.

    Needs threadpoolctl (a dependency of hpcsgd); returns False when it is missing. torch's
    own pools are set by ``torch.set_num_threads``.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return False
    threadpool_limits(limits=threads, user_api="blas")
    return True


def warn_if_oversubscribed(threads: int, local_size: int, local_rank: int, cores: int | None = None) -> str | None:
    """Once per process, on the node's first rank: threads x ranks > cores with threads > 1.

    One thread per rank on fewer cores than ranks is the user's choice of ranks, and extra
    threads could not help; more than one thread per rank there only slows every rank down.
    Returns the message (also written to stderr) or None.
    """
    global _warned
    cores = node_cores() if cores is None else cores
    if _warned or threads <= 1 or threads * local_size <= cores:
        return None
    _warned = True
    message = (f"hpcsgd: warning: {local_size} ranks on this node x {threads} threads each = "
               f"{threads * local_size} threads on {cores} cores; ranks will wait for each other's "
               f"threads. Set OMP_NUM_THREADS (or --threads) to {max(1, cores // local_size)} or less.")
    if local_rank == 0:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    return message
