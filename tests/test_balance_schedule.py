"""Speed balancing's schedule of decisions (a warm-up window inside the first epoch, then later
epochs' ends) and the sampler's draws across a mid-epoch change of batch sizes, against their
closed forms; serial (the collective decision and a trainer's resume: tests/test_balance_mpi.py)."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest

import hpcsgd
from hpcsgd.data.balance import MIN_WARMUP, SpeedBalance, first_decision, split_by_speed
from hpcsgd.data.fractional import partial_draws
from hpcsgd.errors import ConfigError

from test_api import dataset as api_dataset
from test_api import fake_world
from test_balance import FakeStrategy

P, B, N = 4, 4, 160  # 4 chunks of 40 samples, 10 steps per epoch at batch 4
NEW = [6, 2, 5, 3]  # the sizes after the change: the same sum, P * B


# --- the schedule of decisions ---------------------------------------------------------------


@pytest.mark.parametrize("spe, warmup, first", [
    (23, 0, 5), (100, 0, 25), (12, 0, 3), (8, 0, 3),  # a quarter of an epoch, at least MIN_WARMUP
    (5, 0, 3), (4, 0, 3), (3, 0, 2), (1, 0, 0),  # never past the first epoch's last step
    (23, 1, 1), (23, 10, 10), (23, 40, 22),  # as given, capped at the first epoch's end
])
def test_the_first_decision_follows_a_warm_up_window_inside_the_first_epoch(spe, warmup, first):
    assert MIN_WARMUP == 3
    assert first_decision(spe, warmup) == first


@pytest.mark.parametrize("bad", [-1, 2.5, True, "3"])
def test_a_bad_warm_up_is_refused_naming_the_key(bad):
    with pytest.raises(ConfigError, match="balance_warmup must be an integer >= 0"):
        first_decision(23, bad)


@pytest.mark.parametrize("spe, total, warmup", [(23, 230, 0), (8, 32, 0), (5, 15, 0), (1, 4, 0), (7, 7, 0),
                                                (23, 230, 22), (10, 25, 2), (10, 4, 0), (40, 400, 0)])
def test_decisions_fall_after_the_warm_up_then_at_later_epochs_ends_at_most_once_per_epoch(spe, total, warmup):
    due = [s for s in range(total) if SpeedBalance([8, 8], spe, total, warmup=warmup).due(s)]
    first = first_decision(spe, warmup)
    later = [k * spe - 1 for k in range(2, total // spe + 1) if k * spe < total]
    assert due == ([first] if first + 1 < total else []) + later
    assert len({s // spe for s in due}) == len(due)  # at most one per epoch
    assert total - 1 not in due  # the last step's sizes would draw nothing


def test_the_schedule_of_the_speed_balance_experiment():
    """10 epochs of 23 steps (jobs/configs/speed-balance.toml): sizes from step 6 on, not 23."""
    balance = SpeedBalance([32, 32], 23, 230)
    assert [s for s in range(230) if balance.due(s)] == [5, 45, 68, 91, 114, 137, 160, 183, 206]


def test_each_window_leaves_out_step_0_and_the_step_after_each_decision():
    balance = SpeedBalance([32, 32], steps_per_epoch=23, total_steps=230)
    windows, timed = [], []
    for step in range(70):
        before = balance.samples
        balance.record(step, 32, 0.01)
        if balance.samples > before:
            timed.append(step)
        if balance.due(step):
            windows.append(balance.samples // 32)
            balance.samples, balance.seconds = 0, 0.0
    assert timed == [s for s in range(70) if s not in (0, 6, 46, 69)]
    assert windows == [5, 39, 22]  # steps 1..5; 7..45; 47..68


def test_the_first_decision_takes_effect_inside_the_first_epoch_and_is_logged_with_that_step():
    balance = SpeedBalance([32, 32], steps_per_epoch=23, total_steps=230, maximum=640)
    for step in range(6):
        balance.record(step, 32, 100.0 if step == 0 else 0.02)
        assert balance.due(step) == (step == 5)
    sizes = balance.decide(FakeStrategy(0, [(0, 0.0), (160, 0.2)]), step=5)  # rank 1 at half speed
    assert sizes == split_by_speed([1600, 800], 64) == [43, 21]
    assert balance.changes == [{"step": 6, "batch_per_rank": [43, 21]}]


# --- the sampler's draws across a mid-epoch change -------------------------------------------


def _sampler(rank, **kw):
    return hpcsgd.RedundantSampler(api_dataset(N, 4), fake_world(rank, P), batch_size=B, seed=5, **kw)


def _draw(sampler, steps, change_at, start=0, resumed_after_change=False):
    """Batches ``start..steps-1``; the sizes change to NEW before step ``change_at`` (now=True)."""
    out = []
    for t in range(start, steps):
        if t == change_at and not resumed_after_change:
            sampler.set_batch_sizes(NEW, now=True)
        out.append(sampler.next_chunk_batch())
    return out


def _drawn(batches, chunk):
    """Every index drawn from ``chunk``, in order, and how many each step."""
    per_step = [[idx for c, idx in batch if c == chunk] for batch in batches]
    counts = [sum(len(i) for i in step) for step in per_step]
    flat = [i for step in per_step for part in step for i in part.tolist()]
    return flat, counts


def _passes(seed, rank, chunk, n, length):
    """The chunk's order pass after pass (sampler.py: pass k is default_rng([seed, rank, chunk, k]))."""
    order = np.concatenate([np.random.default_rng([seed, rank, chunk, k]).permutation(n)
                            for k in range(length // n + 1)])
    return order[:length].tolist()


@pytest.mark.parametrize("rank", range(P))
@pytest.mark.parametrize("change_at", [3, 10, 17])  # mid-epoch 0, an epoch boundary, mid-epoch 1
def test_a_mid_epoch_change_draws_the_new_sizes_from_the_next_step_each_sample_once_per_pass(rank, change_at):
    sampler = _sampler(rank, q=2)
    assert len(sampler) == 10
    batches = _draw(sampler, 40, change_at)
    assert len(sampler) == 10  # steps per epoch never change: every rank still takes 10
    for chunk in sampler.held_chunks:
        flat, counts = _drawn(batches, chunk)
        assert counts == [B] * change_at + [NEW[rank]] * (40 - change_at)
        # The draws continue the chunk's order: the passes' permutations, cut where steps end.
        assert flat == _passes(5, rank, chunk, 40, len(flat))
        for k in range(0, len(flat), 40):
            assert len(set(flat[k:k + 40])) == len(flat[k:k + 40])  # no sample twice in a pass


@pytest.mark.parametrize("rank", range(P))
def test_a_mid_epoch_change_restarts_a_partial_chunks_count_at_the_change(rank):
    sampler = _sampler(rank, redundancy=0.5)
    batches = _draw(sampler, 30, change_at=3)
    part = sampler.redundancy.holding(rank).partial
    flat, counts = _drawn(batches, part)
    half = Fraction(1, 2)
    assert counts == ([partial_draws(t, B, half) for t in range(3)]
                      + [partial_draws(t - 3, NEW[rank], half) for t in range(3, 30)])
    subset = sampler.redundancy.subset(rank)
    assert flat == subset[_passes(5, rank, part, len(subset), len(flat))].tolist()
    own, _ = _drawn(batches, rank)
    assert own == _passes(5, rank, rank, 40, len(own))


@pytest.mark.parametrize("kw", [{"q": 2}, {"redundancy": 0.5}], ids=["q2", "mu0.5"])
@pytest.mark.parametrize("saved_at, after_change", [
    (0, False), (2, False), (3, False),  # before the change
    (3, True),  # right after it (the state holds the new sizes, no step drawn with them yet)
    (4, True), (7, True), (10, True), (13, True),  # mid-epoch after it, an epoch boundary, the next epoch
])
def test_a_resume_from_a_state_saved_anywhere_around_a_mid_epoch_change_draws_the_same(kw, saved_at, after_change):
    for rank in range(P):
        whole = _draw(_sampler(rank, **kw), 30, change_at=3)
        first = _sampler(rank, **kw)
        _draw(first, saved_at, change_at=3)
        if after_change and saved_at == 3:
            first.set_batch_sizes(NEW, now=True)
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
        resumed = _sampler(rank, **kw)
        resumed.load_state_dict(state)
        rest = _draw(resumed, 30, change_at=3, start=saved_at, resumed_after_change=after_change)
        assert len(rest) == len(whole[saved_at:])
        for a, b in zip(rest, whole[saved_at:]):
            assert [c for c, _ in a] == [c for c, _ in b]
            assert all(np.array_equal(i, j) for (_, i), (_, j) in zip(a, b))


def test_without_now_the_change_still_waits_for_the_next_epoch():
    sampler = _sampler(0, q=2)
    sampler.next_chunk_batch()
    sampler.set_batch_sizes(NEW)
    drawn = [sum(len(i) for _, i in sampler.next_chunk_batch()) for _ in range(10)]
    assert drawn == [2 * B] * 9 + [2 * NEW[0]]
