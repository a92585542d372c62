"""Speed balancing: per-rank batch sizes that follow measured compute speed, their sum fixed.

ALGORITHMS.md, "Fractional and per-rank redundancy": with one slow rank every round waits for
it; giving each rank a batch in proportion to its speed lets all of them reach the round
together. :func:`split_by_speed` is the rule (pure). :class:`SpeedBalance` times this rank's
compute and decides at most once per epoch: first after a warm-up window inside the first
epoch (:func:`first_decision`: steps 1..W, the first step carries start-up costs), then at the
end of every later epoch but the last. Each decision agrees with the other live ranks on new
sizes: one Allreduce of everyone's (samples, seconds) since the last decision, from which every
rank computes the same split, so the decision is collective and never one rank's local view.
The step after a decision is not timed either (it may carry re-sizing costs). A change smaller
than :data:`MIN_CHANGE` is not made, so noise in the timings does not move the sizes every epoch.
The schedule is a pure function of (steps per epoch, total steps, W): a resume decides at the
same steps. ``hpcsgd train``'s part (hpcsgd/train/pace.py) also emulates a slower device
(``slowdown``), logs each change with the step it took effect, and is checkpointed with the sampler.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from ..errors import CheckpointError, ConfigError

MIN_CHANGE = 0.1  # the largest relative change of any rank's size must reach this for a re-split
MIN_WARMUP = 3  # timed steps before the first decision, at least (fewer are mostly noise)


def first_decision(steps_per_epoch: int, warmup: int = 0) -> int:
    """The step after which the first decision is taken (its sizes are drawn from the next step).

    Steps ``1..W`` are its window (step 0 carries start-up costs): ``W = warmup``, or by default
    (``warmup = 0``) a quarter of an epoch but at least :data:`MIN_WARMUP` steps; never past the
    first epoch's last step (a window that long is the whole first epoch, as in the later ones).
    """
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"balance_warmup must be an integer >= 0 (0: a quarter of an epoch, at least "
                          f"{MIN_WARMUP} steps), got {warmup!r}")
    window = warmup or max(MIN_WARMUP, steps_per_epoch // 4)
    return min(window, steps_per_epoch - 1)


def split_by_speed(speeds: Sequence[float], total: int, minimum: int = 1, maximum: int | None = None) -> list[int]:
    """Integer sizes in proportion to ``speeds`` that sum to ``total``, each in ``minimum..maximum``.

    The shares are ``clamp(lam * speed_i, minimum, maximum)`` with the level ``lam`` at which
    they sum to ``total`` (water-filling), rounded by largest remainder (ties: the lower rank),
    all in exact arithmetic, so every rank computes the same sizes from the same speeds.
    """
    n = len(speeds)
    if n == 0 or not all(isinstance(s, (int, float, np.floating, np.integer)) and math.isfinite(s) and s > 0
                         for s in speeds):
        raise ConfigError(f"speeds must be one finite number > 0 per rank, got {list(speeds)}")
    top = total if maximum is None else maximum
    if minimum < 0 or top < minimum or not n * minimum <= total <= n * top:
        raise ConfigError(f"total {total} cannot be split over {n} ranks with each size in {minimum}..{top}")
    speed = [Fraction(float(s)) for s in speeds]

    def filled(lam: Fraction) -> list[Fraction]:  # each share at level lam, clamped to the bounds
        return [min(max(lam * s, Fraction(minimum)), Fraction(top)) for s in speed]

    # sum(filled(lam)) grows piecewise linearly with lam, from n*minimum to n*top: find where it
    # meets total between two consecutive breakpoints and solve the linear piece exactly.
    points = sorted({Fraction(minimum) / s for s in speed} | {Fraction(top) / s for s in speed})
    lam = points[0]
    for a, b in zip(points, points[1:]):
        fa, fb = sum(filled(a)), sum(filled(b))
        if fa <= total <= fb:
            lam = a if fb == fa else a + (total - fa) * (b - a) / (fb - fa)
            break
    share = filled(lam)
    sizes = [math.floor(x) for x in share]
    order = sorted(range(n), key=lambda i: (-(share[i] - sizes[i]), i))
    for i in order[:total - sum(sizes)]:
        sizes[i] += 1
    if sum(sizes) != total:  # cannot happen for feasible bounds (checked above); never hand out a wrong total
        raise ConfigError(f"split of {total} by speeds {list(speeds)} came to {sizes}")
    return sizes


class SpeedBalance:
    """This rank's compute timings and the agreed per-rank sizes (indexed by run rank).

    Args:
        sizes: the starting size of every run rank (``batch_size`` each).
        steps_per_epoch: decisions after the warm-up window, then at the end of each later epoch ...
        total_steps: ... but the last (its sizes would draw nothing).
        maximum: the largest size a rank may get (the smallest chunk: one pass per step at most).
        warmup: timed steps before the first decision (0: the default, see :func:`first_decision`).
    """

    def __init__(self, sizes: Sequence[int], steps_per_epoch: int, total_steps: int,
                 maximum: int | None = None, warmup: int = 0):
        self.sizes = [int(b) for b in sizes]
        self.steps_per_epoch, self.total_steps = int(steps_per_epoch), int(total_steps)
        self.maximum = maximum
        self.first = first_decision(self.steps_per_epoch, warmup)  # the first decision falls after it
        self.changes: list[dict] = []  # {"step": first step drawn with them, "batch_per_rank": [...]}
        self.samples = 0  # this rank's window: samples computed and the seconds they took
        self.seconds = 0.0

    def record(self, step: int, samples: int, seconds: float) -> None:
        """Step ``step`` computed ``samples`` samples in ``seconds`` (step 0 and each step right after a
        decision are not timed: start-up and re-sizing costs)."""
        if step > 0 and not self.due(step - 1):
            self.samples += int(samples)
            self.seconds += float(seconds)

    def due(self, step: int) -> bool:
        """Whether a decision falls after step ``step``: the warm-up window's last step, then each
        epoch's last step from the second epoch on, never the run's last step. At most one per epoch."""
        if step + 1 >= self.total_steps:
            return False
        spe = self.steps_per_epoch
        return step == self.first or (step >= spe and (step + 1) % spe == 0)

    def decide(self, strategy, step: int) -> list[int] | None:
        """Collective over ``strategy``'s live ranks after step ``step``: the new sizes, or None (no change).

        Every live rank contributes its window's figures to one Allreduce; the live ranks'
        sizes are re-split in proportion to samples per second, their sum kept.
        """
        live, me = [int(r) for r in strategy.live_ranks], strategy.live_rank
        mine = np.zeros(2 * len(live))
        mine[2 * me:2 * me + 2] = self.samples, self.seconds
        figures = strategy.live_sum(mine).reshape(-1, 2)
        self.samples, self.seconds = 0, 0.0
        if not np.all(figures > 0):
            return None  # a rank timed nothing (a one-step epoch): nothing to go by
        old = [self.sizes[r] for r in live]
        new = split_by_speed((figures[:, 0] / figures[:, 1]).tolist(), sum(old), 1, self.maximum)
        if max(abs(a - b) / b for a, b in zip(new, old)) < MIN_CHANGE:
            return None
        for r, b in zip(live, new):
            self.sizes[r] = b
        self.changes.append({"step": step + 1, "batch_per_rank": list(self.sizes)})
        return list(self.sizes)

    def state_dict(self) -> dict:
        return {"sizes": list(self.sizes), "changes": list(self.changes), "samples": self.samples,
                "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        try:
            sizes = [int(b) for b in state["sizes"]]
            changes = [{"step": int(c["step"]), "batch_per_rank": [int(b) for b in c["batch_per_rank"]]}
                       for c in state["changes"]]
            samples, seconds = int(state["samples"]), float(state["seconds"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"balance state is malformed: {exc!r}") from None
        if len(sizes) != len(self.sizes):
            raise CheckpointError(f"balance state holds {len(sizes)} batch sizes, the run has {len(self.sizes)} ranks")
        self.sizes, self.changes, self.samples, self.seconds = sizes, changes, samples, seconds


__all__ = ["MIN_CHANGE", "MIN_WARMUP", "SpeedBalance", "first_decision", "split_by_speed"]
