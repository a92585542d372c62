"""Partitions of the training set into P chunks."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcsgd.data.partition import parse_partition, partition_indices
from hpcsgd.errors import ConfigError


def labels_fixture(n=200, k=5, seed=1):
    return np.random.default_rng(seed).integers(0, k, size=n)


def assert_partition(chunks, n, P):
    assert len(chunks) == P
    for c in chunks:
        assert c.dtype == np.int64
        assert np.all(np.diff(c) > 0)  # sorted, no repeats
        assert len(c) > 0
    everything = np.concatenate(chunks)
    assert len(everything) == n
    assert np.array_equal(np.sort(everything), np.arange(n))


def test_parse_partition():
    assert parse_partition("iid") == ("iid", None)
    assert parse_partition("label") == ("label", None)
    assert parse_partition("dirichlet:0.5") == ("dirichlet", 0.5)
    for bad in ["", "random", "dirichlet", "dirichlet:", "dirichlet:0", "dirichlet:-1",
                "dirichlet:abc", "dirichlet:inf", "dirichlet:nan"]:
        with pytest.raises(ConfigError, match="partition"):
            parse_partition(bad)


@pytest.mark.parametrize("spec", ["iid", "label", "dirichlet:0.5", "dirichlet:100"])
@pytest.mark.parametrize("P", [1, 3, 8])
def test_disjoint_and_complete(spec, P):
    y = labels_fixture()
    assert_partition(partition_indices(y, P, spec, seed=3), len(y), P)


def test_iid_sizes_and_seed():
    y = labels_fixture(n=103)
    chunks = partition_indices(y, 4, "iid", seed=0)
    sizes = [len(c) for c in chunks]
    assert max(sizes) - min(sizes) <= 1
    again = partition_indices(y, 4, "iid", seed=0)
    other = partition_indices(y, 4, "iid", seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(chunks, again))
    assert not all(np.array_equal(a, b) for a, b in zip(chunks, other))


def test_label_chunks_are_sorted_and_contiguous():
    y = labels_fixture(n=101, k=7)
    chunks = partition_indices(y, 5, "label", seed=0)
    sizes = [len(c) for c in chunks]
    assert max(sizes) - min(sizes) <= 1
    # Chunk c's labels all come before chunk c+1's in label order.
    for a, b in zip(chunks, chunks[1:]):
        assert y[a].max() <= y[b].min()
    # And the cut is the stable argsort cut contiguously.
    order = np.argsort(y, kind="stable")
    assert all(np.array_equal(c, np.sort(p)) for c, p in zip(chunks, np.array_split(order, 5)))
    # The seed plays no part.
    other = partition_indices(y, 5, "label", seed=9)
    assert all(np.array_equal(a, b) for a, b in zip(chunks, other))


def test_dirichlet_deterministic_and_skewed():
    y = labels_fixture(n=1000, k=10)
    a = partition_indices(y, 4, "dirichlet:0.1", seed=5)
    b = partition_indices(y, 4, "dirichlet:0.1", seed=5)
    c = partition_indices(y, 4, "dirichlet:0.1", seed=6)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c))
    # Small alpha: at least one chunk misses some class entirely.
    assert any(len(np.unique(y[ch])) < 10 for ch in a)


def test_dirichlet_gives_up_when_chunks_stay_empty():
    y = np.zeros(3, dtype=np.int64)
    with pytest.raises(ConfigError, match="empty"):
        partition_indices(y, 3, "dirichlet:0.001", seed=0)


def test_more_parts_than_samples():
    with pytest.raises(ConfigError, match=r"1\.\.N=3"):
        partition_indices(np.array([0, 1, 0]), 4, "iid", seed=0)


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 6), min_size=1, max_size=150),
    P=st.integers(1, 12),
    spec=st.sampled_from(["iid", "label", "dirichlet:1.0", "dirichlet:50"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_partition_property(labels, P, spec, seed):
    y = np.asarray(labels)
    if P > len(y):
        with pytest.raises(ConfigError):
            partition_indices(y, P, spec, seed)
        return
    try:
        chunks = partition_indices(y, P, spec, seed)
    except ConfigError as e:
        # Dirichlet may legitimately fail to fill every chunk of a tiny set.
        assert spec.startswith("dirichlet") and "empty" in str(e)
        return
    assert_partition(chunks, len(y), P)
    if spec in ("iid", "label"):
        sizes = [len(c) for c in chunks]
        assert max(sizes) - min(sizes) <= 1


def test_bad_seed():
    with pytest.raises(ConfigError, match="seed must be an integer >= 0, got -1"):
        partition_indices(np.array([0, 1, 0]), 2, "iid", seed=-1)
