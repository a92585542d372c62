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
from .data.fractional import Redundancy, per_rank_redundancy
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
        batch_size: ``b``, samples drawn per held chunk per step (local batch ``q * b``), or one per rank.
        partition: ``"iid"``, ``"label"`` or ``"dirichlet:ALPHA"``.
        labels: class labels of the samples; default ``dataset.targets`` (needed by the
            label and dirichlet partitions only).
        seed: seeds the partition and the sample order (as ``hpcsgd shard --seed`` and
            ``hpcsgd train --seed`` together).
        chunk_weighting: ``"size"`` (draws in proportion to chunk size) or ``"uniform"``.
        placement: ``"cyclic"`` (rank r also holds chunks r+1..r+q-1) or ``"spread"`` (chunks
            r, r+R, ..., so a chunk's copies sit on q different nodes; needs q <= P/R).
        ranks_per_node: R for ``"spread"``; 0 (default): the ranks sharing rank 0's node.
        redundancy: mu >= 0 instead of ``q`` (``q = 1 + mu``): a fractional mu also holds a fixed
            part of the next chunk (hpcsgd/data/fractional.py); or one mu_i per rank (a list).
            A ``q`` given too must be ``1 + floor(mu)``.
        redundancy_spread: sigma of the authors' per-rank draw ``N(mu, sigma)`` (seeded by ``seed``).

    ``batch_size`` may be one value per rank (heterogeneous mini-batches; :meth:`set_batch_sizes`
    changes them from the next epoch on, or with ``now=True`` from the next batch). With
    fractional or per-rank redundancy or batches the loss is the plain batch mean (``loss_weights`` None).

    Example::

        sampler = hpcsgd.RedundantSampler(train_set, world, q=2, batch_size=16, partition="label")
        loader = DataLoader(train_set, batch_sampler=sampler)
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            for x, y in loader:  # 2 * 16 samples: 16 from each of this rank's 2 chunks
                ...
    """

    def __init__(self, dataset, world, q: int | None = None, batch_size: int | Sequence[int] = 32,
                 partition: str = "iid", labels=None, seed: int = 0, chunk_weighting: str = "size",
                 placement: str = "cyclic", ranks_per_node: int = 0,
                 redundancy: float | Sequence[float] | None = None, redundancy_spread: float = 0.0):
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
        self._spec = (q, redundancy, redundancy_spread)
        self._start([len(c) for c in self.chunks], world, batch_size, seed, chunk_weighting, total=n)

    @classmethod
    def over_chunks(cls, chunk_sizes: Sequence[int], world, q: int | None = None, batch_size: int | Sequence[int] = 32,
                    seed: int = 0, chunk_weighting: str = "size", adopted: dict[int, int] | None = None,
                    placement: str | Placement = "cyclic", ranks_per_node: int = 0,
                    redundancy: float | Sequence[float] | None = None, redundancy_spread: float = 0.0,
                    ) -> "RedundantSampler":
        """A sampler over data already cut into P chunks (``hpcsgd shard``'s), as ``hpcsgd train`` uses it.

        Draw with :meth:`next_chunk_batch` (``(chunk, indices within it)``); ``chunks`` is None.
        ``adopted`` maps chunks taken over from departed ranks to their new holder: those
        are drawn from too, from a fresh pass, and count as one holder in the loss weights.
        """
        self = cls.__new__(cls)
        self.chunks = None
        self.placement = _placement(placement, ranks_per_node, world)
        self._cut = None
        self._spec = (q, redundancy, redundancy_spread)
        self._start(list(chunk_sizes), world, batch_size, seed, chunk_weighting, adopted)
        return self

    def _start(self, sizes: list[int], world, batch_size, seed, chunk_weighting, adopted=None, total=None) -> None:
        """The stream over this rank's held chunks; steps per epoch: ``ceil(N / sum_i b_i)``."""
        P = self.P = world.size
        self.seed = _check_int("seed", seed, 0)
        self.rank = world.rank
        self.batch_sizes = batch_sizes_for(batch_size, P)
        self.batch_size = self.batch_sizes[self.rank]
        self.q, per_rank = _resolve_redundancy(P, *self._spec, seed=self.seed)
        self.redundancy_per_rank = per_rank
        self.chunk_sizes, self.chunk_weighting = sizes, chunk_weighting
        self.adopted = dict(adopted or {})
        self.total = sum(sizes) if total is None else total
        # Steps per epoch: ceil(N / P / b) with equal batches (the same integer as ceil(N / (P b))).
        self.steps_per_epoch = max(1, -(-self.total // sum(self.batch_sizes)))
        self.steps = 0  # batches handed out so far
        self._pending: list[int] | None = None  # batch sizes waiting for the next epoch
        integer = len(set(per_rank)) == 1 and per_rank[0].is_integer() and len(set(self.batch_sizes)) == 1
        self.redundancy = None if integer else Redundancy(per_rank, tuple(sizes), self.seed, self.placement)
        if self.redundancy is None:
            self._stream = self._whole_stream(chunks_for_rank(P, self.q, self.rank, self.placement))
        else:
            self._stream = self._fractional_stream()
        self.loss_weights = self._weights(list(range(P)))

    def _whole_stream(self, held: Sequence[int]) -> StratifiedSampler:
        """This rank's stream over ``held`` whole chunks and its adopted ones."""
        sizes, draws = self.chunk_sizes, draws_per_step(self.batch_size, self.chunk_sizes, self.chunk_weighting)
        stream = StratifiedSampler({c: sizes[c] for c in held}, {c: draws[c] for c in held}, self.seed, self.rank)
        for c in (c for c, r in self.adopted.items() if r == self.rank):
            stream.adopt(c, sizes[c], draws[c])
        return stream

    def _fractional_stream(self) -> StratifiedSampler:
        """The stream of fractional or per-rank redundancy: whole chunks, then the partial subset."""
        h = self.redundancy.holding(self.rank)
        stream = StratifiedSampler({c: self.chunk_sizes[c] for c in h.whole},
                                   {c: self._draw(c) for c in h.whole}, self.seed, self.rank)
        if h.partial is not None and self.adopted.get(h.partial) != self.rank:  # adopted whole: drawn whole
            stream.hold_part(h.partial, self.chunk_sizes[h.partial], self.redundancy.subset(self.rank), h.fraction,
                             self._draw(h.partial))
        for c in (c for c, r in self.adopted.items() if r == self.rank):
            stream.adopt(c, self.chunk_sizes[c], self._draw(c))
        return stream

    def _draw(self, chunk: int) -> int:
        """Samples per step from whole ``chunk`` at this rank's batch size (``b`` for equal chunks)."""
        return draws_per_step(self.batch_size, self.chunk_sizes, self.chunk_weighting)[chunk]

    def _weights(self, live: Sequence[int], reweight: bool = False) -> torch.Tensor | None:
        """Per-sample loss weights of a batch, or None when the plain batch mean is right."""
        if self.redundancy is not None:  # fractional or per-rank: the batch mean (the authors' rule)
            if reweight:
                raise ConfigError("reweight does not combine with fractional or per-rank redundancy or per-rank "
                                  "batch sizes (their loss is the mean over each rank's batch)")
            self.sample_weights = {}
            return None
        plan = sample_plan(self.q, self.batch_size, self.chunk_sizes, live, self.adopted,
                           weighting=self.chunk_weighting, reweight=reweight, placement=self.placement)[self.rank]
        self._stream.set_batch_per_chunk({c: n for c, (n, _) in plan.items()})
        self.sample_weights = {c: a for c, (_, a) in plan.items()}
        batch = self._stream.batch_size
        if all(a == Fraction(1, batch) for _, a in plan.values()):
            return None
        return torch.cat([torch.full((plan[c][0],), float(plan[c][1])) for c in self._stream.chunks])

    def set_batch_sizes(self, sizes: Sequence[int], now: bool = False) -> None:
        """Every rank's batch size ``b_i`` (one per rank, the same list on every rank), from the next epoch on.

        ``now``: from the next batch on, also in the middle of an epoch. Each held chunk's order
        then continues where it stands, only the samples a step takes from it change (a partial
        chunk's ``floor((t+1) b f) - floor(t b f)`` counts afresh from that step), so within one
        pass of a chunk no sample is drawn twice, and the draws are a function of the steps at
        which the sizes changed (every rank and a resume from :meth:`state_dict` draw the same).
        ``len(self)`` does not change: steps per epoch stay what the first sizes gave, the same
        on every rank. From then on the loss is the mean over each rank's batch (fractional mode).
        """
        self._pending = batch_sizes_for(list(sizes), self.P)
        if now or self.steps % self.steps_per_epoch == 0:
            self._apply_pending()

    def _apply_pending(self, force: bool = False) -> None:
        """The batch sizes set by :meth:`set_batch_sizes` take effect (``force``: even unchanged ones)."""
        sizes, self._pending = self._pending, None
        if sizes is None or (sizes == self.batch_sizes and not force):
            return
        old, self.batch_sizes, self.batch_size = self.batch_size, sizes, sizes[self.rank]
        if self.redundancy is None:  # from now on per-rank batches: the batch mean, draws b_i per chunk
            self.redundancy = Redundancy(self.redundancy_per_rank, tuple(self.chunk_sizes), self.seed, self.placement)
            self.loss_weights = self._weights(list(range(self.P)))
        self._stream.set_batch_per_chunk({c: self._draw(c) for c in self._stream.chunks})
        if self.batch_size != old:
            self._stream.set_part_batch(self.batch_size)

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
        self._check_resizable()
        labels, partition = self._cut
        self.chunks = partition_indices(labels, world.size, partition, self.seed)
        self._start([len(c) for c in self.chunks], world, self.batch_size, self.seed, self.chunk_weighting,
                    adopted, total=self.total)
        self.set_live(list(world.roles or range(world.size)))  # draws as the CLI's: only the roles train

    def for_run(self, P: int) -> tuple[int, list[int], Redundancy | None]:
        """``(q, chunk sizes, redundancy)`` of a run of ``P`` ranks cut as this sampler cuts its data.

        What a resume on fewer processes plans its adoption with (hpcsgd.train.resize), before
        :meth:`resize` re-forms the sampler for that run; ``redundancy`` is None for integer q.
        """
        self._check_resizable()
        labels, partition = self._cut
        sizes = [len(c) for c in partition_indices(labels, P, partition, self.seed)]
        q, per_rank = _resolve_redundancy(P, *self._spec, seed=self.seed)
        integer = len(set(per_rank)) == 1 and per_rank[0].is_integer()
        return q, sizes, None if integer else Redundancy(per_rank, tuple(sizes), self.seed, self.placement)

    def _check_resizable(self) -> None:
        """A resume on fewer processes needs the arguments of the run, which per-rank lists are not."""
        if self._cut is None:
            raise ConfigError("a sampler over chunks (RedundantSampler.over_chunks) is built for its run: "
                              "build it with the run's world instead of resizing it")
        if len(set(self.batch_sizes)) > 1 or isinstance(self._spec[1], (list, tuple)):
            raise ConfigError("resuming on fewer processes through the Python API needs one batch size and one "
                              "redundancy (mu, with redundancy_spread if the run drew per-rank values): per-rank "
                              "lists name the processes of this job, not the run's ranks (hpcsgd train resumes "
                              "them on fewer ranks)")

    def coverage(self, live_ranks: Sequence[int]) -> float:
        """The share of the training samples that ``live_ranks`` (run ranks) hold, adopted chunks included."""
        return coverage(self.P, self.q, live_ranks, self.adopted, self.chunk_sizes, self.placement, self.redundancy)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps_per_epoch):
            yield self.next_indices()

    def next_indices(self) -> list[int]:
        """The dataset indices of the next step's batch, held chunk after held chunk."""
        return np.concatenate([self.chunks[c][idx] for c, idx in self.next_chunk_batch()]).tolist()

    def next_chunk_batch(self) -> list[tuple[int, np.ndarray]]:
        """The next batch as ``(chunk, indices within the chunk)`` (data already split into chunks)."""
        if self._pending is not None and self.steps % self.steps_per_epoch == 0:
            self._apply_pending()
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
        self._stream.seek_steps(target)
        self.steps = target

    def state_dict(self) -> dict:
        """Steps taken, the position in every held chunk's order, and batch sizes set since the start."""
        state = {"steps": self.steps, "stream": self._stream.state_dict()}
        if self.redundancy is not None:  # only then: an integer run's state stays what it always was
            state["batch_sizes"] = list(self.batch_sizes)
            state["pending"] = self._pending
        return state

    def load_state_dict(self, state: dict) -> None:
        try:
            steps, stream = int(state["steps"]), state["stream"]
            sizes, pending = state.get("batch_sizes"), state.get("pending")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"sampler state is malformed: {exc!r}") from None
        if sizes is not None:
            self._pending = batch_sizes_for(sizes, self.P)
            self._apply_pending(force=True)
            self._pending = None if pending is None else batch_sizes_for(pending, self.P)
        self._stream.load_state_dict(stream, fresh=list(self.adopted))  # adopted since: start anew
        self.steps = steps


def batch_sizes_for(batch_size: int | Sequence[int], P: int) -> list[int]:
    """``b_i`` of every rank: one value for all, or a list of P (each an integer >= 1)."""
    if isinstance(batch_size, (list, tuple)):
        if len(batch_size) != P:
            raise ConfigError(f"batch_size must be one value or one per rank: {len(batch_size)} values for P={P} ranks")
        return [_check_int(f"batch_size[{i}]", b, 1) for i, b in enumerate(batch_size)]
    return [_check_int("batch_size", batch_size, 1)] * P


def _resolve_redundancy(P: int, q, redundancy, spread, seed: int) -> tuple[int, tuple[float, ...]]:
    """``(q, mu_i per rank)`` from the arguments; ``q`` is the chunks held whole, ``1 + floor(mu)``:
    a ``q`` that disagrees with the redundancy is refused, naming both."""
    if q is not None:
        q = _check_int("q", q, 1, P, f" (P={P})")
    if redundancy is None:
        return q or 1, per_rank_redundancy(P, float((q or 1) - 1), spread, None, seed)
    if isinstance(redundancy, (list, tuple)):
        per_rank = per_rank_redundancy(P, 0.0, 0.0, redundancy, seed)
    else:
        per_rank = per_rank_redundancy(P, redundancy, spread, None, seed)
        if q is not None and q != 1 + math.floor(redundancy):
            raise ConfigError(f"q={q} and redundancy={redundancy} disagree (q = 1 + redundancy): give one")
    whole = 1 + math.floor(min(per_rank))
    if q is not None and q != whole:
        raise ConfigError(f"q={q} and redundancy={list(per_rank)} disagree (q = 1 + redundancy): give one")
    return whole, per_rank


__all__ = ["RedundantSampler", "batch_sizes_for"]
