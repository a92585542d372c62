"""Gradient sharing over lossy links: the baseline that shows why RPS exchanges models."""

from ..comm import BlockExchange, Collectives, LinkRates
from .base import Strategy


class LossyAllreduce(Strategy):
    """RPS's two-phase block exchange applied every step to the gradients.

    A rank that misses the average of block j uses its own ``g_i[B_j]``; with no drops this
    is sync SGD, with drops the replicas drift, since nothing pulls the models together.
    Floating buffers (BatchNorm statistics) go through the same exchange, packed behind the
    gradients. What a rank skipping a non-finite step sends counts in no average (where an
    average is lost it keeps its own values: a zero gradient, its own buffers); every rank
    then steps with what it has.
    """

    name = "lossy-allreduce"

    def __init__(self, *args, rates: LinkRates, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.rates = rates
        self.seed = seed
        self.exchange = BlockExchange(self.coll, self.flat.numel, rates, seed)

    def set_collectives(self, coll: Collectives) -> None:
        super().set_collectives(coll)
        self.exchange = BlockExchange(coll, self.flat.numel, self.rates, self.seed)

    def reduce_gradients(self, step: int) -> None:
        self.flat.adopt_grads()  # a no-op unless the user's zero_grad set gradients to None
        self.flat.pack_buffers()
        self.exchange.average(self.flat.packed, step, contributors=self.contributors)
        self.flat.unpack_buffers()

    def optimizer_step(self, step: int) -> None:
        if self.contributor_count() > 0:
            self.optimizer.step()
