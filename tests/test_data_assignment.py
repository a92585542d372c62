"""Redundant cyclic chunk assignment and coverage (ALGORITHMS.md, "Data")."""

from collections import Counter

import pytest

from hpcsgd.data.assignment import adopt_orphans, chunk_holders, chunks_for_rank, coverage, reweighted_batches
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


def _chunk_weights(P, q, b, live, adopted=None):
    """Weight of each chunk's mean gradient in the average of the live ranks' updates."""
    plan = reweighted_batches(P, q, b, live, adopted)
    weights = Counter()
    for batch, scale in plan.values():
        size = sum(batch.values())
        for c, n in batch.items():
            weights[c] += scale * n / size / len(plan)
    return weights


@pytest.mark.parametrize("P,q", [(P, q) for P, q in ALL_PQ if P >= 2])
def test_reweighting_gives_every_covered_chunk_an_equal_weight(P, q):
    """Closed form: with all P chunks covered each weighs 1/P, as with no failure."""
    b = 12 * 5 * 7  # divisible by every holder count up to 8: the split is exact
    clean = _chunk_weights(P, q, b, range(P))
    assert all(w == pytest.approx(1 / P) for w in clean.values())
    for failed in range(P):
        live = [r for r in range(P) if r != failed]
        if coverage(P, q, live) == 1.0:
            weights = _chunk_weights(P, q, b, live)
            assert all(w == pytest.approx(1 / P) for w in weights.values()), weights
        adopted = adopt_orphans(P, q, live, [failed])
        weights = _chunk_weights(P, q, b, live, adopted)
        assert sorted(weights) == list(range(P))
        assert all(w == pytest.approx(1 / P) for w in weights.values()), weights


def test_reweighting_example():
    """P=4, q=2, b=16, rank 3 gone: chunks 0 and 3 have one holder left, 1 and 2 two."""
    plan = reweighted_batches(4, 2, 16, [0, 1, 2])
    assert plan[0][0] == {0: 32, 1: 16} and plan[1][0] == {1: 16, 2: 16} and plan[2][0] == {2: 16, 3: 32}
    assert plan[0][1] == pytest.approx(48 * 3 / (2 * 16 * 4)) and plan[1][1] == pytest.approx(32 * 3 / 128)
