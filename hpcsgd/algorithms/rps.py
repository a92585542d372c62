"""RPS, the Reliable Parameter Server: block-wise model averaging over a lossy network."""

from ..comm import BlockExchange, Collectives, LinkRates
from ..errors import ConfigError
from ..optim import can_scale
from .base import Strategy, prescaled_optimizer_step
from .optimizer_state import OptimizerState
from .overlap import RoundInFlight


class RPS(Strategy):
    """Every ``tau`` steps, after the local step, two-phase block averaging of the models.

    A rank whose average for block j was lost keeps its own block (ALGORITHMS.md, RPS).
    With ``average_optimizer_state`` every per-parameter optimizer state tensor, laid out in
    the model's coordinates, goes through the model's own exchange (the same blocks and drop
    masks), counted as bytes but not as rounds of their own. With ``overlap_rounds`` the exchange
    runs behind the next step and the blocks whose average arrived are updated one step late
    (ALGORITHMS.md, "Overlapped rounds"). With ``average_weights = "samples"`` each block's
    average over the arrived set ``N_j`` weighs rank i by ``w_i / sum_{k in N_j} w_k``, ``w_i``
    the samples it drew since the last round.
    """

    name = "rps"

    def __init__(self, *args, rates: LinkRates, seed: int, average_optimizer_state: bool = False,
                 overlap_rounds: bool = False, average_weights: str = "equal", **kwargs):
        super().__init__(*args, **kwargs)
        self.set_average_weights(average_weights)
        if overlap_rounds and average_optimizer_state:
            raise ConfigError("overlap_rounds does not combine with average_optimizer_state "
                              "(the spec delays the model's average only)")
        self.rates = rates
        self.seed = seed
        self.average_optimizer_state = average_optimizer_state
        state = OptimizerState(self.optimizer, self.flat) if average_optimizer_state else None
        self._state = None if state is None or state.empty else state
        self.overlap_rounds = overlap_rounds
        self._in_flight = None
        self._prescaled = False  # this round's 1/L already applied by the optimizer step
        self._scales = can_scale(self.optimizer)
        self._build_exchanges()

    def _build_exchanges(self) -> None:
        if self.overlap_rounds:
            # The exchange lives on the round's own communicator, used only by its thread.
            if self._in_flight is not None:
                self._in_flight.close()
            self._in_flight = RoundInFlight(self.coll, self.flat.flat, snapshot_in_worker=not self.flat.n_buffers)
            # Message path: its waits can poll (the shared-memory path's fences block and spin).
            self.exchange = BlockExchange(self._in_flight.coll, self.flat.numel, self.rates, self.seed,
                                          path="alltoallv")
        else:
            self.exchange = BlockExchange(self.coll, self.flat.numel, self.rates, self.seed)

    def set_collectives(self, coll: Collectives) -> None:
        super().set_collectives(coll)
        self._build_exchanges()  # the cut adapts

    def _average_state(self, step: int, weights) -> None:
        """Each state segment through the model's exchange at ``step``: its blocks, its masks, its weights."""
        self._state.check_scalars(self.coll)
        segments = self._state.gather()
        for row in segments:
            self.exchange.average(row, step, count_round=False, weights=weights)
        self._state.scatter(segments)

    def optimizer_step(self, step: int) -> None:
        """At drop 0 a round is an Allreduce, and its 1/L rides in the optimizer step, as local SGD's."""
        if self._in_flight is not None:
            self._in_flight.wait_snapshot()  # the round in flight has copied x before the step writes it
            super().optimizer_step(step)
        elif self.exchange.path == "allreduce" and self.is_round(step) and self.coll.size > 1 and self._scales:
            prescaled_optimizer_step(self, self.own_share(self.round_weights))
            self._prescaled = True
        else:
            super().optimizer_step(step)

    def after_step(self, step: int) -> None:
        if self._in_flight is not None:
            self._start_overlapped(step)
            return
        if not self.is_round(step):
            return
        weights = self.round_weights
        if self._state is not None:
            self._average_state(step, weights)  # first: a refused state leaves the model as it was on every rank
        if self._prescaled:  # each rank's share already rode in its optimizer step
            weights = None
        self.exchange.average(self.flat.flat, step, prescaled=self._prescaled, weights=weights)
        self._prescaled = False

    def _start_overlapped(self, step: int) -> None:
        """Apply the previous step's round; start this step's, if it is a round step."""
        self._in_flight.finish(self.flat.flat)
        if not self.is_round(step):
            return
        exchange = self.exchange  # a skipping rank contributes its current model, as without overlap
        weights = self.round_weights
        self._in_flight.start(self.flat.flat, lambda work, coll: exchange.average(work, step, weights=weights),
                              exchange.received_spans(step))

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
        if self._in_flight is not None:
            self._in_flight.close()
