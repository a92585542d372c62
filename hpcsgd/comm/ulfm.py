"""User-Level Failure Mitigation (ULFM): is it on, is an error a process death, repair a communicator.

Under Open MPI 5 launched with ``mpirun --with-ft ulfm`` (``mpiexec --with-ft ulfm`` under
Slurm) a rank that dies does not end the job: the next operation that involves it returns
``MPI_ERR_PROC_FAILED`` on the ranks that notice, and ``MPI_ERR_REVOKED`` on the others once
one of them revokes the communicator. :func:`repair` revokes, shrinks to the survivors and
names the dead. Everything else (which step to redo, the crash-stop bookkeeping) lives in
:mod:`hpcsgd.train.recovery`. Under MPICH, or Open MPI without ``--with-ft ulfm``, :func:`active`
is False and nothing here is used: a death aborts the job as before.
"""

from __future__ import annotations

import os
import sys
import threading

from mpi4py import MPI

# Ranks of this job that died and were survived (repair() counts them).
deaths_survived = 0
# After a death, Open MPI's MPI_Finalize sometimes waits forever for the dead (3 of 6 runs with
# two deaths here, in ompi_mpi_finalize's progress loop): it is given this long, then the
# process leaves without it (see finalize_bounded).
FINALIZE_TIMEOUT_S = 10.0

# What `mpirun --with-ft ulfm` (or `--mca mpi_ft_enable 1`) exports to every rank.
FT_VARIABLE = "OMPI_MCA_mpi_ft_enable"
LAUNCH_HINT = (
    "launch with an MPI that has ULFM and fault tolerance on: the openmpi environment "
    "(tools/setup --mpi openmpi) and `mpirun --with-ft ulfm ...` (under Slurm `mpiexec --with-ft ulfm` "
    "inside the allocation)"
)


def why_inactive() -> str | None:
    """None when real process failures can be survived here, else the reason in a few words."""
    if not all(hasattr(MPI.Comm, name) for name in ("Revoke", "Shrink", "Agree", "Ack_failed")):
        return "this mpi4py has no ULFM calls (Comm.Revoke, Shrink, Agree)"
    if not MPI.Get_library_version().startswith("Open MPI"):
        return f"the MPI library is not Open MPI ({MPI.Get_library_version().splitlines()[0].strip()})"
    if os.environ.get(FT_VARIABLE, "").lower() not in ("1", "true", "yes", "enabled"):
        return f"fault tolerance is off ({FT_VARIABLE} is not set: the job was not launched with --with-ft ulfm)"
    return None


def active() -> bool:
    """Whether a rank's death can be survived in this job (ULFM available and FT enabled)."""
    return why_inactive() is None


def failure_classes() -> tuple[int, ...]:
    return tuple(getattr(MPI, n) for n in ("ERR_PROC_FAILED", "ERR_PROC_FAILED_PENDING", "ERR_REVOKED") if hasattr(MPI, n))


def is_process_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says a peer died (or a survivor revoked the communicator because one did)."""
    if not isinstance(exc, MPI.Exception):
        return False
    try:
        return exc.Get_error_class() in failure_classes()
    except MPI.Exception:
        return False


def training_comm(comm: MPI.Comm) -> MPI.Comm:
    """The communicator training runs on: under ULFM a duplicate that returns errors.

    Only the duplicate is ever revoked, so COMM_WORLD stays usable for the watchdog's alarms.
    Without ULFM ``comm`` itself, unchanged.
    """
    if not active():
        return comm
    dup = comm.Dup()
    dup.Set_errhandler(MPI.ERRORS_RETURN)
    return dup


def repair(comm: MPI.Comm) -> tuple[MPI.Comm, list[int]]:
    """Revoke ``comm``, shrink it to the survivors; returns (new comm, ranks of ``comm`` that died).

    Collective over the survivors. Revoking first makes every survivor still blocked in, or
    about to enter, an operation on ``comm`` leave it with ``MPI_ERR_REVOKED``.
    """
    try:
        comm.Revoke()
    except MPI.Exception:  # already revoked by another survivor
        pass
    survivors = comm.Shrink()
    survivors.Set_errhandler(MPI.ERRORS_RETURN)
    kept = MPI.Group.Translate_ranks(survivors.group, list(range(survivors.size)), comm.group)
    if list(kept) != sorted(kept):  # keep the old order: rank ids and drop masks index by it
        ordered = survivors.Split(0, key=kept[survivors.rank])
        ordered.Set_errhandler(MPI.ERRORS_RETURN)
        survivors, kept = ordered, sorted(kept)
    dead = sorted(set(range(comm.size)) - set(kept))
    global deaths_survived
    deaths_survived += len(dead)
    ack_world_failures()
    return survivors, dead


def finalize_bounded(code: int) -> None:
    """``MPI_Finalize``; after a survived death, leave with ``code`` if it has not returned in time.

    The run's results are written before this; only the library's teardown is cut short.
    """
    if deaths_survived:
        def give_up() -> None:
            sys.stderr.write(f"hpcsgd: warning: MPI_Finalize did not return within {FINALIZE_TIMEOUT_S:.0f} s "
                             f"after a process death (Open MPI ULFM); leaving without it\n")
            sys.stderr.flush()
            os._exit(code)

        timer = threading.Timer(FINALIZE_TIMEOUT_S, give_up)
        timer.daemon = True
        timer.start()
        library = _libmpi()
        if library is not None:
            # Through ctypes, which lets go of the GIL during the call (mpi4py's Finalize holds
            # it): the timer's thread must be able to run while the library waits. The process
            # leaves right after, so mpi4py never learns that MPI was finalized.
            library.MPI_Finalize()
            return
    MPI.Finalize()


def _libmpi():
    """The MPI library this process loaded, for ctypes (None where it cannot be found)."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            path = next((line.split()[-1] for line in maps if "/libmpi.so" in line), None)
        return ctypes.CDLL(path) if path else None
    except OSError:
        return None


def ack_world_failures() -> None:
    """Acknowledge the failures known on COMM_WORLD, so its ANY_SOURCE probes (the watchdog's) work again.

    Under ULFM a probe from any source raises while a failure is unacknowledged.
    """
    try:
        MPI.COMM_WORLD.Ack_failed()
    except (MPI.Exception, AttributeError, NotImplementedError):
        pass


__all__ = ["FT_VARIABLE", "LAUNCH_HINT", "ack_world_failures", "active", "finalize_bounded", "is_process_failure", "repair", "training_comm", "why_inactive"]
