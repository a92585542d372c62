"""RPS, the Reliable Parameter Server: block-wise model averaging over a lossy network."""

from __future__ import annotations

import torch

from ..comm import BlockExchange, LinkRates
from ..comm.exchange import PATHS
from ..errors import ConfigError
from .base import check_int
from .links import LossyLinks
from .periodic import PeriodicStrategy


class RPS(LossyLinks, PeriodicStrategy):
    """RPS: every ``tau`` steps, after the local step, two-phase block averaging of the models.

    A rank whose average for block j was lost keeps its own block (ALGORITHMS.md, RPS). With
    ``average_optimizer_state`` every per-parameter optimizer state tensor, laid out in the
    model's coordinates, goes through the model's own exchange (the same blocks and drop
    masks), counted as bytes but not as rounds of their own. With ``overlap_rounds`` the
    exchange runs behind the next step and the blocks whose average arrived are updated one
    step late (ALGORITHMS.md, "Overlapped rounds"). At drop 0 a round is an Allreduce, and
    its 1/L rides in the optimizer step, as local SGD's. With ``average_weights = "samples"``
    each block's average over the arrived set ``N_j`` weighs rank i by ``w_i / sum_{k in N_j} w_k``,
    ``w_i`` the samples it drew since the last round.

    Args:
        tau: steps between rounds, >= 1.
        drop_rate: probability in [0, 1) that a block message is lost (every link).
        rates: per-link rates from :func:`hpcsgd.link_rates` instead of ``drop_rate``.
        seed: seeds the drop masks (the same on every rank).
        average_optimizer_state: exchange every per-parameter optimizer state tensor through the
            model's blocks and masks (SGD momentum, Adam moments, ...).
        overlap_rounds: run each round behind the next step (applied one step late; see flush()).
        average_weights: ``"equal"`` or ``"samples"``: each block's average weighs the ranks whose
            block arrived by the samples they drew since the last round (pass ``step(samples=n)``).
        exchange: the block exchange's path (hpcsgd/comm/exchange.py): ``"auto"`` (shared-memory
            on one node, node-aware across nodes), ``"alltoallv"``, ``"shared-memory"``, ``"node-aware"``.
        ranks_per_node: nodes of that many ranks for the exchange (simulated nodes on one
            machine; 0: as the ranks share memory).
        collectives: the comm layer (default: built from ``world``).
        network: an emulated network from :func:`hpcsgd.link_network`.

    Example::

        world = hpcsgd.init()
        strategy = hpcsgd.RPS(model, opt, world, tau=1, drop_rate=0.1, seed=0)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            strategy.step()  # local step, then block averaging; lost blocks keep their own values
    """

    name = "rps"

    def __init__(self, model, optimizer, world, *, drop_rate: float = 0.0, rates: LinkRates | None = None,
                 seed: int = 0, exchange: str = "auto", ranks_per_node: int = 0, **kwargs):
        self.take_links(world, drop_rate, rates, seed)
        if exchange not in PATHS:
            raise ConfigError(f"exchange must be one of {', '.join(PATHS)}, got {exchange!r}")
        self.exchange_choice = exchange
        self.ranks_per_node = check_int("ranks_per_node", ranks_per_node, 0)
        super().__init__(model, optimizer, world, **kwargs)
        self._build_exchange()

    def _build_exchange(self) -> None:
        if self._in_flight is not None:
            # The exchange lives on the round's own layer, used only by its thread. On one node
            # it takes messages: a shared window's copies are CPU work on the cores the step
            # needs, where a message leaves them free while it travels. Across nodes the
            # node-aware path, whose node sums halve what crosses the network.
            path = "alltoallv" if self.exchange_choice == "shared-memory" else self.exchange_choice
            self.exchange = BlockExchange(self._in_flight.coll, self.flat.numel, self.rates, self.seed,
                                          path=path, ranks_per_node=self.ranks_per_node, one_node_window=False)
        else:
            self.exchange = BlockExchange(self.coll, self.flat.numel, self.rates, self.seed, path=self.exchange_choice,
                                          ranks_per_node=self.ranks_per_node)

    def set_collectives(self, coll) -> None:
        super().set_collectives(coll)
        self._build_exchange()  # the cut adapts

    def prescalable(self) -> bool:
        return self.exchange.path == "allreduce"

    def averaged_spans(self, step: int) -> list[tuple[int, int]]:
        return self.exchange.received_spans(step)

    def average_(self, x: torch.Tensor, step: int, coll, prescaled: bool = False, weights=None) -> None:
        if self._state is not None:
            self._average_state(step, weights)  # first: a refused state leaves the model as it was on every rank
        # A prescaled model already carries each rank's share: its round is a plain sum.
        self.exchange.average(x, step, prescaled=prescaled, weights=None if prescaled else weights)

    def _average_state(self, step: int, weights=None) -> None:
        """Each state segment through the model's exchange at ``step``: its blocks, its masks, its weights."""
        segments = self._state.gather()
        for row in segments:
            self.exchange.average(row, step, count_round=False, weights=weights)
        self._state.scatter(segments)


__all__ = ["RPS"]
