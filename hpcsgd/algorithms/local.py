"""Local SGD and RI-SGD: local steps, model averaging every ``tau`` steps.

RI-SGD is this strategy run on a q-redundant data assignment; redundancy lives entirely in
the data layer, so the communication pattern is local SGD's.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .allreduce_option import AllreduceOption
from .periodic import PeriodicStrategy


class LocalSGD(AllreduceOption, PeriodicStrategy):
    """Local SGD (RI-SGD on a redundant sampler): ``x_i <- mean over live ranks`` every ``tau`` steps.

    Where the optimizer is a plain ``torch.optim.SGD``, a round's ``1/L`` rides in the
    optimizer step and the average is one bare Allreduce. Optimizer state stays local unless
    ``average_optimizer_state`` (like PeriodicModelAverager): then every per-parameter state
    tensor travels behind the model in the round's one Allreduce. With ``overlap_rounds`` the
    round runs behind the next step and is applied one step late (ALGORITHMS.md, "Overlapped
    rounds"; hpcsgd/algorithms/overlap.py). With ``average_weights = "samples"`` the mean
    weighs rank i by the samples it drew since the last round: ``x <- sum_i w_i x_i / sum w``.

    Args:
        tau: steps between averaging rounds, >= 1.
        average_optimizer_state: average every per-parameter optimizer state tensor with the model
            (SGD momentum, Adam moments, ...; refused, by name, where it cannot be).
        overlap_rounds: run each round behind the next step (applied one step late; see flush()).
        average_weights: ``"equal"`` (1/L) or ``"samples"``: a round weighs each rank by the
            samples it drew since the last one (pass ``step(samples=n)``; unequal batches).
        allreduce: ``"library"`` (the MPI library's Allreduce), ``"node-aware"`` (reduce in
            each node, across nodes, bcast in each node; rounding differs from the library's) or
            ``"nonblocking"`` (the library's Iallreduce; may round differently from its Allreduce).
        ranks_per_node: nodes of that many ranks for the node-aware Allreduce (0: as they share memory).
        collectives: the comm layer (default: built from ``world``).
        network: an emulated network from :func:`hpcsgd.link_network`.

    Example::

        world = hpcsgd.init()
        strategy = hpcsgd.LocalSGD(model, opt, world, tau=8)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            strategy.step()  # a local step; every 8th also averages the models
    """

    name = "local"

    def __init__(self, model, optimizer, world, *, allreduce: str = "library", ranks_per_node: int = 0, **options):
        self.take_allreduce(allreduce, ranks_per_node)
        if allreduce == "node-aware" and options.get("overlap_rounds"):
            raise ConfigError(f"allreduce {allreduce!r} sums blocking rounds: overlapped rounds (overlap_rounds) "
                              "go by the library's Allreduce on their own thread")
        super().__init__(model, optimizer, world, **options)
        self.coll.use_allreduce(self.allreduce, self.ranks_per_node)
        self._pack = None  # [x | state segments], allocated at the first round that needs it

    def prescalable(self) -> bool:
        return self._state is None  # with optimizer state the round is one Allreduce of [x | state]

    def average_(self, x: torch.Tensor, step: int, coll, prescaled: bool = False, weights=None) -> None:
        # Parameters and floating buffers travel together in the one flat buffer.
        if self._state is not None:
            self._average_with_state(coll, weights)
        elif prescaled:  # each rank's 1/L (or w_i / sum w) rode in its optimizer step
            coll.allreduce_sum_(x)
        else:  # an optimizer that cannot scale (the same on every rank), or an overlapped round
            self._mean_(x, weights, coll)

    def _mean_(self, tensor: torch.Tensor, weights, coll) -> None:
        """``tensor`` <- its mean over the live ranks, weighted by ``weights`` (None: equal)."""
        if weights is None:
            coll.allreduce_mean_(tensor)
        else:  # x <- sum_i w_i x_i / sum w
            tensor.mul_(self.own_share(weights))
            coll.allreduce_sum_(tensor)

    def _average_with_state(self, coll, weights=None) -> None:
        """The model and every optimizer state segment, averaged by one Allreduce of ``[x | segments]``."""
        state, d = self._state, self.flat.numel
        if self._pack is None:
            self._pack = torch.empty((1 + len(state.names)) * d, dtype=self.flat.dtype, device=self.flat.device)
        pack = self._pack
        pack[:d].copy_(self.flat.flat)
        pack[d:].copy_(state.gather().reshape(-1))
        self._mean_(pack, weights, coll)
        self.flat.flat.copy_(pack[:d])
        state.scatter(pack[d:].view(-1, d))


__all__ = ["LocalSGD"]
