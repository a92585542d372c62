"""Strategies that average models every ``tau`` steps: the period, the rounds, overlap, state.

Like torch's ``PeriodicModelAverager``: this base owns when a round happens (after every step
``t`` with ``(t + 1) % tau == 0``), the overlapped round in flight (ALGORITHMS.md, "Overlapped
rounds"), its flush, close and checkpoint state, the optimizer state averaged with the model,
and the optimizer step that folds a round's ``1/L`` in. A subclass supplies one method,
:meth:`PeriodicStrategy.average_`: how a round averages a vector over the live ranks.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..optim import can_scale
from .base import Strategy, check_int, prescaled_optimizer_step
from .optimizer_state import OptimizerState
from .overlap import RoundInFlight


class PeriodicStrategy(Strategy):
    """Local steps, and every ``tau`` steps a round that averages the models over the live ranks.

    Args:
        tau: steps between rounds, >= 1.
        average_optimizer_state: average every per-parameter optimizer state tensor with the
            model (SGD momentum, Adam moments, ...; refused, by name, where it cannot be).
        overlap_rounds: run each round behind the next step (applied one step late; see flush()).
        collectives, network: as for :class:`~hpcsgd.algorithms.base.Strategy`.

    Example::

        class EveryTauMean(PeriodicStrategy):  # local SGD's round, written out
            name = "every-tau-mean"

            def average_(self, x, step, coll, prescaled=False):
                coll.allreduce_sum_(x) if prescaled else coll.allreduce_mean_(x)

        strategy = EveryTauMean(model, opt, world, tau=4, overlap_rounds=True)
    """

    def __init__(self, model, optimizer, world, *, tau: int = 1, average_optimizer_state: bool = False,
                 overlap_rounds: bool = False, **kwargs):
        tau = check_int("tau", tau, 1)
        super().__init__(model, optimizer, world, **kwargs)
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
        multiplied its model by ``1/L`` (:meth:`prescalable`). With :attr:`average_optimizer_state`
        the optimizer state is averaged too, in the same round.
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

    def optimizer_step(self, step: int) -> None:
        """On a round step, the optimizer may also multiply the model by 1/L (prescaled_optimizer_step)."""
        if self._in_flight is not None:
            self._in_flight.wait_snapshot()  # the round in flight has copied x before the step writes it
            super().optimizer_step(step)
        elif self.is_round(step) and self.coll.size > 1 and self._scales and self.prescalable():
            prescaled_optimizer_step(self)
            self._prescaled = True
        else:
            super().optimizer_step(step)

    def after_step(self, step: int) -> None:
        if self._in_flight is not None:
            self._in_flight.finish(self.flat.flat)  # the previous step's round, if any
            if self.is_round(step):
                # A skipping rank contributes its current model, as without overlap.
                self._in_flight.start(self.flat.flat, lambda work, coll: self.average_(work, step, coll),
                                      self.averaged_spans(step))
            return
        if not self.is_round(step):
            return
        if self._state is not None:
            self._state.check_scalars(self.coll)  # before anything changes: every rank raises together
        self.average_(self.flat.flat, step, self.coll, self._prescaled)
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


__all__ = ["PeriodicStrategy"]
