"""Redundant cyclic chunk assignment (ALGORITHMS.md, "Data").

Rank ``i`` of ``P`` holds chunks ``(i + k) mod P`` for ``k = 0..q-1``, as in the RI-SGD
authors' code. These are pure functions so every rank derives the same answer from the
shared config, without communicating.
"""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Integral

from hpcsgd.errors import ConfigError


def _check_pq(P: int, q: int) -> None:
    if not isinstance(P, Integral) or P < 1:
        raise ConfigError(f"P (number of ranks/chunks) must be an integer >= 1, got {P!r}")
    if not isinstance(q, Integral) or not 1 <= q <= P:
        raise ConfigError(f"q must be in 1..P={P}, got {q!r}")


def _check_rank(P: int, rank: int) -> None:
    if not isinstance(rank, Integral) or not 0 <= rank < P:
        raise ConfigError(f"rank must be in 0..{P - 1} (P={P}), got {rank!r}")


def chunks_for_rank(P: int, q: int, rank: int) -> tuple[int, ...]:
    """Chunks held by ``rank``: its own chunk first, then the next ``q-1`` cyclically."""
    _check_pq(P, q)
    _check_rank(P, rank)
    return tuple((int(rank) + k) % int(P) for k in range(int(q)))


def chunk_holders(P: int, q: int, live_ranks: Iterable[int]) -> dict[int, int]:
    """For each chunk ``0..P-1``, how many of ``live_ranks`` hold it (0 if none)."""
    _check_pq(P, q)
    holders = dict.fromkeys(range(int(P)), 0)
    # A set: a rank listed twice is still one holder.
    for rank in set(live_ranks):
        _check_rank(P, rank)
        for c in chunks_for_rank(P, q, rank):
            holders[c] += 1
    return holders


def coverage(P: int, q: int, live_ranks: Iterable[int]) -> float:
    """Fraction of the ``P`` chunks held by at least one live rank."""
    holders = chunk_holders(P, q, live_ranks)
    return sum(1 for n in holders.values() if n > 0) / P
