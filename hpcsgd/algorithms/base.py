"""The interface every strategy implements (one job each, like torch's model averagers)."""

from __future__ import annotations

import numpy as np
import torch

from ..comm import Collectives, FlatParams
from ..optim import scaled_sgd_step


class Strategy:
    """Decides when and how ranks communicate around each optimizer step.

    The training loop calls, every step ``t``: backward, ``reduce_gradients(t)``,
    ``optimizer_step(t)``, ``after_step(t)``. Under ``nan_policy = skip`` it first sets
    :attr:`contributors` (which live ranks had a finite loss this step), and the strategy
    decides what a skipping rank does (ALGORITHMS.md, "Non-finite steps"): by default it
    takes no optimizer step and contributes its current model. Strategies talk to MPI only
    through ``coll``.
    """

    name = "base"

    def __init__(self, coll: Collectives, flat: FlatParams, optimizer: torch.optim.Optimizer, *, tau: int = 1):
        self.coll = coll
        self.flat = flat
        self.optimizer = optimizer
        self.tau = tau
        self.contributors: np.ndarray | None = None  # bool per live rank; None: every rank
        # Inside the public no_sync(): backward passes only accumulate (gradient-sharing strategies).
        self.accumulating = False

    def contributes(self) -> bool:
        """Whether this rank's own update counts this step (its loss was finite)."""
        return self.contributors is None or bool(self.contributors[self.coll.rank])

    def contributor_count(self) -> int:
        """How many live ranks contribute this step."""
        return self.coll.size if self.contributors is None else int(self.contributors.sum())

    def reduce_gradients(self, step: int) -> None:
        """Between backward and the optimizer step (gradient-sharing strategies)."""

    def optimizer_step(self, step: int) -> None:
        """The optimizer's step (a strategy may fold its own scaling into it); none when skipping."""
        if self.contributes():
            self.optimizer.step()

    def after_step(self, step: int) -> None:
        """After the optimizer step (model-averaging strategies)."""

    def is_round(self, step: int) -> bool:
        """Whether step ``step`` ends with a model-averaging round."""
        return (step + 1) % self.tau == 0

    def set_collectives(self, coll: Collectives) -> None:
        """Continue on a new set of live ranks (after a crash-stop failure)."""
        self.coll = coll

    def wait_snapshot(self) -> None:
        """Return once an overlapped round in flight has copied the model (at once otherwise).

        Whatever writes the model between steps calls it first (ALGORITHMS.md, "Overlapped rounds").
        """

    def round_state(self) -> dict | None:
        """The overlapped round in flight as checkpoint data (None: none is), without applying it."""
        return None

    def load_round_state(self, state: dict | None) -> None:
        """Take back a round in flight saved by :meth:`round_state`; it is applied after the next step."""
        if state is not None:
            raise ValueError(f"a {self.name} strategy without overlapped rounds cannot resume a round in flight")

    def flush(self) -> None:
        """Complete and apply a round still in flight (overlapped rounds; collective).

        Called before anything reads or saves the model as a whole: a checkpoint, the end of
        training, a change of the live ranks.
        """

    def close(self) -> None:
        """Release hooks or buffers the strategy holds on the model."""


def prescaled_optimizer_step(strategy: Strategy) -> None:
    """The optimizer step that also multiplies the model by ``1/L`` in the same pass.

    The round's average is then a bare Allreduce of the sum: no extra pass over the model
    after it (that pass was most of the gap between an averaging round and a raw Allreduce).
    A rank skipping a non-finite step takes no optimizer step but still scales, so that it
    contributes its current model to a sum every rank has scaled alike. For a power-of-two
    ``L`` the result is bit for bit the plain step followed by ``(1/L) * sum``.
    """
    scale = 1.0 / strategy.coll.size
    if strategy.contributes():
        scaled_sgd_step(strategy.optimizer, scale)
        strategy.flat.buffers.mul_(scale)  # floating buffers (BatchNorm statistics) are averaged too
    else:
        strategy.flat.flat.mul_(scale)
