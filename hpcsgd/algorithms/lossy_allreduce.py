"""Gradient sharing over lossy links: the baseline that shows why RPS exchanges models."""

from ..comm import BlockExchange, Collectives, LinkRates
from .base import Strategy


class LossyAllreduce(Strategy):
    """RPS's two-phase block exchange applied every step to the gradients.

    A rank that misses the average of block j uses its own ``g_i[B_j]``; with no drops this
    is sync SGD, with drops the replicas drift, since nothing pulls the models together.
    """

    name = "lossy-allreduce"

    def __init__(self, *args, rates: LinkRates, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.rates = rates
        self.seed = seed
        self.exchange = BlockExchange(self.coll, self.flat.n_params, rates, seed)

    def set_collectives(self, coll: Collectives) -> None:
        super().set_collectives(coll)
        self.exchange = BlockExchange(coll, self.flat.n_params, self.rates, self.seed)

    def reduce_gradients(self, step: int) -> None:
        self.exchange.average(self.flat.grad, step)
