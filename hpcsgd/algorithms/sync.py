"""Synchronous SGD: average the flat gradient every step by one Allreduce."""

from .base import Strategy


class SyncSGD(Strategy):
    """``g = (1/P) sum_i g_i`` before every optimizer step; replicas stay identical."""

    name = "sync"

    def reduce_gradients(self, step: int) -> None:
        self.coll.allreduce_mean(self.flat.grad, tag="grad")
