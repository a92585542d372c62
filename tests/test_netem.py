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
from hpcsgd.faults.netem import LinkNetwork, NetworkClock
from hpcsgd.errors import ConfigError

from helpers import all_ranks


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


def test_a_port_carries_one_transfer_at_a_time():
    clock = NetworkClock(LinkNetwork.build(2, latency_ms=1.0, gbps=8.0))
    first = clock.deadline(clock.ready(100.0), latency=0.001, transfer=0.010)
    second = clock.deadline(clock.ready(100.0), latency=0.001, transfer=0.010)  # started together: queued
    assert first == pytest.approx(100.011) and second == pytest.approx(100.021)
    assert clock.emulated_seconds == pytest.approx(0.022)
    later = clock.deadline(clock.ready(200.0), latency=0.001, transfer=0.010)  # the port is free again
    assert later == pytest.approx(200.011)


def test_a_message_completes_no_earlier_than_its_sender_started_it_plus_its_delay():
    clock = NetworkClock(LinkNetwork.build(3, latency_ms=50.0))
    # This rank is ready at 10.0 and sends for 0.02 s; a sender 0.3 s late, one on time.
    end = clock.phase_deadline(10.0, 0.02, [(10.3, 0.05), (10.0, 0.06)])
    assert end == pytest.approx(10.35) and clock.port_free == pytest.approx(10.02)
    assert clock.emulated_seconds == pytest.approx(0.06)  # the phase's own length, lateness aside
    assert clock.phase_deadline(20.0, 0.02, []) == pytest.approx(20.02)  # sends only: its port


def test_held_time_counts_the_training_threads_waits_only():
    """A worker thread's hold is hidden network time; the training thread's wait for it counts
    only where it fell on that hold."""
    import threading

    clock = NetworkClock(LinkNetwork.build(2, latency_ms=1.0))
    until = clock.now() + 0.2
    worker = threading.Thread(target=lambda: clock.hold(until))
    worker.start()
    time.sleep(0.1)  # "the next step's compute" hides the first half of the hold
    waited_from = clock.now()
    worker.join()
    clock.charge_wait(waited_from, clock.now())
    assert clock.held_seconds <= until - waited_from  # what the training thread waited of it, not 0.2
    assert clock.held_seconds > 0.0
    clock.charge_wait(clock.now(), clock.now() + 1.0)  # a later wait does not count the old hold again
    assert clock.held_seconds <= 0.2
    clock.hold(clock.now() + 0.05)  # the training thread's own hold counts whole
    assert clock.held_seconds >= 0.05


# ---- the comm layer under MPI --------------------------------------------------------------

def MPI_MAX():
    from mpi4py import MPI

    return MPI.MAX


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
    plain.allreduce_mean_(x)
    comm.Barrier()
    t0 = time.perf_counter()
    emulated.allreduce_mean_(y)
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
    request = coll.allreduce_mean_async_(x)
    latency, _ = net.ring_seconds(range(comm.size), 4000)
    time.sleep(latency + 0.05)  # "the next step's compute", longer than the round
    request.wait()
    assert all_ranks(coll.clock.held_seconds == 0.0 and torch.all(x == 1.0))
    blocking = Collectives(comm, network=net)
    blocking.allreduce_mean_(torch.ones(1000))
    assert all_ranks(blocking.clock.held_seconds > 0)  # nothing to hide behind


def _phase_ends(counts, ready, bw, lat):
    """Closed form of one exchange phase: each rank's end when rank i's port is free at ready[i].

    ``counts[i, j]`` floats from i to j; i's messages leave its port in ring order i+1, i+2, ...;
    the one from i reaches j at ready[i] + the sends queued before it + its transfer + lat;
    j is done when its last incoming message has, and its own sends have left its port.
    Returns (ends, lengths): lengths as if every rank were ready at once.
    """
    P = len(ready)
    sec = counts * 4.0 / bw
    np.fill_diagonal(sec, 0.0)
    ends, lengths = np.empty(P), np.empty(P)
    for j in range(P):
        own = sec[j].sum()
        arrivals = [(ready[i], sum(sec[i, (i + k) % P] for k in range(1, (j - i) % P)) + sec[i, j] + lat)
                    for i in range(P) if i != j and counts[i, j] > 0]
        ends[j] = max([ready[j] + own] + [r + d for r, d in arrivals])
        lengths[j] = max([own] + [d for _, d in arrivals])
    return ends, lengths


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
    clock = emulated_coll.clock
    # Every port busy until one agreed instant T: every rank starts phase 1 at T exactly.
    T = comm.allreduce(clock.now(), op=MPI_MAX()) + 0.05
    clock.port_free = T
    t0 = time.perf_counter()
    emulated.average(y, step=4)
    elapsed = time.perf_counter() - t0
    a1, a2 = emulated.masks(4)
    sizes, me, bw = emulated.sizes, comm.rank, net.bandwidth[0, 1]
    end1, len1 = _phase_ends(np.where(a1, sizes[None, :], 0), np.full(P, T), bw, 2e-3)
    end2, len2 = _phase_ends(np.where(a2, sizes[:, None], 0), end1, bw, 2e-3)  # phase 2 starts at phase 1's end
    start_delay = T - clock.offset - t0  # T on this rank's perf_counter, from t0
    assert all_ranks(torch.equal(x, y))
    assert all_ranks(emulated_coll.network_stats()["network_emulated_s"] == pytest.approx(len1[me] + len2[me]))
    assert all_ranks(elapsed >= start_delay + (end2[me] - T))


def _late_start(comm, clock, late: int, lateness: float) -> tuple[float, float]:
    """Every rank starts its step at an agreed instant T0, rank ``late`` ``lateness`` s after it.

    Returns (T0, this rank's start), on the agreed clock.
    """
    from mpi4py import MPI

    T0 = comm.allreduce(clock.now(), op=MPI.MAX) + 0.05
    begin = T0 + (lateness if comm.rank == late else 0.0)
    time.sleep(max(0.0, begin - clock.now()))
    return T0, clock.now()


@pytest.mark.mpi(min_size=2)
def test_a_late_sender_delays_the_others_ring_allreduce(comm):
    """50 ms links, rank 0 starts 0.3 s late: the ring starts when its last participant does,
    so the others' round ends no earlier than T0 + 0.3 + 2 (L-1) 0.05 (>= 0.6 s at L = 4)."""
    L, lat, lateness = comm.size, 0.05, 0.3
    coll = Collectives(comm, network=LinkNetwork.build(L, latency_ms=lat * 1e3))
    clock = coll.clock
    x = torch.full((1000,), float(comm.rank))
    T0, start = _late_start(comm, clock, 0, lateness)
    coll.allreduce_mean_(x)
    end = clock.now()
    starts = comm.allgather(start)
    ring = 2 * (L - 1) * lat
    assert all_ranks(torch.all(x == (L - 1) / 2))
    assert all_ranks(end >= max(starts) + ring)  # the closed form, from the measured starts
    assert all_ranks(end - T0 >= lateness + ring)  # the late sender's lateness plus the ring
    # Held: the ring after the late rank's start, which the real Allreduce did not wait out
    # (was 0 on the others: their hold ended at their own start + the ring).
    assert all_ranks(0.0 < clock.held_seconds <= ring + 1e-6)
    print(f"rank {comm.rank}: round {end - start:.3f} s from its start, {end - T0:.3f} s from T0")


@pytest.mark.mpi(min_size=3)
def test_a_late_sender_delays_the_block_exchange_by_two_hops(comm):
    """RPS's two phases, 50 ms links, rank 0 0.3 s late: another rank's phase 1 waits for rank 0's
    message (T0 + 0.3 + 0.05), its phase 2 for the averages of ranks that waited the same
    (+ 0.05): no earlier than T0 + 0.4. Checked against the closed form of both phases."""
    P, lat, lateness, d = comm.size, 0.05, 0.3, 3000
    # Only link 1 -> 0 can drop: the exchange is two-phase, and every message the bound needs arrives.
    rates = LinkRates.build(P, 0.0, rules=["1->0=0.5"])
    coll = Collectives(comm, network=LinkNetwork.build(P, latency_ms=lat * 1e3))
    exchange = BlockExchange(coll, d, rates, seed=3, path="alltoallv")
    assert exchange.path == "alltoallv"
    clock = coll.clock
    x = torch.full((d,), float(comm.rank))
    T0, start = _late_start(comm, clock, 0, lateness)
    exchange.average(x, step=1)
    end = clock.now()
    starts = np.array(comm.allgather(start))
    a1, a2 = exchange.masks(1)
    end1, _ = _phase_ends(np.where(a1, exchange.sizes[None, :], 0), starts, np.inf, lat)
    end2, _ = _phase_ends(np.where(a2, exchange.sizes[:, None], 0), end1, np.inf, lat)
    assert all_ranks(end >= end2[comm.rank])  # the closed form, from the measured starts
    assert all_ranks(comm.rank == 0 or end - T0 >= lateness + 2 * lat)
    print(f"rank {comm.rank}: exchange {end - start:.3f} s from its start, {end - T0:.3f} s from T0")


@pytest.mark.mpi(min_size=2)
def test_held_time_of_an_overlapped_round_is_what_the_training_thread_waited(comm):
    """A round in a worker thread, hidden behind longer compute, holds for nothing on the training
    thread (was: the worker's whole hold counted); one waited for at once counts."""
    from hpcsgd.algorithms.overlap import RoundInFlight

    net = LinkNetwork.build(comm.size, latency_ms=20.0)
    coll = Collectives(comm, network=net)
    x = torch.ones(1000)
    ring = sum(net.ring_seconds(range(comm.size), 4000))
    rounds = RoundInFlight(coll, x)
    rounds.start(x, lambda work, c: c.allreduce_sum_(work))
    time.sleep(ring + 0.2)  # the next step's compute, longer than the round
    rounds.finish(x)
    hidden = coll.clock.held_seconds
    rounds.start(x, lambda work, c: c.allreduce_sum_(work))
    rounds.finish(x)  # nothing to hide behind
    waited = coll.clock.held_seconds
    rounds.close()
    assert all_ranks(hidden == 0.0 and coll.clock.emulated_seconds == pytest.approx(2 * ring))
    assert all_ranks(0.0 < waited <= ring + 1e-6)
