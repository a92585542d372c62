"""Network emulation (ALGORITHMS.md, "Network emulation"): the model, and the comm layer holding to it.

The MPI tests check lower bounds only (a round never completes before its emulated time,
however loaded the machine) and exact bookkeeping, never an upper bound on wall time.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from hpcsgd.comm import BlockExchange, Collectives, LinkRates
from hpcsgd.comm.netem import LinkNetwork, NetworkClock
from hpcsgd.errors import ConfigError

from conftest import all_ranks


# ---- the model (no MPI) --------------------------------------------------------------------

def test_nothing_emulated_is_no_network_at_all():
    assert LinkNetwork.build(4) is None  # off: the comm layer holds no clock and times nothing


def test_uniform_and_per_link_values_in_si_units():
    net = LinkNetwork.build(4, latency_ms=2.0, gbps=8.0, latency_rules=["to:3=10"], bandwidth_rules=["0->1=0.8"])
    assert net.latency[0, 1] == pytest.approx(2e-3) and net.latency[1, 3] == pytest.approx(10e-3)
    assert net.bandwidth[1, 0] == pytest.approx(1e9) and net.bandwidth[0, 1] == pytest.approx(1e8)  # bytes/s
    assert net.message_seconds(0, 1, 10**6) == pytest.approx((2e-3, 1e-2))
    only_latency = LinkNetwork.build(2, latency_ms=1.0)
    assert np.isinf(only_latency.bandwidth).all()  # 0 Gb/s = unlimited


def test_allreduce_is_charged_as_a_ring_at_its_slowest_link():
    net = LinkNetwork.build(4, latency_ms=1.0, gbps=8.0)
    n, L = 8_000_000, 4
    assert net.ring_seconds(range(L), n) == pytest.approx((2 * (L - 1) * 1e-3, 2 * (L - 1) / L * n / 1e9))
    slow = LinkNetwork.build(4, latency_ms=1.0, gbps=8.0, bandwidth_rules=["2->3=0.8"])
    assert slow.ring_seconds(range(L), n)[1] == pytest.approx(2 * (L - 1) / L * n / 1e8)
    assert slow.ring_seconds([0, 1], n)[1] == pytest.approx(n / 1e9)  # the slow link is not in this ring
    assert net.ring_seconds([2], n) == (0.0, 0.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"latency_ms": -1.0}, "link_latency_ms must be a finite number >= 0"),
    ({"gbps": float("inf")}, "link_gbps must be a finite number >= 0"),
    ({"latency_rules": ["to:9=1"]}, "link_latency rule 'to:9=1' names a rank outside 0..3"),
    ({"bandwidth_rules": ["0=>1=3"]}, "link_bandwidth rule '0=>1=3' is not of the form"),
])
def test_bad_settings_name_the_problem(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LinkNetwork.build(4, **kwargs)


def test_a_link_carries_one_transfer_at_a_time():
    clock = NetworkClock(LinkNetwork.build(2, latency_ms=1.0, gbps=8.0))
    first = clock.deadline(100.0, latency=0.001, transfer=0.010)
    second = clock.deadline(100.0, latency=0.001, transfer=0.010)  # started together: queued behind the first
    assert first == pytest.approx(100.011) and second == pytest.approx(100.021)
    assert clock.emulated_seconds == pytest.approx(0.022)
    later = clock.deadline(200.0, latency=0.001, transfer=0.010)  # the link is free again
    assert later == pytest.approx(200.011)


# ---- the comm layer under MPI --------------------------------------------------------------

@pytest.fixture
def comm():
    from mpi4py import MPI

    return MPI.COMM_WORLD.Dup()


@pytest.mark.mpi(min_size=1)
def test_an_averaging_round_takes_at_least_its_emulated_time_and_changes_no_value(comm):
    n = 250_000  # 1 MB
    net = LinkNetwork.build(comm.size, latency_ms=5.0, gbps=0.4)  # 50 MB/s
    plain, emulated = Collectives(comm), Collectives(comm, network=net)
    x = torch.arange(n, dtype=torch.float32) * (comm.rank + 1)
    y = x.clone()
    plain.allreduce_mean(x)
    comm.Barrier()
    t0 = time.perf_counter()
    emulated.allreduce_mean(y)
    elapsed = time.perf_counter() - t0
    latency, transfer = net.ring_seconds(range(comm.size), n * 4)
    stats = emulated.network_stats()
    assert all_ranks(torch.equal(x, y))
    assert all_ranks(elapsed >= latency + transfer)
    assert all_ranks(stats["network_emulated_s"] == pytest.approx(latency + transfer))
    assert plain.network_stats() == {}


@pytest.mark.mpi(min_size=2)
def test_a_round_overlapped_with_longer_work_holds_for_nothing(comm):
    """Nonblocking for real: work done while the round is in flight hides its emulated time."""
    net = LinkNetwork.build(comm.size, latency_ms=20.0)
    coll = Collectives(comm, network=net)
    x = torch.ones(1000)
    request = coll.iallreduce_mean(x)
    latency, _ = net.ring_seconds(range(comm.size), 4000)
    time.sleep(latency + 0.05)  # "the next step's compute", longer than the round
    request.wait()
    assert all_ranks(coll.clock.held_seconds == 0.0 and torch.all(x == 1.0))
    blocking = Collectives(comm, network=net)
    blocking.allreduce_mean(torch.ones(1000))
    assert all_ranks(blocking.clock.held_seconds > 0)  # nothing to hide behind


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("path", ["alltoallv", "shared-memory"])
def test_block_exchange_charges_each_phase_and_keeps_the_bits(comm, path):
    P, d = comm.size, 40_000
    rates = LinkRates.build(P, 0.2)
    net = LinkNetwork.build(P, latency_ms=2.0, gbps=0.32)  # 40 MB/s
    plain = BlockExchange(Collectives(comm), d, rates, seed=3, path=path)
    emulated_coll = Collectives(comm, network=net)
    emulated = BlockExchange(emulated_coll, d, rates, seed=3, path=path)
    rng = np.random.default_rng(comm.rank)
    x = torch.from_numpy(rng.standard_normal(d).astype(np.float32))
    y = x.clone()
    plain.average(x, step=4)
    t0 = time.perf_counter()
    emulated.average(y, step=4)
    elapsed = time.perf_counter() - t0
    # Closed form of this rank's two phases: its sends queue on its link, its slowest
    # incoming message and the longest latency bound each phase.
    a1, a2 = emulated.masks(4)
    me, sizes, mine = comm.rank, emulated.sizes, int(emulated.sizes[comm.rank])
    bw = net.bandwidth[0, 1]
    expected = 0.0
    for sends, recvs in ((np.where(a1[me], sizes, 0), np.where(a1[:, me], mine, 0)),
                         (np.where(a2[me], mine, 0), np.where(a2[:, me], sizes, 0))):
        sends, recvs = np.delete(sends, me), np.delete(recvs, me)
        used = (sends > 0).any() or (recvs > 0).any()
        expected += (2e-3 if used else 0.0) + max(sends.sum() * 4 / bw, recvs.max(initial=0) * 4 / bw)
    assert all_ranks(torch.equal(x, y))
    assert all_ranks(emulated_coll.network_stats()["network_emulated_s"] == pytest.approx(expected))
    assert all_ranks(elapsed >= expected)
