"""The stratified per-chunk sampler."""

import json
import math

import numpy as np
import pytest

from hpcsgd.data.sampler import StratifiedSampler, gather_batch, steps_per_epoch
from hpcsgd.errors import CheckpointError, ConfigError


def run(sampler, steps):
    return [[(c, idx.tolist()) for c, idx in sampler.next_batch()] for _ in range(steps)]


def test_determinism_and_rank_dependence():
    sizes = {2: 10, 3: 7}
    a = run(StratifiedSampler(sizes, 3, seed=1, rank=2), 8)
    b = run(StratifiedSampler(sizes, 3, seed=1, rank=2), 8)
    c = run(StratifiedSampler(sizes, 3, seed=1, rank=1), 8)
    d = run(StratifiedSampler(sizes, 3, seed=2, rank=2), 8)
    assert a == b and a != c and a != d


def test_order_follows_the_specified_permutation():
    s = StratifiedSampler({5: 6}, 4, seed=3, rank=1)
    first, second = s.next_batch()[0][1], s.next_batch()[0][1]
    p0 = np.random.default_rng([3, 1, 5, 0]).permutation(6)
    p1 = np.random.default_rng([3, 1, 5, 1]).permutation(6)
    assert first.tolist() == p0[:4].tolist()
    assert second.tolist() == p0[4:].tolist() + p1[:2].tolist()  # wraps into the next pass


def test_stratified_batches():
    s = StratifiedSampler({0: 20, 1: 13, 2: 5}, {0: 4, 1: 2, 2: 3}, seed=0, rank=0)
    assert s.chunks == (0, 1, 2) and s.batch_size == 9
    for _ in range(10):
        batch = s.next_batch()
        assert [c for c, _ in batch] == [0, 1, 2]  # the given order
        assert [len(i) for _, i in batch] == [4, 2, 3]
        for c, idx in batch:
            assert idx.dtype == np.int64
            assert idx.min() >= 0 and idx.max() < {0: 20, 1: 13, 2: 5}[c]


@pytest.mark.parametrize("n,b", [(12, 3), (12, 4), (7, 7), (12, 1)])
def test_without_replacement_within_a_pass(n, b):
    s = StratifiedSampler({0: n, 1: 2 * n}, b, seed=4, rank=0)
    steps = steps_per_epoch(n, b)
    assert steps == n // b
    seen = [np.concatenate([s.next_batch()[0][1] for _ in range(steps)]) for _ in range(3)]
    for epoch in seen:
        assert sorted(epoch.tolist()) == list(range(n))
    assert seen[0].tolist() != seen[1].tolist()  # a new shuffle every pass


def test_batch_larger_than_chunk_wraps_through_passes():
    s = StratifiedSampler({0: 3}, 8, seed=0, rank=0)
    idx = np.concatenate([s.next_batch()[0][1] for _ in range(3)])  # 24 = 8 passes of 3
    for k in range(8):
        assert sorted(idx[3 * k : 3 * k + 3].tolist()) == [0, 1, 2]
    assert s.state_dict()["chunks"][0]["pass_index"] == 7


def test_state_dict_round_trip_continues_identically():
    sizes, b = {4: 11, 5: 9, 6: 4}, {4: 3, 5: 2, 6: 5}
    ref = StratifiedSampler(sizes, b, seed=9, rank=4)
    expected = run(ref, 20)
    s = StratifiedSampler(sizes, b, seed=9, rank=4)
    head = run(s, 7)
    state = json.loads(json.dumps(s.state_dict()))  # survives a JSON checkpoint
    resumed = StratifiedSampler(sizes, b, seed=9, rank=4)
    resumed.load_state_dict(state)
    assert head + run(resumed, 13) == expected


def test_state_dict_mismatch():
    s = StratifiedSampler({0: 5, 1: 5}, 2, seed=0, rank=0)
    state = s.state_dict()
    with pytest.raises(CheckpointError, match="rank=1"):
        StratifiedSampler({0: 5, 1: 5}, 2, seed=0, rank=1).load_state_dict(state)
    with pytest.raises(CheckpointError, match="holds chunks"):
        StratifiedSampler({0: 5, 2: 5}, 2, seed=0, rank=0).load_state_dict(state)
    with pytest.raises(CheckpointError, match="size 5"):
        StratifiedSampler({0: 5, 1: 6}, 2, seed=0, rank=0).load_state_dict(state)
    with pytest.raises(CheckpointError, match="malformed"):
        s.load_state_dict({"chunks": []})


def test_validation():
    with pytest.raises(ConfigError, match=r"batch per chunk \(chunk 0\) must be an integer >= 1"):
        StratifiedSampler({0: 5}, 0, seed=0, rank=0)
    with pytest.raises(ConfigError, match="size of chunk 0 must be an integer >= 1, got 0"):
        StratifiedSampler({0: 0}, 1, seed=0, rank=0)
    with pytest.raises(ConfigError, match="no entry for chunk 1"):
        StratifiedSampler({0: 5, 1: 5}, {0: 1}, seed=0, rank=0)
    with pytest.raises(ConfigError, match="seed"):
        StratifiedSampler({0: 5}, 1, seed=-1, rank=0)
    with pytest.raises(ConfigError):
        steps_per_epoch(10, 0)


def test_steps_per_epoch():
    for n in range(1, 30):
        for b in range(1, 12):
            assert steps_per_epoch(n, b) == math.ceil(n / b)


def test_gather_batch():
    data = {
        0: (np.arange(10.0)[:, None], np.arange(10)),
        1: (-np.arange(4.0)[:, None], np.arange(4)),
    }
    s = StratifiedSampler({0: 10, 1: 4}, 2, seed=0, rank=0)
    batch = s.next_batch()
    x, y = gather_batch(batch, data)
    assert x.shape == (4, 1) and y.shape == (4,)
    assert x[:2, 0].tolist() == batch[0][1].tolist()
    assert x[2:, 0].tolist() == (-batch[1][1]).tolist()


def test_adopted_chunk_is_drawn_and_may_be_missing_from_an_older_state():
    s = StratifiedSampler({0: 10}, 2, seed=1, rank=0)
    old = json.loads(json.dumps(s.state_dict()))  # before the adoption
    s.next_batch()
    s.adopt(3, 7, 3)
    assert s.chunks == (0, 3) and s.batch_size == 5
    batch = s.next_batch()
    assert [c for c, _ in batch] == [0, 3]
    # Its order is keyed by this rank and starts a fresh pass, as for any chunk it holds.
    assert np.array_equal(batch[1][1], StratifiedSampler({3: 7}, 3, seed=1, rank=0).next_batch()[0][1])
    t = StratifiedSampler({0: 10}, 2, seed=1, rank=0)
    t.adopt(3, 7, 3)
    with pytest.raises(CheckpointError, match="holds chunks"):
        t.load_state_dict(old)
    t.load_state_dict(old, fresh=[3])  # adopted since the state was saved: starts anew
    assert [len(i) for _, i in t.next_batch()] == [2, 3]
    with pytest.raises(ConfigError, match="already held"):
        t.adopt(0, 10, 2)
