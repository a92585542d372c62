"""Stratified per-chunk sampling (ALGORITHMS.md, "Data").

Each step a rank draws ``b`` samples from every chunk it holds, so its local batch is
``q * b``. Within a chunk, samples follow a shuffled order without replacement until the pass
ends; the next pass uses a fresh permutation. The order of pass ``k`` of chunk ``c`` on rank
``r`` is ``default_rng([seed, r, c, k]).permutation(n)``: it depends on nothing else, so a
resumed run continues exactly where it stopped from two integers per chunk.

A *partial* chunk (fractional redundancy, hpcsgd/data/fractional.py) is a fixed subset of a
chunk, walked the same way (keyed by the same ``(seed, rank, chunk)``), from which step ``t``
draws ``floor((t+1) b f) - floor(t b f)`` samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from numbers import Integral

import numpy as np

from hpcsgd.data.fractional import drawn_from_part, partial_draws
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


class _Part:
    """A partial chunk: ``subset`` (indices within the chunk) walked in ``order``, ``b f`` per step
    on average, counted from step ``start`` (when ``b`` last changed)."""

    def __init__(self, order: _ChunkOrder, subset: np.ndarray, fraction: Fraction, b: int) -> None:
        self.order, self.subset, self.fraction, self.b, self.start = order, subset, Fraction(fraction), b, 0

    def take(self, step: int) -> np.ndarray:
        return self.subset[self.order.take(partial_draws(step - self.start, self.b, self.fraction))]


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
        self._parts: dict[int, _Part] = {}
        self.steps = 0  # batches drawn: the partial chunks' draws depend on it
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

    def hold_part(self, chunk: int, size: int, subset: np.ndarray, fraction: Fraction, b: int) -> None:
        """Also draw from a fixed ``subset`` (indices within ``chunk`` of ``size`` samples):
        ``floor((t+1) b f) - floor(t b f)`` samples at step ``t``, after the whole chunks."""
        c = _check_int("chunk number", chunk, 0)
        n = _check_int(f"size of chunk {c}", size, 1)
        subset = np.asarray(subset, dtype=np.int64)
        if c in self._orders or c in self._parts:
            raise ConfigError(f"chunk {c} is already held by this rank")
        if not 0 < Fraction(fraction) < 1 or len(subset) < 1 or subset.min() < 0 or subset.max() >= n:
            raise ConfigError(f"partial chunk {c}: fraction {fraction} must be in (0, 1) and the subset "
                              f"a non-empty set of indices in 0..{n - 1}")
        self._parts[c] = _Part(_ChunkOrder(self.seed, self.rank, c, len(subset)), subset, fraction,
                               _check_int(f"batch per chunk (chunk {c})", b, 1))

    def set_part_batch(self, b: int) -> None:
        """Draw ``b f`` per step from the partial chunks from the next batch on (counted afresh from it)."""
        for part in self._parts.values():
            part.b, part.start = _check_int("batch per chunk (partial chunk)", b, 1), self.steps

    @property
    def chunks(self) -> tuple[int, ...]:
        """Held chunks, in batch order (whole ones; see :attr:`parts` for the partial ones)."""
        return tuple(self._orders)

    @property
    def parts(self) -> tuple[int, ...]:
        """Partial chunks, drawn after the whole ones."""
        return tuple(self._parts)

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
        self._parts.pop(c, None)  # held whole from now on: its partial subset is a part of it
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
        """For each held chunk, ``(chunk, local int64 indices)`` of its ``b`` samples; then each
        partial chunk's draws of this step (none when they are 0)."""
        batch = [(c, o.take(self._batch[c])) for c, o in self._orders.items()]
        for c, part in self._parts.items():
            idx = part.take(self.steps)
            if len(idx):
                batch.append((c, idx))
        self.steps += 1
        return batch

    def seek_steps(self, steps: int) -> None:
        """Move every order to where ``steps`` batches of the current draws, from the start, leave it."""
        steps = _check_int("steps", steps, 0)
        for o in self._orders.values():
            o.seek(*divmod(self._batch[o.key[2]] * steps, o.n))
        for part in self._parts.values():
            part.start = 0
            part.order.seek(*divmod(drawn_from_part(steps, part.b, part.fraction), len(part.subset)))
        self.steps = steps

    def state_dict(self) -> dict:
        """The position in every chunk's order, as plain (JSON-serialisable) ints."""
        state = {
            "seed": self.seed,
            "rank": self.rank,
            "chunks": [
                {"chunk": c, "size": o.n, "pass_index": o.pass_index, "position": o.position}
                for c, o in self._orders.items()
            ],
        }
        if self._parts:  # only then: a state without partial chunks stays what it always was
            state["steps"] = self.steps
            state["parts"] = [{"chunk": c, "size": len(p.subset), "pass_index": p.order.pass_index,
                               "position": p.order.position, "batch": p.b, "start": p.start}
                              for c, p in self._parts.items()]
        return state

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
        self._load_parts(state)

    def _load_parts(self, state: Mapping) -> None:
        """The partial chunks' positions, draws and step count (a state saved with them)."""
        try:
            parts = {int(e["chunk"]): (int(e["size"]), int(e["pass_index"]), int(e["position"]), int(e["batch"]),
                                       int(e["start"])) for e in state.get("parts", [])}
            steps = int(state.get("steps", 0))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"sampler state is malformed: {e!r}") from e
        parts = {c: v for c, v in parts.items() if c not in self._orders}  # adopted whole since: a fresh pass
        if set(parts) != set(self._parts):
            raise CheckpointError(f"sampler state holds partial chunks {sorted(parts)}, this rank {sorted(self._parts)}")
        for c, (n, pass_index, position, b, start) in parts.items():
            part = self._parts[c]
            if n != len(part.subset) or pass_index < 0 or not 0 <= position <= n or b < 1 or not 0 <= start <= steps:
                raise CheckpointError(f"sampler state for partial chunk {c} does not fit a subset of {len(part.subset)}")
            part.order.seek(pass_index, position)
            part.b, part.start = b, start
        self.steps = steps


def gather_batch(
    batch: Sequence[tuple[int, np.ndarray]],
    data: Mapping[int, tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the samples a batch names: ``data[c] = (x, y)`` of each held chunk."""
    xs = [data[c][0][idx] for c, idx in batch]
    ys = [data[c][1][idx] for c, idx in batch]
    return np.concatenate(xs), np.concatenate(ys)
