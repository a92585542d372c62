"""RPS, the Reliable Parameter Server: block-wise model averaging over a lossy network."""

from ..comm import BlockExchange, Collectives, LinkRates
from .base import Strategy, average_momentum


class RPS(Strategy):
    """Every ``tau`` steps, after the local step, two-phase block averaging of the models.

    A rank whose average for block j was lost keeps its own block (ALGORITHMS.md, RPS).
    With ``average_optimizer_state`` the momentum buffers go through the same lossy
    exchange, in the same messages as the model's blocks (the same drop masks), so they are
    counted as bytes but not as rounds of their own.
    """

    name = "rps"

    def __init__(self, *args, rates: LinkRates, seed: int, average_optimizer_state: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.rates = rates
        self.seed = seed
        self.average_optimizer_state = average_optimizer_state
        self._build_exchanges()

    def _build_exchanges(self) -> None:
        self.exchange = BlockExchange(self.coll, self.flat.numel, self.rates, self.seed)
        self._momentum_exchange = None  # built at first use: momentum buffers appear with the first step

    def set_collectives(self, coll: Collectives) -> None:
        super().set_collectives(coll)
        self._build_exchanges()  # the cut adapts

    def _average_momentum(self, vector, step: int) -> None:
        if self._momentum_exchange is None or self._momentum_exchange.numel != vector.numel():
            self._momentum_exchange = BlockExchange(self.coll, vector.numel(), self.rates, self.seed)
        self._momentum_exchange.average(vector, step, count_round=False)

    def after_step(self, step: int) -> None:
        if not self.is_round(step):
            return
        self.exchange.average(self.flat.flat, step)
        if self.average_optimizer_state:
            average_momentum(self.optimizer, lambda v: self._average_momentum(v, step))
