"""RPS, the Reliable Parameter Server: block-wise model averaging over a lossy network."""

from ..comm import BlockExchange, Collectives, LinkRates
from .base import Strategy, average_momentum


class RPS(Strategy):
    """Every ``tau`` steps, after the local step, two-phase block averaging of the models.

    A rank whose average for block j was lost keeps its own block (ALGORITHMS.md, RPS).
    """

    name = "rps"

    def __init__(self, *args, rates: LinkRates, seed: int, average_optimizer_state: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.rates = rates
        self.seed = seed
        self.average_optimizer_state = average_optimizer_state
        self.exchange = BlockExchange(self.coll, self.flat.numel, rates, seed)

    def set_collectives(self, coll: Collectives) -> None:
        super().set_collectives(coll)
        self.exchange = BlockExchange(coll, self.flat.numel, self.rates, self.seed)  # the cut adapts

    def after_step(self, step: int) -> None:
        if not self.is_round(step):
            return
        self.exchange.average(self.flat.flat, step)
        if self.average_optimizer_state:
            average_momentum(self.coll, self.optimizer)
