"""Redundant chunk assignment (ALGORITHMS.md, "Data").

Rank ``i`` of ``P`` holds chunks ``(i + k) mod P`` for ``k = 0..q-1``, as in the RI-SGD
authors' code, or, with a spread :class:`~hpcsgd.data.placement.Placement`, ``(i + k*R) mod P``
so that a chunk's copies sit on different nodes. These are pure functions so every rank
derives the same answer from the shared config, without communicating.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from numbers import Integral

from hpcsgd.config import CHUNK_WEIGHTINGS
from hpcsgd.data.fractional import Redundancy
from hpcsgd.data.placement import CYCLIC, Placement
from hpcsgd.errors import ConfigError


def _check_pq(P: int, q: int) -> None:
    if not isinstance(P, Integral) or P < 1:
        raise ConfigError(f"P (number of ranks/chunks) must be an integer >= 1, got {P!r}")
    if not isinstance(q, Integral) or not 1 <= q <= P:
        raise ConfigError(f"q must be in 1..P={P}, got {q!r}")


def _check_rank(P: int, rank: int) -> None:
    if not isinstance(rank, Integral) or not 0 <= rank < P:
        raise ConfigError(f"rank must be in 0..{P - 1} (P={P}), got {rank!r}")


def chunks_for_rank(P: int, q: int, rank: int, placement: Placement | None = None) -> tuple[int, ...]:
    """Chunks held by ``rank``: its own chunk first, then ``q-1`` more as ``placement`` says
    (default cyclic: the next ``q-1``)."""
    _check_pq(P, q)
    _check_rank(P, rank)
    return (placement or CYCLIC).chunks(P, q, rank)


def _whole(P: int, q: int, rank: int, placement: Placement | None, redundancy: Redundancy | None) -> tuple[int, ...]:
    """The chunks ``rank`` holds whole: ``q`` placed ones, or its share under per-rank ``redundancy``."""
    if redundancy is None:
        return chunks_for_rank(P, q, rank, placement)
    _check_rank(P, rank)
    return redundancy.whole(rank)


def chunk_holders(
    P: int, q: int, live_ranks: Iterable[int], adopted: Mapping[int, int] | None = None,
    placement: Placement | None = None, redundancy: Redundancy | None = None,
) -> dict[int, int]:
    """For each chunk ``0..P-1``, how many of ``live_ranks`` hold it whole (0 if none).

    ``adopted`` (chunk -> rank, from :func:`adopt_orphans`) adds chunks taken over from
    ranks that left when a run resumed on fewer ranks. ``redundancy``: fractional or per-rank
    redundancy (then ``q`` is not used); a partial chunk does not count here.
    """
    _check_pq(P, q)
    holders = dict.fromkeys(range(int(P)), 0)
    # A set: a rank listed twice is still one holder.
    for rank in set(live_ranks):
        for c in held_chunks(P, q, rank, adopted, placement, redundancy):
            holders[c] += 1
    return holders


def coverage(P: int, q: int, live_ranks: Iterable[int], adopted: Mapping[int, int] | None = None,
             chunk_sizes: Sequence[int] | None = None, placement: Placement | None = None,
             redundancy: Redundancy | None = None) -> float:
    """Fraction of the training samples at least one live rank holds (ALGORITHMS.md, "Data").

    ``chunk_sizes``: the samples of each of the ``P`` chunks (the shard index's); None for
    chunks of equal size, where this is the fraction of chunks held. ``placement``: which
    chunks each rank holds (default cyclic). ``redundancy``: fractional or per-rank
    redundancy; a chunk no live rank holds whole then counts the union of the live ranks'
    partial subsets of it (its own sizes are ``redundancy.chunk_sizes``). The one place
    coverage is computed: metrics, summary.json and the failure messages all report this value.
    """
    live = list(live_ranks)
    holders = chunk_holders(P, q, live, adopted, placement, redundancy)
    if redundancy is not None:
        chunk_sizes = redundancy.chunk_sizes
    sizes = [1] * int(P) if chunk_sizes is None else [int(n) for n in chunk_sizes]
    if len(sizes) != P:
        raise ConfigError(f"coverage needs the size of each of the P={P} chunks, got {len(sizes)}")
    held = [c for c, n in holders.items() if n > 0]
    partly = redundancy.partly_covered(live, held) if redundancy is not None else 0
    return (sum(sizes[c] for c in held) + partly) / sum(sizes)


def adopt_orphans(
    P: int, q: int, live_ranks: Iterable[int], departed: Iterable[int], previous: Mapping[int, int] | None = None,
    placement: Placement | None = None, redundancy: Redundancy | None = None,
) -> dict[int, int]:
    """Chunks that only ``departed`` ranks held -> the live rank that reads them from now on.

    Used when a run resumes on fewer ranks than it started with: the shards are still on
    disk, so no data need be lost. Earlier adoptions (``previous``) stay with a live adopter
    (its sampler holds their position); the other orphans go, in chunk order, to the live
    rank with the fewest adopted chunks (lowest rank on ties), so every rank derives the
    same plan without communicating. Under ``redundancy`` a chunk counts as held only when a
    live rank holds it whole: one the survivors hold only a part of is adopted whole.
    """
    _check_pq(P, q)
    live = sorted(set(live_ranks))
    if not live:
        raise ConfigError("no live rank to take over the chunks of departed ranks")
    adopted = {c: r for c, r in (previous or {}).items() if r in live}
    held = {c for r in live for c in _whole(P, q, r, placement, redundancy)} | set(adopted)
    gone = {c for r in set(departed) for c in _whole(P, q, r, placement, redundancy)}
    gone |= {c for c, r in (previous or {}).items() if r in set(departed)}
    for c in sorted(gone - held):
        load = {r: 0 for r in live}
        for r in adopted.values():
            load[r] += 1
        adopted[c] = min(live, key=lambda r: (load[r], r))
    return dict(sorted(adopted.items()))


def held_chunks(P: int, q: int, rank: int, adopted: Mapping[int, int] | None = None,
                placement: Placement | None = None, redundancy: Redundancy | None = None) -> tuple[int, ...]:
    """The chunks ``rank`` reads whole: its placed ``q`` (or its whole share under ``redundancy``)
    plus any it adopted."""
    return _whole(P, q, rank, placement, redundancy) + tuple(c for c, r in (adopted or {}).items() if r == rank)


def draws_per_step(b: int, chunk_sizes: Sequence[int], weighting: str = "size") -> list[int]:
    """Samples each chunk gives a holder per step, before any failure (ALGORITHMS.md, "Data").

    ``uniform`` draws ``b`` from every chunk; ``size`` draws in proportion to the chunk's size,
    ``round(b * |C_c| / mean|C|)`` (at least 1), so that every chunk is walked about once per
    epoch of ``ceil(mean|C| / b)`` steps. Equal chunks draw ``b`` either way.
    """
    if weighting not in CHUNK_WEIGHTINGS:
        raise ConfigError(f"chunk_weighting must be one of {', '.join(CHUNK_WEIGHTINGS)}, got {weighting!r}")
    total, P = sum(chunk_sizes), len(chunk_sizes)
    if weighting == "uniform" or len(set(chunk_sizes)) == 1:
        return [int(b)] * P
    return [max(1, round(Fraction(b * n * P, total))) for n in chunk_sizes]


def sample_plan(
    q: int,
    b: int,
    chunk_sizes: Sequence[int],
    live_ranks: Iterable[int],
    adopted: Mapping[int, int] | None = None,
    *,
    weighting: str = "size",
    reweight: bool = False,
    placement: Placement | None = None,
) -> dict[int, dict[int, tuple[int, Fraction]]]:
    """Per live rank, ``{chunk: (samples per step, loss weight per sample)}``.

    A rank's loss is ``sum_c a_c * sum_k loss_k`` over its batch, and the strategies average
    the ranks' updates, so chunk ``c`` weighs ``(1/L) sum_r n_cr a_cr`` in the mean update.
    Weights are exact fractions chosen so that this is the chunk's target weight ``w_c``:
    ``|C_c| / N`` under ``size`` (every sample weighs the same: the empirical risk), ``1/P``
    under ``uniform``; with equal chunks every ``a_c`` is ``1/(q b)``, the plain batch mean.

    Before any failure, and after one without ``reweight`` (the papers' plain setting), the
    draws and per-sample weights stay as they were: a failed rank's share of its chunks is
    lost, and a chunk adopted from a departed rank weighs as one holder. With ``reweight``,
    each covered chunk keeps ``q * n_c`` draws per step split over its live holders and
    ``a_cr = w_c L / (holders_c n_cr)``, ``w_c`` renormalised over the covered chunks: every
    covered chunk gets back its target weight exactly, whatever the rounding of the split.
    """
    P = len(chunk_sizes)
    _check_pq(P, q)
    live = sorted(set(live_ranks))
    base = draws_per_step(b, chunk_sizes, weighting)
    if weighting == "size":
        target = [Fraction(n, sum(chunk_sizes)) for n in chunk_sizes]
    else:
        target = [Fraction(1, P)] * P
    plan: dict[int, dict[int, tuple[int, Fraction]]] = {}
    if not reweight:
        for r in live:
            plan[r] = {c: (base[c], target[c] * P / (q * base[c])) for c in held_chunks(P, q, r, adopted, placement)}
        return plan
    holders = chunk_holders(P, q, live, adopted, placement)
    covered = [c for c in range(P) if holders[c] > 0]
    norm = sum(target[c] for c in covered)
    for r in live:
        plan[r] = {}
        for c in held_chunks(P, q, r, adopted, placement):
            n = max(1, round(Fraction(q * base[c], holders[c])))
            plan[r][c] = (n, target[c] / norm * len(live) / (holders[c] * n))
    return plan
