"""Placement and node-scoped link rules through the public API, under MPI (any P).

On one machine every rank shares one node: R found from ``Split_type(SHARED)`` is P, and
nodes of fewer ranks are simulated with ``ranks_per_node``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hpcsgd
from hpcsgd.data.placement import placement_chunks
from hpcsgd.errors import ConfigError
from hpcsgd.train.topology import detect_ranks_per_node

from helpers import all_ranks

pytestmark = pytest.mark.mpi(min_size=1)


class Numbers(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.targets = torch.arange(n) % 3

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.tensor([float(i)]), self.targets[i]


def test_one_machine_is_one_node_of_P_ranks():
    world = hpcsgd.init(device="cpu")
    R, blocks = detect_ranks_per_node(world.comm)
    assert all_ranks(R == world.size and blocks)


def test_spread_sampler_holds_the_placed_chunks_and_draws_only_from_them():
    world = hpcsgd.init(device="cpu")
    P = world.size
    R = 2 if P % 2 == 0 else 1
    q = max(1, min(2, P // R))
    data = Numbers(24 * P)
    sampler = hpcsgd.RedundantSampler(data, world, q=q, batch_size=3, placement="spread", ranks_per_node=R)
    expected = placement_chunks(P, q, R, world.rank)
    assert all_ranks(sampler.held_chunks == expected)
    mine = set(np.concatenate([sampler.chunks[c] for c in expected]).tolist())
    batches = [b for _, b in zip(range(5), sampler)]
    assert all_ranks(all(len(b) == 3 * q and set(b) <= mine for b in batches))
    # Every chunk is read by q ranks, their copies on q different nodes.
    held = world.comm.allgather(sampler.held_chunks)
    for c in range(P):
        nodes = {r // R for r in range(P) if c in held[r]}
        assert all_ranks(len(nodes) == q)


def test_spread_sampler_refuses_copies_on_one_node():
    world = hpcsgd.init(device="cpu")
    if world.size < 2:
        pytest.skip("needs 2 ranks: with one, q = 2 is refused by q <= P first")
    # R from the machine: every rank on one node, so no second node for the copy.
    with pytest.raises(ConfigError, match=r"needs q <= P/R"):
        hpcsgd.RedundantSampler(Numbers(8 * world.size), world, q=2, batch_size=2, placement="spread")


def test_node_link_rules_through_the_api():
    world = hpcsgd.init(device="cpu")
    P = world.size
    rates = hpcsgd.link_rates(world, 0.01, link_drop=["inter-node=0.3"], ranks_per_node=2)
    expect = np.array([[0.0 if s == d else 0.01 if s // 2 == d // 2 else 0.3 for d in range(P)] for s in range(P)])
    assert all_ranks(np.array_equal(rates.phase1, expect) and np.array_equal(rates.phase2, expect))
    # Nodes from the machine: one node, so the rule sets nothing.
    alone = hpcsgd.link_rates(world, 0.0, link_drop=["inter-node=0.3"])
    assert all_ranks(alone.lossless)
    net = hpcsgd.link_network(world, latency_rules=["inter-node=4"], ranks_per_node=1)
    assert all_ranks(net is None if P == 1 else net.latency[0, P - 1] == 0.004)
