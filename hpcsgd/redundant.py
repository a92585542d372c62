"""RedundantSampler: ALGORITHMS.md's data side for any map-style ``torch.utils.data.Dataset``.

The data set is cut into P chunks (one per rank) by the same partition ``hpcsgd shard``
uses; rank ``r`` holds chunks ``r, r+1, ..., r+q-1 (mod P)`` (``placement="spread"``:
``r, r+R, ..., r+(q-1)R``, copies on different nodes) and each step draws from every
held chunk the samples :func:`~hpcsgd.data.assignment.draws_per_step` gives it, in the
order :class:`~hpcsgd.data.sampler.StratifiedSampler` walks them. So a user's loop over
``DataLoader(dataset, batch_sampler=sampler)`` sees exactly the batches ``hpcsgd train``
sees on the same data written as shards with the same seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from fractions import Fraction

import numpy as np
import torch

from .data.assignment import chunks_for_rank, coverage, draws_per_step, sample_plan
from .data.placement import Placement
from .data.partition import parse_partition, partition_indices
from .data.sampler import StratifiedSampler
from .errors import CheckpointError, ConfigError


def _labels_of(dataset, labels) -> np.ndarray | None:
    if labels is None:
        labels = getattr(dataset, "targets", None)
    if labels is None:
        return None
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    return np.asarray(labels)


def _check_int(name: str, value, lo: int, hi: int | None = None, where: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo or (hi is not None and value > hi):
        allowed = f"{lo}..{hi}{where}" if hi is not None else f">= {lo}"
        raise ConfigError(f"{name} must be an integer in {allowed}, got {value!r}" if hi is not None
                          else f"{name} must be an integer {allowed}, got {value!r}")
    return int(value)


def _placement(placement, ranks_per_node, world) -> Placement:
    """A :class:`Placement` from the sampler's arguments; R from rank 0's node when not given."""
    if isinstance(placement, Placement):
        return placement
    R = _check_int("ranks_per_node", ranks_per_node, 0)
    if placement == "spread" and R == 0:
        R = world.comm.bcast(world.local_size, root=0)  # the same R on every rank, as hpcsgd train
    return Placement(placement, R or 1)


class RedundantSampler(torch.utils.data.Sampler):
    """Batches of dataset indices for this rank: ``b`` per held chunk per step, ``q`` chunks.

    Use it as ``DataLoader(dataset, batch_sampler=sampler)``. Every rank gets the same
    ``len(sampler)`` (steps per epoch: ``ceil(N / P / batch_size)``, one pass over a mean
    chunk), so ranks never wait on a rank that ran out of data.

    Args:
        dataset: any map-style data set (``len`` and ``__getitem__``).
        world: from :func:`hpcsgd.init`; P is ``world.size``.
        q: chunks per rank, 1..P (q = 1: plain data parallelism; q > 1: redundancy).
        batch_size: ``b``, samples drawn per held chunk per step (local batch ``q * b``).
        partition: ``"iid"``, ``"label"`` or ``"dirichlet:ALPHA"``.
        labels: class labels of the samples; default ``dataset.targets`` (needed by the
            label and dirichlet partitions only).
        seed: seeds the partition and the sample order (as ``hpcsgd shard --seed`` and
            ``hpcsgd train --seed`` together).
        chunk_weighting: ``"size"`` (draws in proportion to chunk size) or ``"uniform"``.
        placement: ``"cyclic"`` (rank r also holds chunks r+1..r+q-1) or ``"spread"`` (chunks
            r, r+R, ..., so a chunk's copies sit on q different nodes; needs q <= P/R).
        ranks_per_node: R for ``"spread"``; 0 (default): the ranks sharing rank 0's node.
    """

    def __init__(self, dataset, world, q: int = 1, batch_size: int = 32, partition: str = "iid",
                 labels=None, seed: int = 0, chunk_weighting: str = "size", placement: str = "cyclic",
                 ranks_per_node: int = 0):
        P = world.size
        n = len(dataset)
        if n < P:
            raise ConfigError(f"the dataset has {n} samples, fewer than the P={P} chunks to cut")
        kind, _ = parse_partition(partition)
        found = _labels_of(dataset, labels)
        if found is None and kind != "iid":
            raise ConfigError(f"partition {partition!r} needs labels: pass labels= or give the dataset .targets")
        if found is not None and len(found) != n:
            raise ConfigError(f"labels has {len(found)} entries, the dataset {n} samples")
        labels_ = found if found is not None else np.zeros(n, dtype=np.int64)
        seed = _check_int("seed", seed, 0)
        self._cut = (labels_, partition)  # to cut the data again for another P (resize)
        self.chunks = partition_indices(labels_, P, partition, seed)
        self.placement = _placement(placement, ranks_per_node, world)
        self._start([len(c) for c in self.chunks], world, q, batch_size, seed, chunk_weighting, total=n)

    @classmethod
    def over_chunks(cls, chunk_sizes: Sequence[int], world, q: int = 1, batch_size: int = 32, seed: int = 0,
                    chunk_weighting: str = "size", adopted: dict[int, int] | None = None,
                    placement: str | Placement = "cyclic", ranks_per_node: int = 0) -> "RedundantSampler":
        """A sampler over data already cut into P chunks (``hpcsgd shard``'s), as ``hpcsgd train`` uses it.

        Draw with :meth:`next_chunk_batch` (``(chunk, indices within it)``); ``chunks`` is None.
        ``adopted`` maps chunks taken over from departed ranks to their new holder: those
        are drawn from too, from a fresh pass, and count as one holder in the loss weights.
        """
        self = cls.__new__(cls)
        self.chunks = None
        self.placement = _placement(placement, ranks_per_node, world)
        self._cut = None
        self._start(list(chunk_sizes), world, q, batch_size, seed, chunk_weighting, adopted)
        return self

    def _start(self, sizes: list[int], world, q, batch_size, seed, chunk_weighting, adopted=None, total=None) -> None:
        """The stream over this rank's held chunks; steps per epoch: ``ceil(N / P / batch_size)``."""
        P = self.P = world.size
        self.q = _check_int("q", q, 1, P, f" (P={P})")
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seed = _check_int("seed", seed, 0)
        self.rank = world.rank
        self.chunk_sizes, self.chunk_weighting = sizes, chunk_weighting
        self.adopted = dict(adopted or {})
        draws = draws_per_step(self.batch_size, sizes, chunk_weighting)
        held = chunks_for_rank(P, self.q, self.rank, self.placement)
        self._stream = StratifiedSampler({c: sizes[c] for c in held}, {c: draws[c] for c in held},
                                         self.seed, self.rank)
        for c in (c for c, r in self.adopted.items() if r == self.rank):
            self._stream.adopt(c, sizes[c], draws[c])
        self.total = sum(sizes) if total is None else total
        self.steps_per_epoch = max(1, math.ceil(self.total / P / self.batch_size))
        self.steps = 0  # batches handed out so far
        self.rank_batch_size = self.batch_size  # this rank's b_i (set_batch_sizes); the epoch keeps b's length
        self._live, self._reweight = list(range(P)), False
        self.loss_weights = self._weights(list(range(P)))

    def _weights(self, live: Sequence[int], reweight: bool = False) -> torch.Tensor | None:
        """Per-sample loss weights of a batch, or None when the plain batch mean is right."""
        self._live, self._reweight = list(live), reweight
        plan = sample_plan(self.q, self.rank_batch_size, self.chunk_sizes, live, self.adopted,
                           weighting=self.chunk_weighting, reweight=reweight, placement=self.placement)[self.rank]
        self._stream.set_batch_per_chunk({c: n for c, (n, _) in plan.items()})
        self.sample_weights = {c: a for c, (_, a) in plan.items()}
        batch = self._stream.batch_size
        if all(a == Fraction(1, batch) for _, a in plan.values()):
            return None
        return torch.cat([torch.full((plan[c][0],), float(plan[c][1])) for c in self._stream.chunks])

    @property
    def held_chunks(self) -> tuple[int, ...]:
        """The chunks this rank draws from, in batch order."""
        return self._stream.chunks

    @property
    def batch_per_chunk(self) -> dict[int, int]:
        """Samples drawn per step from each held chunk (changes with :meth:`set_live`)."""
        return self._stream.batch_per_chunk

    @property
    def local_batch_size(self) -> int:
        """Samples per step on this rank: the sum of :attr:`batch_per_chunk`."""
        return self._stream.batch_size

    def set_batch_sizes(self, sizes: Sequence[int]) -> None:
        """Per-rank batch sizes ``b_i`` (one per run rank) from the next batch on.

        This rank draws ``sizes[rank]`` where it drew ``batch_size`` (per held chunk, in
        proportion under size weighting) and its loss stays the mean over its batch; the
        epoch keeps ``batch_size``'s length. Speed balancing (``balance = "speed"``) sets them.
        """
        if len(sizes) != self.P:
            raise ConfigError(f"batch sizes must be one per rank ({self.P}), got {len(sizes)}: {list(sizes)}")
        self.rank_batch_size = _check_int(f"batch size of rank {self.rank}", sizes[self.rank], 1)
        self.loss_weights = self._weights(self._live, reweight=self._reweight)

    def set_live(self, live_ranks: Sequence[int], reweight: bool = False) -> None:
        """After ranks failed: with ``reweight``, draws and loss weights that restore every covered chunk's weight."""
        self.loss_weights = self._weights(list(live_ranks), reweight=reweight)

    def resize(self, world, adopted: dict[int, int]) -> None:
        """Play run rank ``world.rank`` of a run of ``world.size`` ranks, with ``adopted`` chunks.

        For a resume on fewer processes (:func:`hpcsgd.load_checkpoint` calls it, with the
        adoption plan ``hpcsgd train --resume`` uses): the data is cut into the run's P
        chunks again, as the run that wrote the checkpoint cut it, and the draws per chunk
        are planned for the live ranks ``world.roles``; load the state after.
        """
        if self._cut is None:
            raise ConfigError("a sampler over chunks (RedundantSampler.over_chunks) is built for its run: "
                              "build it with the run's world instead of resizing it")
        labels, partition = self._cut
        self.chunks = partition_indices(labels, world.size, partition, self.seed)
        self._start([len(c) for c in self.chunks], world, self.q, self.batch_size, self.seed, self.chunk_weighting,
                    adopted, total=self.total)
        self.set_live(list(world.roles or range(world.size)))  # draws as the CLI's: only the roles train

    def coverage(self, live_ranks: Sequence[int]) -> float:
        """The share of the training samples that ``live_ranks`` (run ranks) hold, adopted chunks included."""
        return coverage(self.P, self.q, live_ranks, self.adopted, self.chunk_sizes, self.placement)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps_per_epoch):
            yield self.next_indices()

    def next_indices(self) -> list[int]:
        """The dataset indices of the next step's batch, held chunk after held chunk."""
        self.steps += 1
        return np.concatenate([self.chunks[c][idx] for c, idx in self._stream.next_batch()]).tolist()

    def next_chunk_batch(self) -> list[tuple[int, np.ndarray]]:
        """The next batch as ``(chunk, indices within the chunk)`` (data already split into chunks)."""
        self.steps += 1
        return self._stream.next_batch()

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch``: a no-op when the batches so far are exactly the earlier epochs.

        Otherwise (a fresh sampler resuming at ``epoch``) every chunk's order moves to where
        ``epoch * len(self)`` steps of the current draws leave it.
        """
        epoch = _check_int("epoch", epoch, 0)
        target = epoch * self.steps_per_epoch
        if target == self.steps:
            return
        state = self._stream.state_dict()
        draws = self._stream.batch_per_chunk
        for entry in state["chunks"]:
            drawn = draws[entry["chunk"]] * target
            entry["pass_index"], entry["position"] = divmod(drawn, entry["size"])
        self._stream.load_state_dict(state)
        self.steps = target

    def state_dict(self) -> dict:
        """Steps taken and the position in every held chunk's order."""
        return {"steps": self.steps, "stream": self._stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        try:
            steps, stream = int(state["steps"]), state["stream"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"sampler state is malformed: {exc!r}") from None
        self._stream.load_state_dict(stream, fresh=list(self.adopted))  # adopted since: start anew
        self.steps = steps


__all__ = ["RedundantSampler"]
