"""Collective error agreement: every rank raises together, none is left in a collective.

A problem found on one rank (a corrupted chunk only it reads, say) is gathered to all ranks
and raised on each of them with the rank that saw it, so the job ends with one clear message
and a non-zero exit instead of a hang.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from mpi4py import MPI

from ..errors import HpcsgdError
from .watchdog import WATCHDOG

T = TypeVar("T")


def agree(comm: MPI.Comm, fn: Callable[[], T], what: str = "") -> T:
    """Run ``fn`` on every rank; if it raised HpcsgdError anywhere, raise it everywhere.

    Args:
        comm: the ranks that must agree.
        fn: the local work; only HpcsgdError is gathered (other exceptions are bugs and
            abort the job from the command line's handler).
        what: a phrase for the message ("reading shards").
    """
    error: HpcsgdError | None = None
    result = None
    try:
        result = fn()
    except HpcsgdError as exc:
        error = exc
    with WATCHDOG.guard(f"Allgather [agreement: {what or 'checks'}]", comm):
        messages = comm.allgather(None if error is None else (type(error), str(error)))
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if not failed:
        return result  # type: ignore[return-value]
    rank, (kind, message) = failed[0]
    where = f"rank {rank}" if comm.size > 1 else ""
    if len(failed) > 1:
        where = f"ranks {', '.join(str(r) for r, _ in failed)}"
    prefix = f"{what}: " if what else ""
    if len({m for _, m in failed}) == 1 or len(failed) == 1:
        text = f"{prefix}{message}" + (f" ({where})" if where else "")
    else:
        text = f"{prefix}{message} (rank {rank}; {len(failed) - 1} more ranks failed too)"
    error = kind(text) if issubclass(kind, HpcsgdError) else HpcsgdError(text)
    error.collective = True  # every rank raises it: the CLI prints it once and exits cleanly
    raise error
