"""Redundant cyclic chunk assignment (ALGORITHMS.md, "Data").

Rank ``i`` of ``P`` holds chunks ``(i + k) mod P`` for ``k = 0..q-1``, as in the RI-SGD
authors' code. These are pure functions so every rank derives the same answer from the
shared config, without communicating.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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


def chunk_holders(
    P: int, q: int, live_ranks: Iterable[int], adopted: Mapping[int, int] | None = None
) -> dict[int, int]:
    """For each chunk ``0..P-1``, how many of ``live_ranks`` hold it (0 if none).

    ``adopted`` (chunk -> rank, from :func:`adopt_orphans`) adds chunks taken over from
    ranks that left when a run resumed on fewer ranks.
    """
    _check_pq(P, q)
    holders = dict.fromkeys(range(int(P)), 0)
    # A set: a rank listed twice is still one holder.
    for rank in set(live_ranks):
        for c in held_chunks(P, q, rank, adopted):
            holders[c] += 1
    return holders


def coverage(P: int, q: int, live_ranks: Iterable[int], adopted: Mapping[int, int] | None = None) -> float:
    """Fraction of the ``P`` chunks held by at least one live rank."""
    holders = chunk_holders(P, q, live_ranks, adopted)
    return sum(1 for n in holders.values() if n > 0) / P


def adopt_orphans(
    P: int, q: int, live_ranks: Iterable[int], departed: Iterable[int], previous: Mapping[int, int] | None = None
) -> dict[int, int]:
    """Chunks that only ``departed`` ranks held -> the live rank that reads them from now on.

    Used when a run resumes on fewer ranks than it started with: the shards are still on
    disk, so no data need be lost. Earlier adoptions (``previous``) stay with a live adopter
    (its sampler holds their position); the other orphans go, in chunk order, to the live
    rank with the fewest adopted chunks (lowest rank on ties), so every rank derives the
    same plan without communicating.
    """
    _check_pq(P, q)
    live = sorted(set(live_ranks))
    if not live:
        raise ConfigError("no live rank to take over the chunks of departed ranks")
    adopted = {c: r for c, r in (previous or {}).items() if r in live}
    held = {c for r in live for c in chunks_for_rank(P, q, r)} | set(adopted)
    gone = {c for r in set(departed) for c in chunks_for_rank(P, q, r)}
    gone |= {c for c, r in (previous or {}).items() if r in set(departed)}
    for c in sorted(gone - held):
        load = {r: 0 for r in live}
        for r in adopted.values():
            load[r] += 1
        adopted[c] = min(live, key=lambda r: (load[r], r))
    return dict(sorted(adopted.items()))


def held_chunks(P: int, q: int, rank: int, adopted: Mapping[int, int] | None = None) -> tuple[int, ...]:
    """The chunks ``rank`` reads: its cyclic ``q`` plus any it adopted."""
    return chunks_for_rank(P, q, rank) + tuple(c for c, r in (adopted or {}).items() if r == rank)


def reweighted_batches(
    P: int, q: int, b: int, live_ranks: Iterable[int], adopted: Mapping[int, int] | None = None
) -> dict[int, tuple[dict[int, int], float]]:
    """Per live rank: samples per held chunk and a loss scale giving every covered chunk equal weight.

    Samples: each covered chunk keeps ``q*b`` per step, split over its live holders.
    Loss scale: a rank's loss is a mean over its own batch ``B_r``, so after the average
    of the L ranks' updates chunk c weighs ``sum_r n_cr / (B_r L)``; scaling rank r's loss
    by ``B_r L / (q b K)`` (K covered chunks) makes that ``1/K`` for every chunk, the
    weight each had before the failure (``1/P`` with all P chunks covered).
    """
    live = sorted(set(live_ranks))
    holders = chunk_holders(P, q, live, adopted)
    covered = sum(1 for n in holders.values() if n > 0)
    plan = {}
    for r in live:
        batch = {c: max(1, round(b * q / holders[c])) for c in held_chunks(P, q, r, adopted)}
        plan[r] = (batch, sum(batch.values()) * len(live) / (q * b * covered))
    return plan
