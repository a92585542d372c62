"""Strategies that average models every ``tau`` steps: the period, the rounds, overlap, state.

Like torch's ``PeriodicModelAverager``: this base owns when a round happens (after every step
``t`` with ``(t + 1) % tau == 0``), the overlapped round in flight (ALGORITHMS.md, "Overlapped
rounds"), its flush, close and checkpoint state, the optimizer state averaged with the model,
and the optimizer step that folds a round's ``1/L`` in. A subclass supplies one method,
:meth:`PeriodicStrategy.average_`: how a round averages a vector over the live ranks.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..errors import ConfigError
from ..optim import can_scale
from .base import Strategy, check_int, prescaled_optimizer_step
from .optimizer_state import OptimizerState
from .overlap import RoundInFlight

AVERAGE_WEIGHTS = ("equal", "samples")  # ALGORITHMS.md, "Fractional and per-rank redundancy"


class PeriodicStrategy(Strategy):
    """Local steps, and every ``tau`` steps a round that averages the models over the live ranks.

    Args:
        tau: steps between rounds, >= 1.
        average_optimizer_state: average every per-parameter optimizer state tensor with the
            model (SGD momentum, Adam moments, ...; refused, by name, where it cannot be).
        overlap_rounds: run each round behind the next step (applied one step late; see flush()).
        average_weights: ``"equal"`` (1/L) or ``"samples"``: a round weighs rank i by ``w_i``, the
            samples it drew since the last round (pass ``step(samples=n)``; unequal batches).
        collectives, network: as for :class:`~hpcsgd.algorithms.base.Strategy`.

    Example::

        class EveryTauMean(PeriodicStrategy):  # local SGD's round, written out
            name = "every-tau-mean"

            def average_(self, x, step, coll, prescaled=False):
                coll.allreduce_sum_(x) if prescaled else coll.allreduce_mean_(x)

        strategy = EveryTauMean(model, opt, world, tau=4, overlap_rounds=True)
    """

    def __init__(self, model, optimizer, world, *, tau: int = 1, average_optimizer_state: bool = False,
                 overlap_rounds: bool = False, average_weights: str = "equal", **kwargs):
        tau = check_int("tau", tau, 1)
        if average_weights not in AVERAGE_WEIGHTS:
            raise ConfigError(f"average_weights must be one of {', '.join(AVERAGE_WEIGHTS)}, got {average_weights!r}")
        super().__init__(model, optimizer, world, **kwargs)
        self.average_weights = average_weights
        self.samples_since_round = 0  # this rank's w_i so far (counted under "samples" only)
        self.round_weights: np.ndarray | None = None  # the coming round's w_i per live rank (None: equal)
        if overlap_rounds and average_optimizer_state:
            raise ConfigError("overlap_rounds does not combine with average_optimizer_state "
                              "(the spec delays the model's average only)")
        self.tau = tau
        self.average_optimizer_state = bool(average_optimizer_state)
        self.overlap_rounds = bool(overlap_rounds)
        state = OptimizerState(self.optimizer, self.flat) if average_optimizer_state else None
        self._state = None if state is None or state.empty else state
        self._prescaled = False  # this round's 1/L already applied by the optimizer step
        self._scales = can_scale(self.optimizer)  # any plain torch SGD (ScalingSGD included)
        self._in_flight: RoundInFlight | None = None
        self._start_rounds()

    # -- what a subclass supplies -------------------------------------------------------------
    def average_(self, x: torch.Tensor, step: int, coll, prescaled: bool = False) -> None:
        """Average ``x`` in place over ``coll``'s ranks: the round after step ``step``.

        ``x`` is the flat model, or an overlapped round's copy of it (then ``coll`` is the
        round's own layer, used only by its thread); ``prescaled``: every rank already
        multiplied its model by ``1/L`` (:meth:`prescalable`), or by its weight (so ``x``'s
        average is then a plain sum). With :attr:`average_optimizer_state` the optimizer state is
        averaged too, in the same round. Under ``average_weights="samples"`` with unequal draws
        it is called with ``weights=`` (``w_i`` per live rank): a strategy that supports that
        takes the keyword.
        """
        raise NotImplementedError

    def averaged_spans(self, step: int) -> list[tuple[int, int]] | None:
        """The ``[lo, hi)`` ranges the round after ``step`` replaces on this rank (None: all of ``x``)."""
        return None

    def prescalable(self) -> bool:
        """Whether a round's ``1/L`` may ride in the optimizer step (the round is a plain sum)."""
        return True

    # -- the period ---------------------------------------------------------------------------
    def is_round(self, step: int) -> bool:
        """Whether step ``step`` ends with a model-averaging round."""
        return (step + 1) % self.tau == 0

    # -- weights (average_weights = "samples") ------------------------------------------------
    def count_samples(self, step: int, n: int) -> None:
        """Step ``step`` drew ``n`` samples on this rank (they weigh its model at the next round).

        Called before the step's exchange. On a round step under "samples" the ranks agree on
        the round's weights here (collective), before the optimizer step: the wait for a slower
        rank falls into the step's communication, not into its compute.
        """
        if self.average_weights != "samples":
            return
        self.samples_since_round += int(n)
        if self.is_round(step):
            self.round_weights = self._take_round_weights()

    def _take_round_weights(self) -> np.ndarray | None:
        """The round's ``w_i`` per live rank (collective), and a fresh count.

        None where every rank weighs the same: the round then takes the equal-weight path
        itself, so equal batches give "equal"'s bits.
        """
        mine = np.zeros(self.coll.size)
        mine[self.coll.rank] = self.samples_since_round  # a sum of one-hot vectors: every rank's count, exact
        self.samples_since_round = 0
        weights = self.coll.sum_float64(mine)
        return None if np.all(weights == weights[0]) else weights

    def own_share(self, weights: np.ndarray | None) -> float:
        """This rank's coefficient in the round's average: ``w_i / sum w`` (``1/L`` when equal)."""
        if weights is None or not weights.sum() > 0:
            return 1.0 / self.coll.size
        return float(weights[self.coll.rank] / weights.sum())

    def _average_round_(self, x: torch.Tensor, step: int, coll, prescaled: bool, weights) -> None:
        """:meth:`average_`, with ``weights=`` only where they are unequal (any subclass works without)."""
        if weights is None:
            self.average_(x, step, coll, prescaled)
        else:
            self.average_(x, step, coll, prescaled, weights=weights)

    def optimizer_step(self, step: int) -> None:
        """On a round step, the optimizer may also multiply the model by 1/L (prescaled_optimizer_step)."""
        if self._in_flight is not None:
            self._in_flight.wait_snapshot()  # the round in flight has copied x before the step writes it
            super().optimizer_step(step)
        elif self.is_round(step) and self.coll.size > 1 and self._scales and self.prescalable():
            prescaled_optimizer_step(self, self.own_share(self.round_weights))
            self._prescaled = True
        else:
            super().optimizer_step(step)

    def after_step(self, step: int) -> None:
        if self._in_flight is not None:
            self._in_flight.finish(self.flat.flat)  # the previous step's round, if any
            if self.is_round(step):
                # A skipping rank contributes its current model, as without overlap; the round
                # keeps the weights it started with.
                weights = self.round_weights
                self._in_flight.start(self.flat.flat,
                                      lambda work, coll: self._average_round_(work, step, coll, False, weights),
                                      self.averaged_spans(step))
            return
        if not self.is_round(step):
            return
        if self._state is not None:
            self._state.check_scalars(self.coll)  # before anything changes: every rank raises together
        self._average_round_(self.flat.flat, step, self.coll, self._prescaled, self.round_weights)
        self._prescaled = False

    # -- the round in flight ------------------------------------------------------------------
    def _start_rounds(self) -> None:
        """The overlapped round's own layer over the live ranks (collective; none without overlap)."""
        if self._in_flight is not None:  # flushed before the live ranks changed
            self._in_flight.close()
            self._in_flight = None
        if self.overlap_rounds:
            self._in_flight = RoundInFlight(self.coll, self.flat.flat, snapshot_in_worker=not self.flat.n_buffers)

    def set_collectives(self, coll) -> None:
        super().set_collectives(coll)
        self._start_rounds()

    def flush(self) -> None:
        if self._in_flight is not None:
            self._in_flight.finish(self.flat.flat)

    def wait_snapshot(self) -> None:
        if self._in_flight is not None:
            self._in_flight.wait_snapshot()

    def state_dict(self) -> dict:
        """The base's state, and this rank's samples since the last round (the next round's ``w_i``)."""
        return {**super().state_dict(), "samples_since_round": self.samples_since_round}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        samples = state.pop("samples_since_round", None)
        if samples is None and self.average_weights == "samples":
            warnings.warn("strategy state has no samples_since_round (an older checkpoint): the next round "
                          "weighs only the samples drawn after the resume", stacklevel=2)
        self.samples_since_round = int(samples or 0)
        super().load_state_dict(state)

    def round_state(self) -> dict | None:
        return None if self._in_flight is None else self._in_flight.state_dict()

    def load_round_state(self, state: dict | None) -> None:
        if self._in_flight is None:
            super().load_round_state(state)
        else:
            self._in_flight.load_state_dict(state)

    def close(self) -> None:
        """Stop the round's thread, then free the comm layer's windows (collective)."""
        if self._in_flight is not None:
            self._in_flight.close()
        super().close()


__all__ = ["AVERAGE_WEIGHTS", "PeriodicStrategy"]
