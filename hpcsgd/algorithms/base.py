"""The interface every strategy implements (one job each, like torch's model averagers)."""

from __future__ import annotations

import torch

from ..comm import Collectives, FlatParams


class Strategy:
    """Decides when and how ranks communicate around each optimizer step.

    The training loop calls, every step ``t``: backward, ``reduce_gradients(t)``,
    ``optimizer_step(t)`` (skipped when the loss was not finite), ``after_step(t)``.
    Strategies talk to MPI only through ``coll``.
    """

    name = "base"

    def __init__(self, coll: Collectives, flat: FlatParams, optimizer: torch.optim.Optimizer, *, tau: int = 1):
        self.coll = coll
        self.flat = flat
        self.optimizer = optimizer
        self.tau = tau

    def reduce_gradients(self, step: int) -> None:
        """Between backward and the optimizer step (gradient-sharing strategies)."""

    def optimizer_step(self, step: int) -> None:
        """The optimizer's step (a strategy may fold its own scaling into it)."""
        self.optimizer.step()

    def after_step(self, step: int) -> None:
        """After the optimizer step (model-averaging strategies)."""

    def is_round(self, step: int) -> bool:
        """Whether step ``step`` ends with a model-averaging round."""
        return (step + 1) % self.tau == 0

    def set_collectives(self, coll: Collectives) -> None:
        """Continue on a new set of live ranks (after a crash-stop failure)."""
        self.coll = coll

    def close(self) -> None:
        """Release hooks or buffers the strategy holds on the model."""


def average_momentum(coll: Collectives, optimizer: torch.optim.Optimizer) -> None:
    """Average SGD momentum buffers over the live ranks in one packed Allreduce."""
    buffers = [
        state["momentum_buffer"]
        for state in optimizer.state.values()
        if state.get("momentum_buffer") is not None
    ]
    if not buffers:
        return
    packed = torch.cat([b.reshape(-1) for b in buffers])
    coll.allreduce_mean(packed, tag="momentum")
    offset = 0
    for b in buffers:
        n = b.numel()
        b.copy_(packed[offset : offset + n].view_as(b))
        offset += n
