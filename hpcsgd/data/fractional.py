"""Fractional and per-rank redundancy (ALGORITHMS.md, "Fractional and per-rank redundancy").

The RI-SGD authors' code takes a real redundancy ``mu`` (``--redundancy=0.25``): each worker
holds its own chunk plus a *fraction* of the next one, and per-worker redundancies may be drawn
around the mean. Rank ``i`` with redundancy ``mu_i`` holds ``1 + floor(mu_i)`` chunks whole (as
the placement orders them: cyclic ``i, i+1, ...`` or spread over nodes) and a fixed subset of
``round(f_i |C_c|)`` samples of the next chunk ``c``, ``f_i = mu_i - floor(mu_i)``: the first
samples of a permutation of ``C_c`` seeded by ``(seed, i, c)``. Each step it draws ``b`` from
every whole chunk and ``n_t = floor((t+1) b f_i) - floor(t b f_i)`` from the subset, so its
batch averages ``b (1 + mu_i)``.

Pure functions of the config (numpy only): every rank derives the same holdings, and a resumed
run the same ones, without communicating. An integer ``mu`` is ``q = 1 + mu`` exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from numbers import Real

import numpy as np

from hpcsgd.data.placement import CYCLIC, Placement
from hpcsgd.errors import ConfigError

SPREAD_STREAM = 21  # the per-rank draw is default_rng([seed, 21]): a stream no sample order uses


def _check_mu(name: str, mu: object, P: int) -> float:
    if isinstance(mu, bool) or not isinstance(mu, Real) or not 0 <= mu <= P - 1:  # False for NaN
        raise ConfigError(f"{name} must be a number in [0, P-1] = [0, {P - 1}] (P={P} ranks), got {mu!r}")
    return float(mu)


def per_rank_redundancy(P: int, mu: float, spread: float = 0.0, per_rank: Sequence[float] | None = None,
                        seed: int = 0) -> tuple[float, ...]:
    """``mu_i`` of every rank: ``per_rank`` as given, else drawn as the authors do.

    The draw: ``mu_i ~ N(mu, spread)`` from ``default_rng([seed, 21])``, shifted so that the
    mean is exactly ``mu``, then clipped to ``[0, P-1]``. ``spread = 0``: every rank ``mu``.
    A pure function of its arguments: the same on every rank and in a resume.
    """
    if per_rank is not None and len(per_rank) > 0:
        if len(per_rank) != P:
            raise ConfigError(f"redundancy_per_rank must give one value per rank: {len(per_rank)} values for P={P} ranks")
        return tuple(_check_mu(f"redundancy_per_rank[{i}]", m, P) for i, m in enumerate(per_rank))
    mu = _check_mu("redundancy", mu, P)
    if isinstance(spread, bool) or not isinstance(spread, Real) or not 0 <= spread < math.inf:
        raise ConfigError(f"redundancy_spread must be a finite number >= 0, got {spread!r}")
    if spread == 0:
        return (mu,) * P
    draws = np.random.default_rng([int(seed), SPREAD_STREAM]).normal(mu, spread, P)
    draws = np.clip(draws - draws.mean() + mu, 0.0, P - 1)
    return tuple(float(m) for m in draws)


def fraction_of(mu: float) -> Fraction:
    """``f = mu - floor(mu)`` exactly (the float's own value, so every rank computes the same)."""
    exact = Fraction(mu)
    return exact - math.floor(exact)


def partial_draws(t: int, b: int, f: Fraction) -> int:
    """Samples step ``t`` draws from the partial subset: ``floor((t+1) b f) - floor(t b f)``."""
    return drawn_from_part(t + 1, b, f) - drawn_from_part(t, b, f)


def drawn_from_part(steps: int, b: int, f: Fraction) -> int:
    """Samples the first ``steps`` steps draw from the partial subset together: ``floor(steps b f)``."""
    return math.floor(steps * b * Fraction(f))


def part_size(f: Fraction, chunk_size: int) -> int:
    """Samples of a chunk held for a fraction ``f > 0``: ``round(f |C|)``, at least one."""
    return max(1, min(int(chunk_size), round(Fraction(f) * int(chunk_size))))


def partial_subset(seed: int, rank: int, chunk: int, chunk_size: int, size: int) -> np.ndarray:
    """Indices within ``chunk`` of the samples ``rank`` holds of it: the first ``size`` of a
    permutation seeded by ``(seed, rank, chunk)``."""
    perm = np.random.default_rng([int(seed), int(rank), int(chunk)]).permutation(int(chunk_size))
    return perm[: int(size)].astype(np.int64, copy=False)


@dataclass(frozen=True)
class Holding:
    """What one rank holds: ``whole`` chunks (its own first) and ``part_size`` samples of ``partial``."""

    rank: int
    whole: tuple[int, ...]
    partial: int | None
    fraction: Fraction
    part_size: int


@dataclass(frozen=True)
class Redundancy:
    """Per-rank redundancies over chunks of given sizes: holdings, subsets and sample coverage.

    Args:
        per_rank: ``mu_i`` of every rank (see :func:`per_rank_redundancy`); P is its length.
        chunk_sizes: samples of each of the P chunks.
        seed: the run's seed (the partial subsets derive from it).
        placement: which chunks come after a rank's own (cyclic or spread).
    """

    per_rank: tuple[float, ...]
    chunk_sizes: tuple[int, ...]
    seed: int = 0
    placement: Placement = CYCLIC

    def __post_init__(self):
        P = len(self.per_rank)
        if P < 1 or len(self.chunk_sizes) != P:
            raise ConfigError(f"redundancy needs one value and one chunk size per rank: {P} values, "
                              f"{len(self.chunk_sizes)} chunks")
        for i, m in enumerate(self.per_rank):
            _check_mu(f"redundancy of rank {i}", m, P)

    @property
    def P(self) -> int:
        return len(self.per_rank)

    @property
    def integer(self) -> bool:
        """Every rank the same integer ``mu``: plain ``q = 1 + mu``, no partial chunk."""
        return len(set(self.per_rank)) == 1 and float(self.per_rank[0]).is_integer()

    def holding(self, rank: int) -> Holding:
        """The whole chunks and the partial chunk of ``rank``."""
        if not 0 <= rank < self.P:
            raise ConfigError(f"rank must be in 0..{self.P - 1}, got {rank!r}")
        mu = self.per_rank[rank]
        f = fraction_of(mu)
        k = math.floor(mu) + 1
        chunks = self.placement.chunks(self.P, k + (f > 0), rank)
        if f == 0:
            return Holding(rank, chunks, None, f, 0)
        c = chunks[k]
        return Holding(rank, chunks[:k], c, f, part_size(f, self.chunk_sizes[c]))

    def whole(self, rank: int) -> tuple[int, ...]:
        return self.holding(rank).whole

    def subset(self, rank: int) -> np.ndarray | None:
        """Indices within its partial chunk of the samples ``rank`` holds there (None: no partial chunk)."""
        h = self.holding(rank)
        if h.partial is None:
            return None
        return partial_subset(self.seed, rank, h.partial, self.chunk_sizes[h.partial], h.part_size)

    def partly_covered(self, live: Iterable[int], whole_held: Iterable[int]) -> int:
        """Samples of the chunks not in ``whole_held`` that live ranks' partial subsets hold (their union)."""
        skip = set(whole_held)
        found: dict[int, set[int]] = {}
        for r in sorted(set(live)):
            h = self.holding(r)
            if h.partial is not None and h.partial not in skip:
                found.setdefault(h.partial, set()).update(self.subset(r).tolist())
        return sum(len(s) for s in found.values())



def check_placement_fits(per_rank: Sequence[float], placement: Placement) -> None:
    """Refuse a spread placement that cannot put every rank's chunks (partial one included) on other nodes."""
    P = len(per_rank)
    most = max(math.floor(m) + 1 + (fraction_of(m) > 0) for m in per_rank)
    placement.check(P, min(most, P))


def summary_of(per_rank: Sequence[float], batch_sizes: Sequence[int]) -> dict:
    """summary.json's fields for the data side: redundancy, per rank, batch per rank."""
    return {"redundancy": float(np.mean(per_rank)), "redundancy_per_rank": [float(m) for m in per_rank],
            "batch_per_rank": [int(b) for b in batch_sizes]}


__all__ = ["Holding", "Redundancy", "check_placement_fits", "drawn_from_part", "fraction_of", "part_size",
           "partial_draws", "partial_subset", "per_rank_redundancy", "summary_of"]
