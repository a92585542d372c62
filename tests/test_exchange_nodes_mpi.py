"""The node-aware paths under MPI, on simulated nodes (``ranks_per_node``) of one machine.

Run with -n 1, -n 4, -n 3 (a node of two and one of one) and -n 6 (R = 2 or 3). Every node of
R ranks gets its own shared window; pairs across the simulated nodes go by messages. The
node-aware exchange must equal the flat one (``alltoallv``) bit for bit, and the single-process
reference to rounding; its bytes split into intra- and inter-node by the closed form.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcsgd.comm import BlockExchange, Collectives, LinkRates
from hpcsgd.comm.nodes import NodeAllreduce, node_ids

from helpers import all_ranks
from reference import blockwise_average, node_bytes

pytestmark = pytest.mark.mpi(min_size=1)


@pytest.fixture
def coll():
    from mpi4py import MPI

    return Collectives(MPI.COMM_WORLD.Dup())


def _vectors(P: int, d: int, seed: int = 42) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(rng.standard_normal(d).astype(np.float32)) for _ in range(P)]


@pytest.mark.parametrize("R", [0, 1, 2, 3])
def test_node_ids_are_blocks_of_R_ranks_on_one_machine(coll, R):
    nodes = node_ids(coll.comm, coll.world_ranks, R)
    expected = np.arange(coll.size) // R if R else np.zeros(coll.size, dtype=np.int64)
    assert all_ranks(np.array_equal(nodes, expected))


@pytest.mark.parametrize("R,expected", [(0, "shared-memory"), (1, "alltoallv"), (2, "node-aware"), (3, "node-aware")])
def test_auto_takes_the_node_aware_path_when_the_ranks_span_nodes(coll, R, expected):
    P = coll.size
    ex = BlockExchange(coll, 100, LinkRates.build(P, 0.2), seed=1, ranks_per_node=R)
    nodes = -(-P // R) if R else 1
    if P == 1:
        expected = "allreduce"  # a network of one drops nothing
    elif nodes == 1:
        expected = "shared-memory"  # one (simulated) node holds every rank
    assert all_ranks(ex.path == expected), ex.path


@pytest.mark.parametrize("d", [5, 4099])
@pytest.mark.parametrize("R", [1, 2, 3])
def test_node_aware_path_is_the_flat_path_bit_for_bit(coll, d, R):
    """Drops, uneven blocks, a rank that skipped, samples weights: identical bits and counters."""
    P, r = coll.size, coll.rank
    rates = LinkRates.build(P, 0.3)
    paths = {p: BlockExchange(coll, d, rates, seed=11, path=p, ranks_per_node=R) for p in ("alltoallv", "node-aware")}
    assert all_ranks(paths["node-aware"].path == ("node-aware" if P > 1 else "allreduce"))
    x = {"alltoallv": _vectors(P, d, 100)[r]}
    x["node-aware"] = x["alltoallv"].clone()
    skipper = np.ones(P, dtype=bool)
    skipper[P - 1] = False
    weights = np.arange(1, P + 1, dtype=np.float64) * 16
    counted = {p: np.zeros(3) for p in paths}
    for step in range(9):
        contributors = skipper if step % 3 == 2 else None
        w = weights if step % 3 == 1 else None
        reports = {p: ex.average(x[p], step, contributors=contributors, weights=w) for p, ex in paths.items()}
        assert all_ranks(torch.equal(x["alltoallv"], x["node-aware"])), f"step {step}"
        # The same messages of ALGORITHMS.md sent and dropped; the bytes that travelled differ.
        logical = ("rounds", "messages_sent", "messages_dropped", "bytes_saved")
        assert all_ranks(all(getattr(reports["alltoallv"], k) == getattr(reports["node-aware"], k) for k in logical))
        for p, report in reports.items():
            counted[p] += [report.bytes_intra_node, report.bytes_inter_node, report.bytes_sent]
    totals = {p: coll.sum_float64(c) for p, c in counted.items()}
    who = lambda t: skipper if t % 3 == 2 else None  # noqa: E731
    flat = node_bytes(P, 1, 11, rates, range(9), d, contributors=who)  # one rank a node: every message alone
    aware = node_bytes(P, R, 11, rates, range(9), d, contributors=who)
    assert all_ranks(totals["alltoallv"][2] == sum(flat)), (totals, flat)
    assert all_ranks(tuple(totals["node-aware"][:2]) == aware and totals["node-aware"][2] == sum(aware)), (totals, aware)
    assert all_ranks(totals["node-aware"][1] <= totals["alltoallv"][1])  # fewer bytes cross (the flat path's split by R)


@pytest.mark.parametrize("R", [2, 3])
@pytest.mark.parametrize("delta", [0.1, 0.6])
def test_node_aware_path_matches_the_reference(coll, R, delta):
    P, r, d = coll.size, coll.rank, 333
    vectors = _vectors(P, d)
    rates = LinkRates.build(P, delta)
    ex = BlockExchange(coll, d, rates, seed=5, path="node-aware", ranks_per_node=R)
    weights = [3 * i + 1 for i in range(P)]
    for step in range(6):
        w = weights if step % 2 else None
        mine = vectors[r].clone()
        ex.average(mine, step, weights=None if w is None else np.asarray(w, dtype=np.float64))
        blockwise_average(vectors, 5, step, rates, w)
        assert all_ranks(torch.allclose(mine, vectors[r], atol=1e-6)), f"step {step}"


@pytest.mark.parametrize("R", [1, 2, 3])
def test_intra_and_inter_node_bytes_follow_the_closed_form(coll, R):
    """Summed over ranks: the bytes between ranks of one node and across nodes, both phases, as
    tests/reference.py's closed form of the node-aware plan gives them; the two add up to bytes_sent."""
    P, d = coll.size, 1001
    rates = LinkRates.build(P, 0.25)
    ex = BlockExchange(coll, d, rates, seed=7, ranks_per_node=R)
    x = _vectors(P, d)[coll.rank]
    for step in range(5):
        ex.average(x, step)
    expected = node_bytes(P, R, 7, rates, range(5), d)
    c = coll.counters
    got = coll.sum_float64(np.array([c.bytes_intra_node, c.bytes_inter_node, c.bytes_sent], dtype=np.float64))
    assert all_ranks(tuple(got[:2]) == expected), (got, expected)
    assert all_ranks(got[0] + got[1] == got[2])
    if P > R:
        assert all_ranks(got[1] > 0)  # some pairs cross the simulated nodes


@pytest.mark.mpi(min_size=3)
def test_node_aware_path_after_a_failure_regroups_the_survivors(coll):
    """Rank 1 leaves: the survivors' nodes are their original ranks' blocks, and the node-aware
    exchange over them still equals the flat one and the reference over the survivors."""
    P, d, R = coll.size, 517, 2
    survivors = [r for r in range(P) if r != 1]
    live = coll.split_live(coll.rank != 1)
    if live is None:
        assert all_ranks(True)  # the leaving rank takes part in the agreement only
        assert all_ranks(True)
        return
    rates = LinkRates.build(P, 0.3)  # per link of the original ranks: the survivors' masks are its rows
    flat = BlockExchange(live, d, rates, seed=3, path="alltoallv", ranks_per_node=R)
    aware = BlockExchange(live, d, rates, seed=3, ranks_per_node=R)
    expected_nodes = np.unique(np.array(survivors) // R, return_inverse=True)[1]
    ok_nodes = np.array_equal(aware.nodes, expected_nodes)
    counts = np.bincount(expected_nodes)
    ok_path = aware.path == ("shared-memory" if len(counts) == 1 else "node-aware" if counts.max() >= 2 else "alltoallv")
    vectors = _vectors(len(survivors), d)
    a, b = vectors[live.rank].clone(), vectors[live.rank].clone()
    for step in range(4):
        flat.average(a, step)
        aware.average(b, step)
        _literal_rps(vectors, *aware.masks(step))
    assert all_ranks(ok_nodes and ok_path), (aware.nodes, aware.path)
    assert all_ranks(torch.equal(a, b) and torch.allclose(b, vectors[live.rank], atol=1e-6))


def _literal_rps(vectors: list[torch.Tensor], a1: np.ndarray, a2: np.ndarray) -> None:
    """ALGORITHMS.md's RPS steps 1-5 with the given (live-rank) masks, as tests/reference.py writes them."""
    from hpcsgd.comm import block_offsets

    P = len(vectors)
    off = block_offsets(vectors[0].numel(), P)
    v = [x.clone() for x in vectors]
    for j in range(P):
        lo, hi = off[j], off[j + 1]
        w = sum(v[i][lo:hi] for i in range(P) if i == j or a1[i, j]) / sum(1 for i in range(P) if i == j or a1[i, j])
        for i in range(P):
            vectors[i][lo:hi] = w if i == j or a2[j, i] else v[i][lo:hi]


@pytest.mark.parametrize("R", [0, 1, 2, 3])
def test_node_aware_allreduce_is_exact_where_the_sum_is_and_the_same_on_every_rank(coll, R):
    from mpi4py import MPI

    P, r = coll.size, coll.rank
    hier = NodeAllreduce(coll.comm, coll.world_ranks, R)
    ints = np.full(1000, r + 1, dtype=np.float32)
    hier.sum_(ints)
    assert all_ranks(np.all(ints == P * (P + 1) / 2))
    data = np.random.default_rng(r).standard_normal(10_001).astype(np.float32)
    first, again, library = data.copy(), data.copy(), data.copy()
    hier.sum_(first)
    hier.sum_(again)
    coll.comm.Allreduce(MPI.IN_PLACE, library, op=MPI.SUM)
    gathered = coll.comm.allgather(first.tobytes())
    assert all_ranks(all(g == gathered[0] for g in gathered) and np.array_equal(first, again))  # deterministic
    # Either order's rounding error is at most (P-1) eps sum_i |x_i| (the standard bound).
    magnitude = np.abs(data)
    coll.comm.Allreduce(MPI.IN_PLACE, magnitude, op=MPI.SUM)
    bound = 2 * max(P - 1, 1) * np.finfo(np.float32).eps * magnitude.astype(np.float64)
    assert all_ranks(bool(np.all(np.abs(first.astype(np.float64) - library) <= bound)))
    # Traffic: members send their buffer in; first ranks send it back and 2(N-1)/N across.
    intra, inter = hier.traffic(400)
    totals = coll.sum_float64(np.array([intra, inter], dtype=np.float64))
    nodes = -(-P // R) if R else 1
    members = [min(R, P - k * R) for k in range(nodes)] if R else [P]
    assert all_ranks(totals[0] == sum(2 * (m - 1) * 400 for m in members))
    assert all_ranks(totals[1] == nodes * (2 * (nodes - 1) * 400 // nodes))
    hier.free()


def test_nonblocking_allreduce_sums_exactly_where_the_sum_is_and_the_same_on_every_rank(coll):
    """use_allreduce("nonblocking"): the library's Iallreduce, waited for; exact on integers,
    one result on every rank, rounding within the bound of the blocking call, counted as it."""
    import torch
    from mpi4py import MPI

    P, r = coll.size, coll.rank
    coll.use_allreduce("nonblocking")
    assert all_ranks(coll.allreduce_path == "nonblocking-allreduce")
    before = coll.counters.bytes_sent
    ints = torch.full((1000,), float(r + 1))
    coll.allreduce_sum_(ints)
    assert all_ranks(bool(torch.all(ints == P * (P + 1) / 2)))
    assert all_ranks(coll.counters.bytes_sent - before == 2 * (P - 1) * 4000 // P)
    data = np.random.default_rng(r).standard_normal(100_003).astype(np.float32)
    mine, blocking = torch.from_numpy(data.copy()), data.copy()
    coll.allreduce_mean_(mine)
    coll.comm.Allreduce(MPI.IN_PLACE, blocking, op=MPI.SUM)
    gathered = coll.comm.allgather(mine.numpy().tobytes())
    assert all_ranks(all(g == gathered[0] for g in gathered))
    magnitude = np.abs(data)
    coll.comm.Allreduce(MPI.IN_PLACE, magnitude, op=MPI.SUM)
    eps = np.finfo(np.float32).eps
    mean = (blocking * np.float32(1.0 / P)).astype(np.float64)  # the blocking call's mean, as torch's mul_ makes it
    # Either order's sum is within (P-1) eps sum_i |x_i| of the exact one; the scaling rounds once more.
    bound = 2 * max(P - 1, 1) * eps * magnitude.astype(np.float64) / P + 2 * eps * np.abs(mean)
    assert all_ranks(bool(np.all(np.abs(mine.numpy().astype(np.float64) - mean) <= bound)))


@pytest.mark.parametrize("kind", ["library", "node-aware", "nonblocking"])
def test_local_sgd_rounds_go_by_the_chosen_allreduce(coll, kind):
    """LocalSGD(allreduce=...) averages through it, says so, and keeps it after the live ranks change."""
    import hpcsgd

    torch.manual_seed(0)
    model = torch.nn.Linear(7, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    world = hpcsgd.init()
    strategy = hpcsgd.LocalSGD(model, opt, world, tau=1, allreduce=kind, ranks_per_node=2)
    torch.manual_seed(1 + world.rank)
    x = torch.randn(5, 7)
    torch.nn.functional.mse_loss(model(x), torch.zeros(5, 3)).backward()
    strategy.step()
    flat = strategy.flat.flat.detach().numpy()
    gathered = coll.comm.allgather(flat.tobytes())
    c = strategy.counters
    split = c.bytes_intra_node + c.bytes_inter_node
    expected_path = {"library": "allreduce", "node-aware": "node-aware-allreduce"}.get(kind, "nonblocking-allreduce")
    assert all_ranks(strategy.exchange_path == expected_path)
    assert all_ranks(all(g == gathered[0] for g in gathered))  # one model on every rank
    assert all_ranks(split == (0 if kind != "node-aware" or world.size == 1 else c.bytes_sent))
    strategy.set_collectives(strategy.coll.over(strategy.coll.comm, list(strategy.coll.world_ranks)))
    assert all_ranks(strategy.exchange_path == expected_path)
    strategy.close()
