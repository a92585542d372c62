"""Redundant cyclic chunk assignment and coverage (ALGORITHMS.md, "Data")."""

from collections import Counter

import pytest

from hpcsgd.data.assignment import chunk_holders, chunks_for_rank, coverage
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
