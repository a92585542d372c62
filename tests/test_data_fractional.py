"""Fractional and per-rank redundancy on one process (ALGORITHMS.md, "Fractional and per-rank redundancy"):
the per-rank draw, the holdings, the per-step draws and coverage against their closed forms,
failures (adoption), the sampler's batches, resume and per-rank batch sizes."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hpcsgd
from hpcsgd.data import adopt_orphans, chunks_for_rank, coverage
from hpcsgd.data.fractional import (
    Redundancy,
    drawn_from_part,
    fraction_of,
    partial_draws,
    partial_subset,
    per_rank_redundancy,
)
from hpcsgd.data.placement import Placement
from hpcsgd.data.sampler import StratifiedSampler
from hpcsgd.errors import ConfigError

from test_api import dataset as api_dataset
from test_api import fake_world


def dataset(n=160, classes=4):
    return api_dataset(n, classes)


# --- the per-rank draw -------------------------------------------------------------------


def test_per_rank_redundancy_is_the_mean_without_spread_and_a_seeded_shifted_draw_with_it():
    assert per_rank_redundancy(4, 0.5) == (0.5,) * 4
    drawn = per_rank_redundancy(4, 1.5, 0.01, seed=7)
    assert drawn == per_rank_redundancy(4, 1.5, 0.01, seed=7)  # the same on every rank, in every resume
    assert drawn != per_rank_redundancy(4, 1.5, 0.01, seed=8)
    assert len(set(drawn)) == 4
    assert math.isclose(np.mean(drawn), 1.5, abs_tol=1e-12)  # shifted back to mean mu (no clipping here)
    raw = np.random.default_rng([7, 21]).normal(1.5, 0.01, 4)
    assert np.array_equal(np.asarray(drawn), np.clip(raw - raw.mean() + 1.5, 0, 3))


@settings(max_examples=60, deadline=None)
@given(P=st.integers(1, 9), mu=st.floats(0, 8), sigma=st.floats(0, 5), seed=st.integers(0, 2**32))
def test_drawn_redundancies_stay_in_zero_to_p_minus_one(P, mu, sigma, seed):
    mu = min(mu, P - 1)
    drawn = per_rank_redundancy(P, mu, sigma, seed=seed)
    assert len(drawn) == P and all(0 <= m <= P - 1 for m in drawn)


@pytest.mark.parametrize("kwargs, words", [
    (dict(P=4, mu=3.5), "redundancy must be a number in [0, P-1] = [0, 3]"),
    (dict(P=4, mu=-0.1), "redundancy must be"),
    (dict(P=4, mu=float("nan")), "redundancy must be"),
    (dict(P=4, mu=0.5, spread=-1.0), "redundancy_spread must be a finite number >= 0"),
    (dict(P=4, mu=0.5, per_rank=[0.5, 0.5]), "one value per rank: 2 values for P=4"),
    (dict(P=4, mu=0.5, per_rank=[0.5, 0.5, 4.0, 0.5]), "redundancy_per_rank[2] must be"),
])
def test_bad_redundancies_are_refused_by_name(kwargs, words):
    with pytest.raises(ConfigError, match=None) as err:
        per_rank_redundancy(**kwargs)
    assert words in str(err.value)


# --- draws per step ----------------------------------------------------------------------


def test_mu_half_and_quarter_draws_are_the_closed_forms():
    half = Fraction(1, 2)
    assert [partial_draws(t, 8, half) for t in range(6)] == [4] * 6
    assert [partial_draws(t, 5, half) for t in range(6)] == [2, 3, 2, 3, 2, 3]  # floor((t+1) 2.5) - floor(t 2.5)
    assert [partial_draws(t, 6, Fraction(1, 4)) for t in range(4)] == [1, 2, 1, 2]
    assert fraction_of(2.25) == Fraction(1, 4) and fraction_of(1.0) == 0


@settings(max_examples=200, deadline=None)
@given(T=st.integers(0, 500), b=st.integers(1, 64), mu=st.floats(0, 7.99))
def test_partial_draws_sum_to_floor_t_b_f_and_differ_by_at_most_one(T, b, mu):
    f = fraction_of(mu)
    draws = [partial_draws(t, b, f) for t in range(T)]
    assert sum(draws) == drawn_from_part(T, b, f) == math.floor(T * b * f)
    assert all(math.floor(b * f) <= n <= math.ceil(b * f) for n in draws)


# --- holdings ----------------------------------------------------------------------------


def test_holdings_whole_chunks_then_a_subset_of_the_next():
    sizes = (10, 11, 12, 13)
    r = Redundancy((0.5,) * 4, sizes, seed=3)
    for i in range(4):
        h = r.holding(i)
        assert h.whole == (i,) and h.partial == (i + 1) % 4 and h.fraction == Fraction(1, 2)
        assert h.part_size == round(sizes[(i + 1) % 4] / 2)
        sub = r.subset(i)
        perm = np.random.default_rng([3, i, (i + 1) % 4]).permutation(sizes[(i + 1) % 4])
        assert np.array_equal(sub, perm[: h.part_size])
    big = Redundancy((1.25,) * 4, sizes).holding(3)
    assert big.whole == (3, 0) and big.partial == 1 and big.part_size == round(11 / 4)
    spread = Redundancy((0.5,) * 4, sizes, placement=Placement("spread", 2)).holding(1)
    assert spread.whole == (1,) and spread.partial == 3  # the next copy on another node


@settings(max_examples=60, deadline=None)
@given(P=st.integers(1, 8), q=st.integers(1, 8), seed=st.integers(0, 100))
def test_an_integer_mu_holds_exactly_the_q_chunks_of_q_equals_one_plus_mu(P, q, seed):
    q = min(q, P)
    r = Redundancy((float(q - 1),) * P, (5,) * P, seed)
    assert r.integer
    for i in range(P):
        assert r.whole(i) == chunks_for_rank(P, q, i) and r.subset(i) is None


def test_partial_subset_is_a_set_of_distinct_indices_of_the_chunk():
    sub = partial_subset(0, 1, 2, 100, 37)
    assert len(set(sub.tolist())) == 37 and sub.min() >= 0 and sub.max() < 100


# --- coverage and failures ---------------------------------------------------------------


def test_coverage_of_mu_half_is_the_closed_form_in_samples():
    n, P = 10, 4
    r = Redundancy((0.5,) * P, (n,) * P)
    cov = lambda live: coverage(P, 1, live, redundancy=r)  # noqa: E731
    assert cov(range(P)) == 1.0
    # rank 2 gone: chunk 2 survives only in rank 1's half of it
    assert cov([0, 1, 3]) == (3 * n + n // 2) / (P * n)
    # ranks 1 and 2 gone: chunk 1's half survives at rank 0, chunk 2's half went with rank 1
    assert cov([0, 3]) == (2 * n + n // 2) / (P * n)
    # unequal chunks: counted in samples
    sizes = (10, 20, 30, 40)
    r = Redundancy((0.5,) * P, sizes)
    assert coverage(P, 1, [0, 1, 3], redundancy=r) == (10 + 20 + 40 + 15) / 100


@settings(max_examples=60, deadline=None)
@given(P=st.integers(1, 7), q=st.integers(1, 7), live=st.sets(st.integers(0, 6), min_size=1))
def test_coverage_of_an_integer_mu_equals_that_of_q(P, q, live):
    q, live = min(q, P), {r for r in live if r < P} or {0}
    sizes = tuple(range(3, 3 + P))
    r = Redundancy((float(q - 1),) * P, sizes)
    assert coverage(P, q, live, redundancy=r) == coverage(P, q, live, chunk_sizes=sizes)


def test_a_chunk_the_survivors_hold_only_in_part_is_adopted_whole():
    P = 4
    r = Redundancy((0.5,) * P, (10,) * P)
    adopted = adopt_orphans(P, 1, [0, 1, 3], [2], redundancy=r)
    assert adopted == {2: 0}  # rank 1 holds half of chunk 2: not enough, rank 0 reads it whole
    assert coverage(P, 1, [0, 1, 3], adopted, redundancy=r) == 1.0
    # a chunk still held whole elsewhere is no orphan: mu = 1.5 keeps chunk 2 whole at rank 1
    r = Redundancy((1.5,) * P, (10,) * P)
    assert adopt_orphans(P, 1, [0, 1, 3], [2], redundancy=r) == {}


# --- the stream with a partial chunk -----------------------------------------------------


def test_stream_draws_n_t_from_the_subset_walking_it_pass_after_pass():
    subset = partial_subset(5, 0, 1, 30, 15)
    s = StratifiedSampler({0: 30}, 6, seed=5, rank=0)
    s.hold_part(1, 30, subset, Fraction(1, 4), 6)
    got = [dict(s.next_batch()) for _ in range(10)]
    assert [len(b[0]) for b in got] == [6] * 10
    assert [len(b.get(1, ())) for b in got] == [partial_draws(t, 6, Fraction(1, 4)) for t in range(10)]
    walked = np.concatenate([b[1] for b in got if 1 in b])
    assert len(walked) == 15 and sorted(walked.tolist()) == sorted(subset.tolist())  # one pass: each once


def test_stream_resumes_and_seeks_to_the_same_place():
    def fresh():
        s = StratifiedSampler({2: 17}, 4, seed=1, rank=2)
        s.hold_part(3, 23, partial_subset(1, 2, 3, 23, 9), Fraction(3, 8), 4)
        return s

    walked = fresh()
    for _ in range(7):
        walked.next_batch()
    restored = fresh()
    restored.load_state_dict(walked.state_dict())
    sought = fresh()
    sought.seek_steps(7)
    for _ in range(9):
        a, b, c = walked.next_batch(), restored.next_batch(), sought.next_batch()
        assert [(k, v.tolist()) for k, v in a] == [(k, v.tolist()) for k, v in b] == [(k, v.tolist()) for k, v in c]


# --- RedundantSampler --------------------------------------------------------------------


def _batches(sampler, n):
    return [sampler.next_indices() for _ in range(n)]


@pytest.mark.parametrize("mu, q", [(0.0, 1), (1.0, 2), (3.0, 4)])
def test_integer_mu_gives_the_batches_of_q(mu, q):
    for r in range(4):
        a = hpcsgd.RedundantSampler(dataset(), fake_world(r, 4), redundancy=mu, batch_size=5, partition="label", seed=2)
        b = hpcsgd.RedundantSampler(dataset(), fake_world(r, 4), q=q, batch_size=5, partition="label", seed=2)
        assert a.redundancy is None and len(a) == len(b)
        assert _batches(a, 20) == _batches(b, 20)


def test_mu_half_draws_own_chunk_and_its_subset_of_the_next():
    P, b = 4, 6
    for r in range(P):
        s = hpcsgd.RedundantSampler(dataset(), fake_world(r, P), redundancy=0.5, batch_size=b, partition="label", seed=4)
        own, nxt = set(s.chunks[r].tolist()), s.chunks[(r + 1) % P]
        part = set(nxt[s.redundancy.subset(r)].tolist())
        assert len(part) == round(len(nxt) / 2)
        for batch in _batches(s, len(s)):
            assert len(batch) == b + 3 and set(batch[:b]) <= own and set(batch[b:]) <= part
        assert s.coverage(range(P)) == 1.0
        assert s.coverage([p for p in range(P) if p != 2]) == (120 + 20) / 160


def test_q_and_redundancy_that_disagree_are_refused_naming_both():
    with pytest.raises(ConfigError, match=r"q=3 and redundancy=0.5 disagree"):
        hpcsgd.RedundantSampler(dataset(), fake_world(0, 4), q=3, redundancy=0.5)
    hpcsgd.RedundantSampler(dataset(), fake_world(0, 4), q=2, redundancy=1.0)  # they agree: fine


def test_drawn_per_rank_redundancy_is_the_same_on_every_rank_and_after_a_resume():
    kw = dict(redundancy=1.0, redundancy_spread=0.3, batch_size=4, seed=9)
    samplers = [hpcsgd.RedundantSampler(dataset(), fake_world(r, 4), **kw) for r in range(4)]
    assert len({s.redundancy_per_rank for s in samplers}) == 1
    assert math.isclose(np.mean(samplers[0].redundancy_per_rank), 1.0, abs_tol=1e-12)
    s = samplers[1]
    _batches(s, 13)
    resumed = hpcsgd.RedundantSampler(dataset(), fake_world(1, 4), **kw)
    resumed.load_state_dict(s.state_dict())
    assert resumed.redundancy_per_rank == s.redundancy_per_rank
    assert _batches(resumed, 25) == _batches(s, 25)


def test_per_rank_batch_sizes_keep_one_length_and_change_at_the_next_epoch():
    P = 4
    samplers = [hpcsgd.RedundantSampler(dataset(), fake_world(r, P), batch_size=[2, 4, 6, 8], seed=1) for r in range(P)]
    assert {len(s) for s in samplers} == {math.ceil(160 / 20)}
    assert [len(s.next_indices()) for s in samplers] == [2, 4, 6, 8]
    s = samplers[0]
    s.set_batch_sizes([5, 5, 5, 5])
    assert [len(b) for b in _batches(s, len(s) - 1)] == [2] * (len(s) - 1)  # the rest of this epoch
    assert len(s.next_indices()) == 5 and len(s) == 8  # the next epoch: the new size, the same length
    with pytest.raises(ConfigError, match="one value or one per rank: 3 values for P=4"):
        s.set_batch_sizes([1, 2, 3])


def test_set_batch_sizes_survives_a_resume():
    s = hpcsgd.RedundantSampler(dataset(), fake_world(2, 4), redundancy=0.5, batch_size=4, seed=1)
    s.set_batch_sizes([3, 3, 5, 5])
    _batches(s, 11)
    resumed = hpcsgd.RedundantSampler(dataset(), fake_world(2, 4), redundancy=0.5, batch_size=4, seed=1)
    resumed.load_state_dict(s.state_dict())
    assert _batches(resumed, 20) == _batches(s, 20)


def test_a_resume_on_fewer_processes_plans_with_the_runs_redundancy_and_refuses_per_rank_lists():
    # The job's sampler is built for W = 2 processes; the run it resumes had P = 4 ranks.
    s = hpcsgd.RedundantSampler(dataset(), fake_world(0, 2), redundancy=0.5, redundancy_spread=0.1, batch_size=4, seed=3)
    q, sizes, redundancy = s.for_run(4)
    run = hpcsgd.RedundantSampler(dataset(), fake_world(0, 4), redundancy=0.5, redundancy_spread=0.1, batch_size=4, seed=3)
    assert (q, sizes) == (1, list(run.chunk_sizes))
    assert redundancy.per_rank == run.redundancy_per_rank and redundancy.chunk_sizes == tuple(run.chunk_sizes)
    assert hpcsgd.RedundantSampler(dataset(), fake_world(0, 2), q=2, seed=3).for_run(4)[::2] == (2, None)
    for per_rank in (dict(batch_size=[2, 6]), dict(redundancy=[0.5, 1.0])):
        listed = hpcsgd.RedundantSampler(dataset(), fake_world(0, 2), seed=3, **per_rank)
        with pytest.raises(ConfigError, match="per-rank lists name the processes of this job, not the run's ranks"):
            listed.for_run(4)
