"""Local SGD and RI-SGD: local steps, model averaging every ``tau`` steps.

RI-SGD is this strategy run on a q-redundant data assignment; redundancy lives entirely in
the data layer, so the communication pattern is local SGD's.
"""

from .base import Strategy, average_momentum


class LocalSGD(Strategy):
    """``x_i <- mean over live ranks`` after every step t with ``(t + 1) % tau == 0``.

    Momentum stays local unless ``average_optimizer_state`` (like PeriodicModelAverager).
    """

    name = "local"

    def __init__(self, *args, average_optimizer_state: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.average_optimizer_state = average_optimizer_state

    def after_step(self, step: int) -> None:
        if not self.is_round(step):
            return
        # Parameters and floating buffers travel together in the one flat buffer.
        self.coll.allreduce_mean(self.flat.flat)
        if self.average_optimizer_state:
            average_momentum(self.coll, self.optimizer)
