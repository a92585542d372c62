"""Local SGD and RI-SGD: local steps, model averaging every ``tau`` steps.

RI-SGD is this strategy run on a q-redundant data assignment; redundancy lives entirely in
the data layer, so the communication pattern is local SGD's.
"""

from ..optim import can_scale, scaled_sgd_step
from .base import Strategy, average_momentum


class LocalSGD(Strategy):
    """``x_i <- mean over live ranks`` after every step t with ``(t + 1) % tau == 0``.

    Momentum stays local unless ``average_optimizer_state`` (like PeriodicModelAverager).
    """

    name = "local"

    def __init__(self, *args, average_optimizer_state: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.average_optimizer_state = average_optimizer_state
        self._prescaled = False  # this round's 1/L already applied by the optimizer step
        self._scales = can_scale(self.optimizer)  # any plain torch SGD (ScalingSGD included)

    def optimizer_step(self, step: int) -> None:
        """On a round step, the optimizer also multiplies the model by 1/L in the same pass.

        The average is then a bare Allreduce: no extra pass over the model after it (that
        pass was most of the gap between an averaging round and a raw Allreduce).
        A rank skipping a non-finite step takes no optimizer step but still scales, so that
        it contributes its current model to a sum every rank has scaled alike.
        """
        size = self.coll.size
        if not (self.is_round(step) and size > 1 and self._scales):
            super().optimizer_step(step)
            return
        if self.contributes():
            scaled_sgd_step(self.optimizer, 1.0 / size)
            self.flat.buffers.mul_(1.0 / size)  # floating buffers (BatchNorm statistics) are averaged too
        else:
            self.flat.flat.mul_(1.0 / size)
        self._prescaled = True

    def after_step(self, step: int) -> None:
        if not self.is_round(step):
            return
        # Parameters and floating buffers travel together in the one flat buffer.
        if self._prescaled:
            self.coll.allreduce_sum(self.flat.flat)
            self._prescaled = False
        else:  # an optimizer that cannot scale (the same on every rank)
            self.coll.allreduce_mean(self.flat.flat)
        if self.average_optimizer_state:
            average_momentum(self.optimizer, lambda v: self.coll.allreduce_mean(v, tag="momentum", count_round=False))
