"""Redundant cyclic chunk assignment and coverage (ALGORITHMS.md, "Data")."""

from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcsgd.data.assignment import (
    adopt_orphans,
    chunk_holders,
    chunks_for_rank,
    coverage,
    draws_per_step,
    sample_plan,
)
from hpcsgd.errors import ConfigError

ALL_PQ = [(P, q) for P in range(1, 9) for q in range(1, P + 1)]


@pytest.mark.parametrize("P,q", ALL_PQ)
def test_assignment_is_cyclic_and_balanced(P, q):
    held = Counter()
    for rank in range(P):
        chunks = chunks_for_rank(P, q, rank)
        assert chunks == tuple((rank + k) % P for k in range(q))
        assert chunks[0] == rank  # own chunk first
        assert len(set(chunks)) == q
        held.update(chunks)
    assert held == {c: q for c in range(P)}
    assert chunk_holders(P, q, range(P)) == {c: q for c in range(P)}
    assert coverage(P, q, range(P)) == 1.0


def test_q_extremes():
    assert chunks_for_rank(4, 1, 2) == (2,)  # local SGD: own chunk only
    assert sorted(chunks_for_rank(4, 4, 2)) == [0, 1, 2, 3]  # everyone holds everything


@pytest.mark.parametrize(
    "P,q,live,expected",
    [
        (4, 2, [0, 2, 3], 1.0),  # rank 1 dead, its chunk 1 is also on rank 0
        (4, 1, [0, 2, 3], 0.75),  # no redundancy: chunk 1 is lost
        (4, 2, [0, 3], 0.75),  # ranks 1 and 2 dead: chunk 2 was on 1 and 2 only
        (4, 3, [0], 0.75),
        (4, 2, [], 0.0),
    ],
)
def test_coverage_examples(P, q, live, expected):
    assert coverage(P, q, live) == expected


def test_chunk_holders_counts_live_ranks():
    assert chunk_holders(4, 2, [0, 2, 3]) == {0: 2, 1: 1, 2: 1, 3: 2}
    assert chunk_holders(4, 2, [0, 0]) == {0: 1, 1: 1, 2: 0, 3: 0}


@pytest.mark.parametrize(
    "args,match",
    [
        ((0, 1, 0), "P"),
        ((8, 9, 0), r"q must be in 1\.\.P=8, got 9"),
        ((8, 0, 0), r"q must be in 1\.\.P=8, got 0"),
        ((4, 2, 4), r"rank must be in 0\.\.3"),
        ((4, 2, -1), r"rank must be in 0\.\.3"),
    ],
)
def test_bad_arguments(args, match):
    with pytest.raises(ConfigError, match=match):
        chunks_for_rank(*args)


def test_bad_live_rank():
    with pytest.raises(ConfigError, match=r"rank must be in 0\.\.3"):
        coverage(4, 2, [0, 7])


@pytest.mark.parametrize("P,q", ALL_PQ)
def test_adopting_orphans_restores_full_coverage(P, q):
    """Any set of departed ranks (at least one rank left): every chunk is read again."""
    for mask in range(1, 2**P):  # bit i set: rank i stays
        live = [r for r in range(P) if mask >> r & 1]
        departed = [r for r in range(P) if r not in live]
        adopted = adopt_orphans(P, q, live, departed)
        assert coverage(P, q, live, adopted) == 1.0
        assert set(adopted.values()) <= set(live)
        # Only chunks no live rank already held are adopted, each by one rank, spread evenly.
        assert not set(adopted) & {c for r in live for c in chunks_for_rank(P, q, r)}
        load = Counter(adopted.values())
        assert max(load.values(), default=0) - min((load[r] for r in live), default=0) <= 1


def test_adoption_examples_and_stickiness():
    assert adopt_orphans(4, 1, [0, 1, 2], [3]) == {3: 0}
    assert adopt_orphans(4, 2, [0, 1, 2], [3]) == {}  # chunk 3 is rank 2's second chunk
    assert adopt_orphans(4, 1, [0, 1], [2, 3]) == {2: 0, 3: 1}
    # A second departure keeps earlier adoptions where they are (that rank's sampler has them).
    assert adopt_orphans(4, 1, [0, 1], [2, 3], previous={3: 0}) == {2: 1, 3: 0}
    # An adopter that departs passes its adopted chunk on.
    assert adopt_orphans(4, 1, [1], [0, 2, 3], previous={3: 0}) == {0: 1, 2: 1, 3: 1}
    with pytest.raises(ConfigError, match="no live rank"):
        adopt_orphans(4, 1, [], [0, 1, 2, 3])


def _chunk_weights(P, q, b, live, adopted=None, sizes=None, **kwargs):
    """Exact weight of each chunk's mean loss in the average of the live ranks' updates.

    A rank's loss is ``sum_c a_c * sum_k loss_k``, so chunk c weighs ``(1/L) sum_r n_cr a_cr``.
    """
    plan = sample_plan(q, b, sizes or [100] * P, live, adopted, **kwargs)
    weights = Counter()
    for chunks in plan.values():
        for c, (n, a) in chunks.items():
            weights[c] += Fraction(n) * a / len(plan)
    return weights


@pytest.mark.parametrize("P,q", [(P, q) for P, q in ALL_PQ if P >= 2])
def test_reweighting_gives_every_covered_chunk_an_equal_weight(P, q):
    """Closed form: with all P chunks covered each weighs exactly 1/P, as with no failure,
    whatever the rounding of the split (b=5 does not divide by most holder counts)."""
    for b in (5, 12 * 5 * 7):
        clean = _chunk_weights(P, q, b, range(P), reweight=True)
        assert all(w == Fraction(1, P) for w in clean.values())
        for failed in range(P):
            live = [r for r in range(P) if r != failed]
            if coverage(P, q, live) == 1.0:
                weights = _chunk_weights(P, q, b, live, reweight=True)
                assert all(w == Fraction(1, P) for w in weights.values()), weights
            adopted = adopt_orphans(P, q, live, [failed])
            weights = _chunk_weights(P, q, b, live, adopted, reweight=True)
            assert sorted(weights) == list(range(P))
            assert all(w == Fraction(1, P) for w in weights.values()), weights


def test_reweighted_weights_sum_to_one_where_rounding_used_to_break_them():
    """P=4, q=3, b=5, live [0, 2]: the old round(q*b/holders) split summed to 1.033."""
    weights = _chunk_weights(4, 3, 5, [0, 2], reweight=True)
    assert sum(weights.values()) == 1 and len(set(weights.values())) == 1


def test_reweighting_example():
    """P=4, q=2, b=16, rank 3 gone: chunks 0 and 3 have one holder left, 1 and 2 two."""
    plan = sample_plan(2, 16, [100] * 4, [0, 1, 2], reweight=True)
    draws = {r: {c: n for c, (n, _) in chunks.items()} for r, chunks in plan.items()}
    assert draws[0] == {0: 32, 1: 16} and draws[1] == {1: 16, 2: 16} and draws[2] == {2: 16, 3: 32}
    # a_cr = w_c L / (holders_c n_cr) = (1/4) * 3 / 32 for every sample: the batch sums differ.
    assert all(a == Fraction(3, 128) for chunks in plan.values() for _, a in chunks.values())


def test_without_reweighting_the_weights_stay_as_they_were():
    """The papers' plain setting: a failure drops the failed rank's share, nothing moves."""
    before = sample_plan(2, 16, [100] * 4, range(4))
    after = sample_plan(2, 16, [100] * 4, [0, 1, 2])
    assert all(after[r] == before[r] for r in after)
    assert all(a == Fraction(1, 32) for chunks in before.values() for _, a in chunks.values())


def test_adopted_chunk_weighs_as_one_holder_without_reweighting():
    """q=1, rank 3 departs on resume and rank 0 adopts chunk 3: it must not get half weight."""
    adopted = adopt_orphans(4, 1, [0, 1, 2], [3])
    weights = _chunk_weights(4, 1, 16, [0, 1, 2], adopted)
    assert len(set(weights.values())) == 1 and sorted(weights) == [0, 1, 2, 3]


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 500), min_size=2, max_size=8),
    q_frac=st.floats(0, 1),
    b=st.integers(1, 40),
    failed=st.integers(0, 7),
)
def test_size_weighting_gives_every_sample_the_same_weight(sizes, q_frac, b, failed):
    """chunk_weighting = size: chunk weight / chunk size is the same for every chunk (the
    empirical risk), before a failure and, re-weighted, after one over the covered chunks."""
    P = len(sizes)
    q = 1 + round(q_frac * (P - 1))
    weights = _chunk_weights(P, q, b, range(P), sizes=sizes, weighting="size")
    assert {weights[c] / sizes[c] for c in range(P)} == {Fraction(1, sum(sizes))}
    live = [r for r in range(P) if r != failed % P]
    weights = _chunk_weights(P, q, b, live, sizes=sizes, weighting="size", reweight=True)
    covered = [c for c in range(P) if weights[c] > 0]
    assert {weights[c] / sizes[c] for c in covered} == {Fraction(1, sum(sizes[c] for c in covered))}


def test_size_weighting_draws_in_proportion_to_size():
    assert draws_per_step(16, [156, 451, 452, 379], "size") == [7, 20, 20, 17]
    assert draws_per_step(16, [156, 451, 452, 379], "uniform") == [16] * 4
    assert draws_per_step(16, [360, 360], "size") == [16, 16]
    # Uniform: each chunk weighs 1/P whatever its size.
    weights = _chunk_weights(4, 2, 16, range(4), sizes=[156, 451, 452, 379], weighting="uniform")
    assert set(weights.values()) == {Fraction(1, 4)}


def test_coverage_counts_samples_not_chunks():
    """Chunk sizes [200, 30, 20, 10], q = 1, rank 0 failed: 60 of 260 samples are held, not 3 of 4 chunks."""
    sizes = [200, 30, 20, 10]
    assert coverage(4, 1, [1, 2, 3], chunk_sizes=sizes) == pytest.approx(1 - 200 / 260)
    assert coverage(4, 1, [1, 2, 3]) == 0.75  # equal chunks: the fraction of chunks
    assert coverage(4, 2, [1, 2, 3], chunk_sizes=sizes) == 1.0  # chunk 0 is still held by rank 3
    assert coverage(4, 1, [0], adopted={1: 0}, chunk_sizes=sizes) == pytest.approx(230 / 260)
    with pytest.raises(ConfigError, match="size of each of the P=4 chunks"):
        coverage(4, 1, [0], chunk_sizes=[1, 2])
