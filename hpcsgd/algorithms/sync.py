"""Synchronous SGD: average the flat gradient every step.

By default the average overlaps the backward pass, as PyTorch DDP does: the flat gradient is
cut into buckets of about ``bucket_mb`` megabytes in reverse parameter order (the order
backward produces them), and each bucket's nonblocking Allreduce starts from a gradient hook
as soon as its last gradient is accumulated. Later hooks poke the outstanding requests, so an
MPI without a progress thread still moves them while backward runs.

Gradient accumulation (ALGORITHMS.md, "Gradient accumulation and edits after averaging"):
while :attr:`SyncSGD.accumulating` is set (the public ``no_sync()``) the hooks start nothing,
so the next backward outside it averages the accumulated gradient. A second gradient for a
parameter in one step outside ``no_sync()``, or a backward after the step's average was
completed, raises instead of averaging a gradient that is still being written.

Floating buffers (BatchNorm running statistics) ride in the first bucket, packed behind the
gradients (``FlatParams.packed``): they are final once forward has run, and averaging them
every step keeps the replicas identical (consensus distance 0). A rank that skips a
non-finite step sends zeros and the mean is over the ranks that contributed; every rank then
applies the same averaged step.
"""

from __future__ import annotations

import torch

from ..comm.collectives import AverageRequest
from ..errors import ConfigError
from .allreduce_option import AllreduceOption
from .base import Strategy

DEFAULT_BUCKET_MB = 25.0
# The first bucket (the last layers, whose gradients come first) is capped lower, as DDP's
# (1 MiB): its Allreduce then starts early in backward instead of after the whole model for a
# model smaller than one bucket (ResNet-20: 1.1 MB).
FIRST_BUCKET_MB = 1.048576


class SyncSGD(AllreduceOption, Strategy):
    """Synchronous SGD: ``g = (1/P) sum_i g_i`` before every optimizer step; replicas stay identical.

    Args:
        overlap: start bucket Allreduces from gradient hooks while backward runs (like DDP).
        bucket_mb: bucket size in megabytes.
        allreduce: ``"library"`` or ``"node-aware"`` (reduce in each node, across nodes, bcast in
            each node; rounding differs from the library's): needs ``overlap=False``, whose one
            blocking Allreduce per step it replaces (buckets go by the library's Iallreduce);
            or ``"nonblocking"``: that one Allreduce by the library's Iallreduce (may round
            differently from the blocking call; overlapped buckets use it anyway).
        ranks_per_node: nodes of that many ranks for the node-aware Allreduce (0: as they share memory).
        collectives: the comm layer (default: built from ``world``).
        network: an emulated network from :func:`hpcsgd.link_network`.

    Example::

        world = hpcsgd.init()
        strategy = hpcsgd.SyncSGD(model, opt, world)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()  # bucket averages start during backward
            strategy.step()  # wait for them, then the optimizer step
    """

    name = "sync"
    flat_grad = True

    def __init__(self, model, optimizer, world, *, overlap: bool = True, bucket_mb: float = DEFAULT_BUCKET_MB,
                 allreduce: str = "library", ranks_per_node: int = 0, **kwargs):
        if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not bucket_mb > 0:
            raise ConfigError(f"bucket_mb must be a number > 0, got {bucket_mb!r}")
        self.take_allreduce(allreduce, ranks_per_node)
        if allreduce == "node-aware" and overlap:
            raise ConfigError(f"allreduce {allreduce!r} sums sync's one blocking Allreduce per step: give overlap=False "
                              "(--no-overlap); overlapped buckets go by the library's Iallreduce")
        super().__init__(model, optimizer, world, **kwargs)
        self.coll.use_allreduce(self.allreduce, self.ranks_per_node)
        self.overlap = bool(overlap)
        self._buckets: list[tuple[int, int]] = []  # [lo, hi) ranges of the flat gradient
        self._pending: list[int] = []  # gradients still to come, per bucket
        self._requests: dict[int, AverageRequest] = {}
        self._hooks = []
        self._fired: set[int] = set()  # parameters whose gradient hook fired this step (outside no_sync)
        self._averaged = False  # this step's average is complete: no backward may write the gradient now
        if self.overlap:
            self._build_buckets(float(bucket_mb))

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """The ``[lo, hi)`` ranges of the packed gradient, one Iallreduce each, in the order they start."""
        return list(self._buckets)

    def _build_buckets(self, bucket_mb: float) -> None:
        itemsize = self.flat.grad.element_size()
        limit = max(1, int(min(bucket_mb, FIRST_BUCKET_MB) * 1e6 / itemsize))  # the first bucket's
        params = self.flat.parameters
        offsets = self.flat.param_offsets
        bucket_of: dict[int, int] = {}
        hi, count, size = self.flat.numel, 0, 0  # the first bucket also carries the buffers
        # Walk parameters backwards: contiguous ranges of the flat buffer, filled in the
        # order autograd finishes them.
        for index in reversed(range(len(params))):
            lo, end = offsets[index], offsets[index + 1]
            if hi is None:
                hi = end
            size += end - lo
            count += 1
            bucket_of[index] = len(self._buckets)
            if size >= limit or index == 0:
                self._buckets.append((lo, hi))
                self._pending.append(count)
                hi, count, size = None, 0, 0
                limit = max(1, int(bucket_mb * 1e6 / itemsize))
        self._counts = list(self._pending)
        for index, p in enumerate(params):
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(bucket_of[index], index)))
            else:
                self._counts[bucket_of[index]] -= 1  # never produces a gradient
        self._pending = list(self._counts)

    def _make_hook(self, bucket: int, index: int):
        def hook(_param: torch.Tensor) -> None:
            self.flat.adopt_grad(index)  # a no-op unless the user's zero_grad set it to None
            if self.accumulating or index in self._fired or self._averaged:
                self._check_accumulation(bucket, index)
                return
            self._fired.add(index)
            self._pending[bucket] -= 1
            if self._pending[bucket] == 0:
                self._start(bucket)
            for request in self._requests.values():  # progress for MPIs without a thread
                request.test()

        return hook

    def _check_accumulation(self, bucket: int, index: int) -> None:
        """A hook inside ``no_sync()`` (accumulate only), or one that would corrupt a running average."""
        if self._averaged:
            raise RuntimeError("a backward pass after synchronize() and before step(): the averaged gradient "
                               "would change under the optimizer; call step() first")
        if bucket in self._requests:
            raise RuntimeError(
                "a second backward pass in one step writes a gradient that is already being averaged: "
                "run every backward but the last of a step inside strategy.no_sync() (as with DDP)"
                if not self.accumulating else
                "a backward pass inside no_sync() after one outside it in the same step: the average has "
                "started; run the no_sync() backward passes first, the last one outside it")
        if not self.accumulating:  # fired twice, its bucket not started yet: the count would be wrong
            raise RuntimeError("a parameter got two gradients in one step outside strategy.no_sync(): "
                               "run every backward but the last of a step inside no_sync() (as with DDP)")

    def _start(self, bucket: int) -> None:
        lo, hi = self._buckets[bucket]
        if hi > self.flat.n_params:
            self.flat.pack_buffers(self.contributes())
        # The buckets of a step are one round of the algorithm: bucket 0 (started every step) counts it.
        self._requests[bucket] = self.coll.allreduce_mean_async_(
            self.flat.packed[lo:hi], tag=f"bucket{bucket}", count=self.contributor_count(), count_round=bucket == 0
        )

    def optimizer_step(self, step: int) -> None:
        """Every rank applies the averaged gradient, a skipping one too (none if all skipped)."""
        self._averaged = False
        if self.contributor_count() > 0:
            self.optimizer.step()

    def reduce_gradients(self, step: int) -> None:
        if not self.overlap:
            self.flat.adopt_grads()
            self.flat.pack_buffers(self.contributes())
            self.coll.allreduce_mean_(self.flat.packed, tag="grad", count=self.contributor_count())
            self._take_buffers()
            return
        for bucket in range(len(self._buckets)):
            if bucket not in self._requests:  # no backward this step (a skipped NaN loss), or unused params
                lo, hi = self._buckets[bucket]
                self.flat.adopt_grads(lo, hi)
                self._start(bucket)
        for bucket in range(len(self._buckets)):
            self._requests[bucket].wait()
        self._requests.clear()
        self._pending = list(self._counts)
        self._fired.clear()
        self._averaged = True
        self._take_buffers()

    def set_collectives(self, coll) -> None:
        """Continue on new live ranks; bucket averages of a round a real failure interrupted are dropped."""
        from mpi4py import MPI

        for request in self._requests.values():  # completed, in error, on the revoked communicator
            try:
                request.wait()
            except MPI.Exception:
                pass
        super().set_collectives(coll)
        self._requests.clear()
        self._pending = list(self._counts) if self.overlap else self._pending
        self._fired.clear()
        self._averaged = False

    def _take_buffers(self) -> None:
        if self.contributor_count() > 0:  # with no contribution the sum is zeros: keep our own
            self.flat.unpack_buffers()

    def close(self) -> None:
        """Remove the gradient hooks from the model, then free the comm layer's windows (collective)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        super().close()
