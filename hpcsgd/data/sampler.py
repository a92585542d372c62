"""Stratified per-chunk sampling (ALGORITHMS.md, "Data").

Each step a rank draws ``b`` samples from every chunk it holds, so its local batch is
``q * b``. Within a chunk, samples follow a shuffled order without replacement until the pass
ends; the next pass uses a fresh permutation. The order of pass ``k`` of chunk ``c`` on rank
``r`` is ``default_rng([seed, r, c, k]).permutation(n)``: it depends on nothing else, so a
resumed run continues exactly where it stopped from two integers per chunk.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Integral

import numpy as np

from hpcsgd.errors import CheckpointError, ConfigError


def steps_per_epoch(own_chunk_size: int, b: int) -> int:
    """Steps in one epoch: one pass over the rank's own chunk, ``ceil(n / b)``."""
    if own_chunk_size < 1:
        raise ConfigError(f"own chunk size must be >= 1, got {own_chunk_size}")
    if b < 1:
        raise ConfigError(f"batch size per chunk must be >= 1, got {b}")
    return math.ceil(own_chunk_size / b)


class _ChunkOrder:
    """The shuffled order of one chunk, walked pass after pass."""

    def __init__(self, seed: int, rank: int, chunk: int, n: int) -> None:
        self.key = (seed, rank, chunk)
        self.n = n
        self.pass_index = 0
        self.position = 0
        self._perm: np.ndarray | None = None

    def perm(self) -> np.ndarray:
        if self._perm is None:
            seed, rank, chunk = self.key
            rng = np.random.default_rng([seed, rank, chunk, self.pass_index])
            self._perm = rng.permutation(self.n).astype(np.int64, copy=False)
        return self._perm

    def take(self, b: int) -> np.ndarray:
        out = []
        while b > 0:
            if self.position == self.n:  # pass exhausted: start the next one
                self.pass_index += 1
                self.position = 0
                self._perm = None
            k = min(b, self.n - self.position)
            out.append(self.perm()[self.position : self.position + k])
            self.position += k
            b -= k
        return out[0].copy() if len(out) == 1 else np.concatenate(out)

    def seek(self, pass_index: int, position: int) -> None:
        self.pass_index = pass_index
        self.position = position
        self._perm = None


def _check_int(name: str, v: object, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, Integral) or v < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")
    return int(v)


class StratifiedSampler:
    """Draws ``b`` local indices from each held chunk per step.

    Args:
        chunk_sizes: ``{chunk: n}`` for the chunks this rank holds, in batch order
            (own chunk first, as :func:`~hpcsgd.data.assignment.chunks_for_rank` gives them).
        batch_per_chunk: ``b``, one int for all chunks or ``{chunk: b}``.
        seed: run seed (>= 0).
        rank: this rank (>= 0); different ranks get different orders of the same chunk.
    """

    def __init__(
        self,
        chunk_sizes: Mapping[int, int],
        batch_per_chunk: int | Mapping[int, int],
        seed: int,
        rank: int,
    ) -> None:
        if not chunk_sizes:
            raise ConfigError("sampler needs at least one chunk")
        self.seed = _check_int("seed", seed, 0)
        self.rank = _check_int("rank", rank, 0)
        self._orders: dict[int, _ChunkOrder] = {}
        self._batch: dict[int, int] = {}
        for c, n in chunk_sizes.items():
            c = _check_int("chunk number", c, 0)
            n = _check_int(f"size of chunk {c}", n, 1)
            if isinstance(batch_per_chunk, Mapping):
                if c not in batch_per_chunk:
                    raise ConfigError(f"batch_per_chunk has no entry for chunk {c}")
                b = batch_per_chunk[c]
            else:
                b = batch_per_chunk
            self._hold(c, n, b)

    def _hold(self, c: int, n: int, b: object) -> None:
        """Start drawing ``b`` per step from chunk ``c`` of ``n`` samples, in this rank's order."""
        self._batch[c] = _check_int(f"batch per chunk (chunk {c})", b, 1)
        self._orders[c] = _ChunkOrder(self.seed, self.rank, c, n)

    @property
    def chunks(self) -> tuple[int, ...]:
        """Held chunks, in batch order."""
        return tuple(self._orders)

    @property
    def batch_per_chunk(self) -> dict[int, int]:
        """Samples drawn per step from each held chunk, in batch order."""
        return dict(self._batch)

    @property
    def batch_size(self) -> int:
        """Local batch size: the sum of ``b`` over held chunks."""
        return sum(self._batch.values())

    def adopt(self, chunk: int, size: int, batch: int) -> None:
        """Also draw from ``chunk`` from now on (a chunk taken over from a departed rank).

        Its order is keyed by this rank like any held chunk and starts at a fresh pass.
        """
        c = _check_int("chunk number", chunk, 0)
        if c in self._orders:
            raise ConfigError(f"chunk {c} is already held by this rank")
        self._hold(c, _check_int(f"size of chunk {c}", size, 1), batch)

    def set_batch_per_chunk(self, batch_per_chunk: Mapping[int, int]) -> None:
        """Change ``b`` per held chunk from the next batch on (re-weighting after a failure).

        The order inside each chunk is unchanged: only how many samples a step draws.
        """
        if set(batch_per_chunk) != set(self._orders):
            raise ConfigError(f"batch sizes given for chunks {sorted(batch_per_chunk)}, held: {sorted(self._orders)}")
        for c, b in batch_per_chunk.items():
            self._batch[c] = _check_int(f"batch per chunk (chunk {c})", b, 1)

    def next_batch(self) -> list[tuple[int, np.ndarray]]:
        """For each held chunk, ``(chunk, local int64 indices)`` of its ``b`` samples."""
        return [(c, o.take(self._batch[c])) for c, o in self._orders.items()]

    def state_dict(self) -> dict:
        """The position in every chunk's order, as plain (JSON-serialisable) ints."""
        return {
            "seed": self.seed,
            "rank": self.rank,
            "chunks": [
                {"chunk": c, "size": o.n, "pass_index": o.pass_index, "position": o.position}
                for c, o in self._orders.items()
            ],
        }

    def load_state_dict(self, state: Mapping, fresh: Sequence[int] = ()) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of a sampler built the same way).

        Chunks in ``fresh`` (adopted since ``state`` was saved) may be absent; they start anew.
        """
        try:
            seed, rank, entries = int(state["seed"]), int(state["rank"]), list(state["chunks"])
            got = {int(e["chunk"]): (int(e["size"]), int(e["pass_index"]), int(e["position"]))
                   for e in entries}
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"sampler state is malformed: {e!r}") from e
        if (seed, rank) != (self.seed, self.rank):
            raise CheckpointError(
                f"sampler state is for seed={seed}, rank={rank}; "
                f"this sampler has seed={self.seed}, rank={self.rank}"
            )
        if set(got) - set(self._orders) or set(self._orders) - set(got) - set(fresh):
            raise CheckpointError(
                f"sampler state holds chunks {sorted(got)}, this rank holds {sorted(self._orders)}"
            )
        for c, (n, pass_index, position) in got.items():
            o = self._orders[c]
            if n != o.n or pass_index < 0 or not 0 <= position <= n:
                raise CheckpointError(
                    f"sampler state for chunk {c} (size {n}, pass {pass_index}, position "
                    f"{position}) does not fit a chunk of size {o.n} (position in 0..{o.n})"
                )
        for c, (_, pass_index, position) in got.items():
            self._orders[c].seek(pass_index, position)


def gather_batch(
    batch: Sequence[tuple[int, np.ndarray]],
    data: Mapping[int, tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the samples a batch names: ``data[c] = (x, y)`` of each held chunk."""
    xs = [data[c][0][idx] for c, idx in batch]
    ys = [data[c][1][idx] for c, idx in batch]
    return np.concatenate(xs), np.concatenate(ys)
