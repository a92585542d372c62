"""SIGTERM/SIGUSR1/SIGINT -> a checkpoint at the next step boundary and exit code 3.

Slurm sends one of the first two before a time limit or a preemption; Ctrl-C sends SIGINT.
The handler only sets a flag; the ranks agree on it collectively, so they all stop after the
same step. This module imports
nothing heavy, so the command line installs the handlers before torch is imported.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..algorithms import Strategy

_STOP_FLAG = np.zeros(1, dtype=np.int32)  # set by the handlers, read by StopSignal


def _handle_stop(signum, frame) -> None:
    _STOP_FLAG[0] = 1


def install_stop_handlers() -> None:
    """Route SIGTERM/SIGUSR1/SIGINT to the stop flag; call early, before the slow imports.

    A signal that arrives while torch is still importing then still ends in a checkpoint
    instead of killing the rank.
    """
    for sig in StopSignal.SIGNALS:
        try:
            signal.signal(sig, _handle_stop)
        except ValueError:  # not the main thread (tests): signals stay untouched
            pass


class StopSignal:
    """SIGTERM/SIGUSR1/SIGINT set a flag; ranks agree on it one step later, without a lockstep.

    Every step starts a nonblocking MAX-Allreduce of the local flag and reads the one started
    the step before, so all ranks see the same answer at the same step and no rank waits
    on a collective it would not otherwise wait on.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.flag = _STOP_FLAG
        self._request = None
        install_stop_handlers()

    def requested(self, strategy: "Strategy") -> bool:
        """Whether some live rank's flag was set a step ago (collective over ``strategy``'s live ranks)."""
        stop = False
        if self._request is not None:
            stop = bool(self._request.wait()[0])
        self._request = strategy.allreduce_max_async(self.flag)  # copies the flag: MPI reads the copy
        return stop

    def abandon(self) -> None:
        """End the exchange in flight: its communicator was revoked after a rank died (ULFM)."""
        if self._request is not None:
            self._request.abandon()
        self._request = None

    def drain(self) -> None:
        if self._request is not None:
            self._request.wait()
            self._request = None
