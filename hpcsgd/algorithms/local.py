"""Local SGD and RI-SGD: local steps, model averaging every ``tau`` steps.

RI-SGD is this strategy run on a q-redundant data assignment; redundancy lives entirely in
the data layer, so the communication pattern is local SGD's.
"""

import torch

from ..errors import ConfigError
from ..optim import can_scale
from .base import Strategy, prescaled_optimizer_step
from .optimizer_state import OptimizerState
from .overlap import RoundInFlight


class LocalSGD(Strategy):
    """``x_i <- mean over live ranks`` after every step t with ``(t + 1) % tau == 0``.

    Optimizer state stays local unless ``average_optimizer_state`` (like PeriodicModelAverager):
    then every per-parameter state tensor travels behind the model in the round's one Allreduce.
    With ``overlap_rounds`` the round runs behind the next step and is applied one step
    late (ALGORITHMS.md, "Overlapped rounds"; hpcsgd/algorithms/overlap.py). With
    ``average_weights = "samples"`` the mean weighs rank i by the samples it drew since the
    last round: ``x <- sum_i w_i x_i / sum w``.
    """

    name = "local"

    def __init__(self, *args, average_optimizer_state: bool = False, overlap_rounds: bool = False,
                 average_weights: str = "equal", **kwargs):
        super().__init__(*args, **kwargs)
        self.set_average_weights(average_weights)
        if overlap_rounds and average_optimizer_state:
            raise ConfigError("overlap_rounds does not combine with average_optimizer_state "
                              "(the spec delays the model's average only)")
        self.average_optimizer_state = average_optimizer_state
        state = OptimizerState(self.optimizer, self.flat) if average_optimizer_state else None
        self._state = None if state is None or state.empty else state
        self._pack = None  # [x | state segments], allocated at the first round that needs it
        self._prescaled = False  # this round's 1/L already applied by the optimizer step
        self._scales = can_scale(self.optimizer)  # any plain torch SGD (ScalingSGD included)
        self._in_flight = None
        if overlap_rounds:
            self._in_flight = RoundInFlight(self.coll, self.flat.flat, snapshot_in_worker=not self.flat.n_buffers)

    def optimizer_step(self, step: int) -> None:
        """On a round step, the optimizer also multiplies the model by 1/L (prescaled_optimizer_step)."""
        if self._in_flight is not None:
            self._in_flight.wait_snapshot()  # the round in flight has copied x before the step writes it
            super().optimizer_step(step)
        elif self.is_round(step) and self.coll.size > 1 and self._scales and self._state is None:
            prescaled_optimizer_step(self, self.own_share(self.round_weights))
            self._prescaled = True
        else:
            super().optimizer_step(step)

    def after_step(self, step: int) -> None:
        if self._in_flight is not None:
            self._in_flight.finish(self.flat.flat)  # the previous step's round, if any
            if self.is_round(step):
                weights = self.round_weights
                self._in_flight.start(self.flat.flat, lambda work, coll: self._mean_(work, weights, coll))
            return
        if not self.is_round(step):
            return
        weights = self.round_weights
        if self._state is not None:
            self._average_with_state(weights)
            return
        # Parameters and floating buffers travel together in the one flat buffer.
        if self._prescaled:
            self.coll.allreduce_sum(self.flat.flat)
            self._prescaled = False
        else:  # an optimizer that cannot scale (the same on every rank)
            self._mean_(self.flat.flat, weights)

    def _mean_(self, tensor: torch.Tensor, weights, coll=None) -> None:
        """``tensor`` <- its mean over the live ranks, weighted by ``weights`` (None: equal)."""
        coll = self.coll if coll is None else coll
        if weights is None:
            coll.allreduce_mean(tensor)
        else:
            tensor.mul_(self.own_share(weights))
            coll.allreduce_sum(tensor)

    def _average_with_state(self, weights) -> None:
        """The model and every optimizer state segment, averaged by one Allreduce of ``[x | segments]``."""
        state, d = self._state, self.flat.numel
        state.check_scalars(self.coll)  # before anything changes: every rank raises together
        if self._pack is None:
            self._pack = torch.empty((1 + len(state.names)) * d, dtype=self.flat.dtype, device=self.flat.device)
        pack = self._pack
        pack[:d].copy_(self.flat.flat)
        pack[d:].copy_(state.gather().reshape(-1))
        self._mean_(pack, weights)
        self.flat.flat.copy_(pack[:d])
        state.scatter(pack[d:].view(-1, d))

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

    def set_collectives(self, coll) -> None:
        super().set_collectives(coll)
        if self._in_flight is not None:  # flushed before the live ranks changed
            self._in_flight.close()
            self._in_flight = RoundInFlight(coll, self.flat.flat, snapshot_in_worker=not self.flat.n_buffers)

    def close(self) -> None:
        if self._in_flight is not None:
            self._in_flight.close()
