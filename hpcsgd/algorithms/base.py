"""The interface every strategy implements (one job each, like torch's model averagers)."""

from __future__ import annotations

import numpy as np
import torch

from ..comm import Collectives, FlatParams
from ..errors import ConfigError
from ..optim import scaled_sgd_step

AVERAGE_WEIGHTS = ("equal", "samples")  # ALGORITHMS.md, "Fractional and per-rank redundancy"


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
        self.average_weights = "equal"  # model-averaging strategies: "samples" weighs each rank by its draws
        self.samples_since_round = 0  # this rank's w_i so far (counted under "samples" only)
        self.round_weights: np.ndarray | None = None  # the coming round's w_i per live rank (None: equal)

    def set_average_weights(self, mode: str) -> None:
        """``"equal"`` (1/L) or ``"samples"`` (w_i / sum w: the samples each rank drew since the last round)."""
        if mode not in AVERAGE_WEIGHTS:
            raise ConfigError(f"average_weights must be one of {', '.join(AVERAGE_WEIGHTS)}, got {mode!r}")
        self.average_weights = mode

    def count_samples(self, step: int, n: int) -> None:
        """Step ``step`` drew ``n`` samples on this rank (they weigh its model at the next round).

        Called before the step's exchange. On a round step under "samples" the ranks agree on
        the round's weights here (collective), before the optimizer step: the wait for a slower
        rank falls into the step's communication, not into its compute.
        """
        if self.average_weights != "samples":
            return
        self.samples_since_round += int(n)
        if self.is_round(step):
            self.round_weights = self.take_round_weights()

    def take_round_weights(self) -> np.ndarray | None:
        """The round's ``w_i`` per live rank (collective under "samples"), and a fresh count.

        None where every rank weighs the same (``"equal"``, or equal draws): the round then
        takes the equal-weight path itself, so equal batches give "equal"'s bits.
        """
        if self.average_weights == "equal":
            return None
        mine = np.zeros(self.coll.size)
        mine[self.coll.rank] = self.samples_since_round  # a sum of one-hot vectors: every rank's count, exact
        self.samples_since_round = 0
        weights = self.coll.sum_float64(mine)
        return None if np.all(weights == weights[0]) else weights

    def own_share(self, weights: np.ndarray | None) -> float:
        """This rank's coefficient in the round's average: ``w_i / sum w`` (``1/L`` when equal)."""
        if weights is None or not weights.sum() > 0:
            return 1.0 / self.coll.size
        return float(weights[self.coll.rank] / weights.sum())

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


def prescaled_optimizer_step(strategy: Strategy, scale: float | None = None) -> None:
    """The optimizer step that also multiplies the model by ``1/L`` (or ``scale``: this rank's
    weight ``w_i / sum w``) in the same pass.

    The round's average is then a bare Allreduce of the sum: no extra pass over the model
    after it (that pass was most of the gap between an averaging round and a raw Allreduce).
    A rank skipping a non-finite step takes no optimizer step but still scales, so that it
    contributes its current model to a sum every rank has scaled alike. For a power-of-two
    ``L`` the result is bit for bit the plain step followed by ``(1/L) * sum``.
    """
    scale = 1.0 / strategy.coll.size if scale is None else scale
    if strategy.contributes():
        scaled_sgd_step(strategy.optimizer, scale)
        strategy.flat.buffers.mul_(scale)  # floating buffers (BatchNorm statistics) are averaged too
    else:
        strategy.flat.flat.mul_(scale)
