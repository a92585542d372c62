"""Surviving a real process death in place (ULFM): roll back one round, continue as a crash-stop.

ALGORITHMS.md, "Real process failures": when a rank really dies, the survivors revoke the
training communicator, shrink it to themselves, and redo the interrupted step from their
values before it, so a round is atomic (all survivors apply it or none). From then on the
run is the simulated crash-stop run (``--fail R@S``) with the death at that step: the same
``Membership.fail`` does the bookkeeping (coverage, ``--reweight``, block re-cut, metrics),
so the two cannot drift apart. A rollback point is a copy of the state dicts of the parts a
checkpoint holds (``Trainer.parts()``): what a checkpoint can restore, a rollback can too.

Why keep two in-memory snapshots: ranks never run more than one step apart (each step waits
on the stop-flag exchange the others started the step before), so a survivor that finished a
round another survivor saw fail is at most one step ahead, and the ranks agree on the
earliest interrupted step. ``--fail R@S --fail-mode kill`` makes rank R SIGKILL itself at
the start of step S (chaos testing); it first notes the time in ``RUN_DIR/deaths/`` so the
summary can give the detection latency.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mpi4py import MPI

from ..comm import ulfm
from ..errors import ConfigError, TrainingError
from ..metrics import MetricsWriter
from ..progress import Progress

KEEP = 2  # snapshots kept: this step's start and the one before (see the module docstring)


def check_launch(cfg) -> None:
    """``fail_mode = "kill"`` needs ULFM: say how to launch instead of letting the job abort.

    And under ULFM, overlapped rounds are refused: a round in flight in its own thread, on its
    own communicator, is not part of the rollback point (not handled yet).
    """
    if cfg.overlap_rounds and ulfm.active():
        raise ConfigError("overlap_rounds is not supported yet when the job survives process deaths "
                          "(launched with --with-ft ulfm): a round in flight cannot be redone; "
                          "turn one of them off")
    if cfg.fail_mode == "kill" and (cfg.fail or cfg.fail_rate):
        why = ulfm.why_inactive()
        if why is not None:
            raise ConfigError(f"fail_mode 'kill' makes ranks really die, which this job cannot survive: {why}; "
                              f"{ulfm.LAUNCH_HINT}, or use fail_mode 'leave'")


class Recovery:
    """One rank's rollback points and the repair after a process death (no-op without ULFM).

    Given what it rolls back and repairs, not the trainer: ``parts()`` (the stateful parts a
    checkpoint holds, by name), the run's ``membership`` (whose faults and live ranks it
    edits), the ``strategy`` (whose communicator is the one repaired), the ``stop`` signal,
    the ``metrics`` and ``progress`` it restarts at the redone step, and the ``run_dir``.
    """

    def __init__(self, parts: Callable[[], dict], membership, strategy, stop, metrics: MetricsWriter,
                 progress: Progress, run_dir: Path, fail_mode: str, start_step: int):
        self.parts, self.membership, self.strategy, self.stop = parts, membership, strategy, stop
        self.metrics, self.progress, self.run_dir = metrics, progress, Path(run_dir)
        self.on = ulfm.active()
        self.kills: dict[int, int] = {}
        faults = membership.faults
        if fail_mode == "kill":
            # The survivors must find these deaths, not read them from the schedule.
            self.kills = {r: s for r, s in faults.items() if s >= start_step}
            for r in self.kills:
                del faults[r]
        self.snapshots: dict[int, dict] = {}
        self.deaths: dict[int, dict] = {}  # run rank -> what is known of its death
        self._waiting: list[dict] = []  # records whose next completed step is still to come

    # -- every step --------------------------------------------------------------------
    def begin(self, step: int) -> None:
        """At the start of ``step`` (``total_steps``: the final evaluation): die, time, snapshot."""
        now = time.time()
        for record in [r for r in self._waiting if step > r["step"]]:
            record["next_step_unix"] = now
            self._waiting.remove(record)
        if self.kills.get(self.membership.rank) == step:
            self._die(step)
        if self.on:
            self.snapshots[step] = self._snapshot()
            for old in sorted(self.snapshots)[:-KEEP]:
                del self.snapshots[old]

    def _die(self, step: int) -> None:
        rank = self.membership.rank
        directory = self.run_dir / "deaths"
        directory.mkdir(exist_ok=True)
        (directory / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "step": step, "unix": time.time()}) + "\n")
        self.metrics.close()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def _snapshot(self) -> dict:
        return {name: copy.deepcopy(part.state_dict()) for name, part in self.parts().items()}

    def _restore(self, snap: dict) -> None:
        for name, part in self.parts().items():
            part.load_state_dict(copy.deepcopy(snap[name]))

    # -- after a death -----------------------------------------------------------------
    def recover(self, exc: BaseException, step: int) -> int:
        """Repair after ``exc`` raised in ``step``; returns the step to redo. Re-raises anything else."""
        if not (self.on and ulfm.is_process_failure(exc)):
            raise exc
        detected = time.time()
        strategy = self.strategy
        live, comm, dead = strategy.live_ranks, strategy.comm, []
        while True:  # a survivor that dies during the repair is repaired too
            try:
                survivors, lost = ulfm.repair(comm)
                dead += [int(live[_old_index(strategy.comm, comm, i)]) for i in lost]
                redo = survivors.allreduce(step, op=MPI.MIN)
                break
            except MPI.Exception as again:
                if not ulfm.is_process_failure(again):
                    raise
                comm = survivors
        if redo not in self.snapshots:
            raise TrainingError(f"rank(s) {_ranks(dead)} died, but step {redo} cannot be redone here "
                                f"(snapshots of steps {sorted(self.snapshots)})")
        self._restore(self.snapshots[redo])
        for old in [s for s in self.snapshots if s > redo]:
            del self.snapshots[old]
        repaired = time.time()
        self.stop.abandon()  # its exchange was on the revoked communicator
        for r in dead:
            self.membership.faults[r] = redo
            self.kills.pop(r, None)
        self.membership.fail(dead, redo, survivors=survivors)
        self._undo_output(redo)
        record = {"ranks": sorted(dead), "step": redo, "detected_step": step, "detected_unix": detected,
                  "repair_s": repaired - detected, "next_step_unix": None}
        self._waiting.append(record)
        for r in dead:
            self.deaths[r] = record
        return redo

    def _undo_output(self, redo: int) -> None:
        """What the redone steps wrote goes: metrics lines and checkpoints after ``redo``."""
        self.metrics.restart(redo)
        if self.strategy.live_rank != 0:
            return
        # The lowest live rank reports from now on, as it writes the summary and checkpoints.
        self.progress.take_over(redo)
        for directory in (self.run_dir / "checkpoints").glob("step-*"):
            try:
                newer = int(directory.name.rsplit("-", 1)[1]) > redo
            except ValueError:
                continue
            if newer:
                shutil.rmtree(directory, ignore_errors=True)

    # -- the summary -------------------------------------------------------------------
    def failure_records(self) -> list[dict]:
        """One record per failed rank, for summary.json: simulated ones leave, real ones died."""
        out = []
        for rank, step in sorted(self.membership.faults.items()):
            if rank not in self.deaths:
                out.append({"rank": rank, "step": step, "kind": "left"})
                continue
            event = self.deaths[rank]
            died = _death_time(self.run_dir, rank)
            nxt = event["next_step_unix"]
            out.append({
                "rank": rank,
                "step": step,
                "kind": "process death",
                "detected_in_step": event["detected_step"],
                "died_unix": died,
                "detected_unix": event["detected_unix"],
                "next_step_unix": nxt,
                # From the death (known when --fail-mode kill noted it) to the survivors noticing it.
                "detection_latency_s": _diff(event["detected_unix"], died),
                "repair_s": round(event["repair_s"], 6),
                # From the death to the survivors' next completed step (the redone one).
                "death_to_next_step_s": _diff(nxt, died),
                "detection_to_next_step_s": _diff(nxt, event["detected_unix"]),
            })
        return out


def _old_index(first: MPI.Comm, current: MPI.Comm, index: int) -> int:
    """Rank ``index`` of ``current`` (the training comm, or a survivors' comm of it) in ``first``."""
    if current is first:
        return index
    return MPI.Group.Translate_ranks(current.group, [index], first.group)[0]


def _death_time(run_dir, rank: int) -> float | None:
    try:
        return float(json.loads((run_dir / "deaths" / f"rank-{rank}.json").read_text())["unix"])
    except (OSError, ValueError, KeyError):
        return None  # killed from outside: only the detection is known


def _diff(later: float | None, earlier: float | None) -> float | None:
    return None if later is None or earlier is None else round(later - earlier, 6)


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, sorted(ranks)))


__all__ = ["Recovery", "check_launch"]
