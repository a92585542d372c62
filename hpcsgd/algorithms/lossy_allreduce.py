"""Gradient sharing over lossy links: the baseline that shows why RPS exchanges models."""

from __future__ import annotations

from ..comm import BlockExchange, LinkRates
from .base import Strategy
from .links import LossyLinks


class LossyAllreduce(LossyLinks, Strategy):
    """Gradient averaging by RPS's two-phase block exchange every step: the baseline without model averaging.

    A rank that misses the average of block j uses its own ``g_i[B_j]``; with no drops this
    is sync SGD, with drops the replicas drift, since nothing pulls the models together.
    Floating buffers (BatchNorm statistics) go through the same exchange, packed behind the
    gradients. What a rank skipping a non-finite step sends counts in no average (where an
    average is lost it keeps its own values: a zero gradient, its own buffers); every rank
    then steps with what it has.

    Args:
        drop_rate: probability in [0, 1) that a block message is lost.
        rates: per-link rates from :func:`hpcsgd.link_rates` instead of ``drop_rate``.
        seed: seeds the drop masks.
        collectives: the comm layer (default: built from ``world``).
        network: an emulated network from :func:`hpcsgd.link_network`.

    Example::

        world = hpcsgd.init()
        strategy = hpcsgd.LossyAllreduce(model, opt, world, drop_rate=0.1, seed=0)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            strategy.step()  # gradient blocks averaged over the links that delivered
    """

    name = "lossy-allreduce"
    flat_grad = True

    def __init__(self, model, optimizer, world, *, drop_rate: float = 0.0, rates: LinkRates | None = None,
                 seed: int = 0, **kwargs):
        self.take_links(world, drop_rate, rates, seed)
        super().__init__(model, optimizer, world, **kwargs)
        self.exchange = BlockExchange(self.coll, self.flat.numel, self.rates, self.seed)

    def set_collectives(self, coll) -> None:
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


__all__ = ["LossyAllreduce"]
