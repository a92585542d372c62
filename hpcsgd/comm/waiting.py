"""How a rank waits for a nonblocking MPI request: spin in MPI, or poll and give the core away.

MPI's own wait spins without yielding the core. That is the fastest wait when each rank has
cores to itself (a cluster node, one rank per GPU). Where ranks share cores, a rank spinning
for its peers takes the core the slowest of them needs to finish the work everyone waits
for: on 4 ranks x 2 cores, sync SGD's step was slower than PyTorch DDP's (whose gloo waits
sleep in the kernel), and beside a spinning worker thread an overlapped round's forward and
backward slowed down too (figures: README, "Threads and start-up"). Three ways to wait:

- ``spin``: ``MPI_Wait``.
- ``yield``: poll with ``MPI_Test`` and ``sched_yield`` between polls; every poll also moves
  the request (MPICH progresses a nonblocking collective only inside MPI calls).
- ``sleep``: poll and yield for 100 us (a small message is done by then), then sleep between
  polls, at most 5% of the time waited so far and at most ``SLEEP_MAX_S``: the wait ends at
  most about 5% later than spinning would, and a rank waiting for its peers takes almost no
  CPU from them.

The default is ``sleep`` when the node is oversubscribed and ``spin`` otherwise;
``HPCSGD_WAIT`` overrides it. Oversubscribed: more ranks on the node than CPUs in the union of
their affinity masks (:func:`decide_for_node`, run by ``hpcsgd.init``: 4 unbound ranks on 2
cores, or 4 ranks bound 2 to a core, share; 4 tasks Slurm bound to a core each do not). Before
that has run, the launcher's ranks-on-node count against this process's own mask stands in.
"""

from __future__ import annotations

import os
import time

from .threads import launcher_local_size, node_cores
from .watchdog import WATCHDOG

WAIT_MODES = ("spin", "yield", "sleep")
SPIN_S = 1e-4
SLEEP_SHARE = 0.05
SLEEP_MAX_S = 2e-4


_node_shared: bool | None = None  # decided by decide_for_node (None: not yet)


def default_wait_mode() -> str:
    """``HPCSGD_WAIT`` if set, else ``sleep`` on an oversubscribed node and ``spin`` elsewhere."""
    chosen = os.environ.get("HPCSGD_WAIT", "").strip().lower()
    if chosen:
        if chosen not in WAIT_MODES:
            raise ValueError(f"HPCSGD_WAIT must be one of {', '.join(WAIT_MODES)}, got {chosen!r}")
        return chosen
    if _node_shared is not None:
        return "sleep" if _node_shared else "spin"
    local = launcher_local_size()
    return "sleep" if local is not None and local > node_cores() else "spin"


def cores_are_shared(affinities: list[set[int]]) -> bool:
    """Whether the ranks of one node (their CPU affinity masks) must share cores."""
    return len(affinities) > len(set().union(*affinities))


def decide_for_node(node_comm) -> None:
    """Collective over the ranks of one node: decide the default wait from their affinity masks."""
    global _node_shared
    mine = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    _node_shared = cores_are_shared([set(cpus) for cpus in node_comm.allgather(mine)])


def wait_request(request, op: str, comm, mode: str = "spin", can_sleep: bool = True) -> None:
    """Complete ``request`` (named ``op`` on ``comm`` in the watchdog's messages) the ``mode`` way.

    ``can_sleep=False``: ``sleep`` waits as ``yield`` does. For requests that move only a
    piece per poll: MPICH's ``Ialltoallv`` took many times as long with sleeps between polls
    (README), while its ``Iallreduce`` lost nothing.
    """
    if mode == "sleep" and not can_sleep:
        mode = "yield"
    if mode == "spin":
        WATCHDOG.wait(request, op, comm)
        return
    with WATCHDOG.guard(op, comm):
        if request.Test():
            return
        t0 = time.perf_counter()
        while not request.Test():
            waited = time.perf_counter() - t0
            if mode == "yield" or waited < SPIN_S:
                os.sched_yield()
            else:
                time.sleep(min(SLEEP_MAX_S, waited * SLEEP_SHARE))


__all__ = ["WAIT_MODES", "cores_are_shared", "decide_for_node", "default_wait_mode", "wait_request"]
