"""hpcsgd train's pace of compute: the emulated slowdown (``slowdown``) and speed balancing.

The decision itself is :class:`~hpcsgd.data.balance.SpeedBalance` (ALGORITHMS.md, "Fractional
and per-rank redundancy"); this part times each step, sleeps out a slowed rank's extra time
(counted as compute), hands agreed sizes to the batches, logs each change once and is
checkpointed with the sampler.
"""

from __future__ import annotations

import time

from ..data.balance import SpeedBalance


class Pace:
    """A rank's pace of compute in ``hpcsgd train``: the emulated slowdown and speed balancing.

    ``after_step`` is called by every live rank after every step (collective over the
    strategy's live ranks at the steps :meth:`SpeedBalance.due` names under ``balance =
    "speed"``: after the warm-up window inside the first epoch, then at later epochs' ends). The
    sizes it agrees on go to ``batches`` from the next step, mid-epoch too.
    """

    def __init__(self, cfg, batches, rank: int, P: int, schedule, maximum: int):
        self.cfg, self.batches, self.P = cfg, batches, P
        self.factor = cfg.slowdowns.get(rank, 1.0)
        self.balance = (SpeedBalance(cfg.batch_sizes(P), schedule.steps_per_epoch, schedule.total_steps,
                                     maximum, warmup=cfg.balance_warmup) if cfg.balance == "speed" else None)
        self._unlogged = False  # a change not yet in a metrics line

    def after_step(self, step: int, samples: int, compute_s: float, timers, strategy) -> None:
        """Sleep out the slowdown (timed as compute), time the step, re-split where a decision is due."""
        if self.factor > 1.0:
            t = time.perf_counter()
            time.sleep((self.factor - 1.0) * compute_s)
            slept = time.perf_counter() - t
            timers.compute_s += slept
            compute_s += slept
        if self.balance is None:
            return
        self.balance.record(step, samples, compute_s)
        if self.balance.due(step):
            sizes = self.balance.decide(strategy, step)
            if sizes is not None:
                self.batches.set_batch_sizes(sizes, now=True)
                self._unlogged = True

    def metrics(self) -> dict:
        """For a metrics line: the sizes and the step they took effect, once after each change."""
        if not self._unlogged:
            return {}
        self._unlogged = False
        last = self.balance.changes[-1]
        return {"batch_per_rank": last["batch_per_rank"], "batch_per_rank_step": last["step"]}

    def summary(self) -> dict:
        """For summary.json: what the rounds weighed by, the final sizes, every change, and the
        step from which the first decision's sizes were drawn (None without balancing)."""
        sizes = self.balance.sizes if self.balance is not None else self.cfg.batch_sizes(self.P)
        return {"average_weights": self.cfg.effective_average_weights, "balance": self.cfg.balance,
                "batch_per_rank": list(sizes),
                "balance_first_decision": self.balance.first + 1 if self.balance is not None else None,
                "balance_changes": list(self.balance.changes) if self.balance is not None else []}

    def state_dict(self) -> dict | None:
        return None if self.balance is None else {**self.balance.state_dict(), "unlogged": self._unlogged}

    def load_state_dict(self, state: dict | None) -> None:
        """Take back the sizes in effect at the checkpoint (and hand them to the sampler)."""
        if self.balance is None or state is None:
            return
        self.balance.load_state_dict(state)
        self._unlogged = bool(state.get("unlogged", False))
        if self.balance.changes:
            self.batches.set_batch_sizes(self.balance.sizes, now=True)


__all__ = ["Pace"]
