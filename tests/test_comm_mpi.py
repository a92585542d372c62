"""The comm layer under MPI, against closed forms (run with -n 1 and -n 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcsgd.comm import BlockExchange, Collectives, LinkRates, arrival_mask
from hpcsgd.comm.agree import agree
from hpcsgd.errors import ShardError

from helpers import all_ranks
from reference import blockwise_average

pytestmark = pytest.mark.mpi(min_size=1)


@pytest.fixture
def coll():
    from mpi4py import MPI

    return Collectives(MPI.COMM_WORLD.Dup())


def test_allreduce_mean_of_rank_ids(coll):
    P, r = coll.size, coll.rank
    x = torch.full((1001,), float(r))
    coll.allreduce_mean_(x)
    assert all_ranks(torch.all(x == (P - 1) / 2))


def test_iallreduce_request_test_and_wait(coll):
    x = torch.arange(10, dtype=torch.float32) * (coll.rank + 1)
    req = coll.allreduce_mean_async_(x)
    while not req.test():
        pass
    same = req.wait() is x
    expected = torch.arange(10, dtype=torch.float32) * (coll.size + 1) / 2
    assert all_ranks(same and torch.allclose(x, expected))


@pytest.mark.parametrize("mode", ["spin", "yield", "sleep"])
def test_every_wait_mode_gives_the_same_average_and_exchange(coll, mode):
    """How a rank waits (hpcsgd/comm/waiting.py) changes when it gives its core away, never a result."""
    P, r, d = coll.size, coll.rank, 4099
    coll.wait_mode = mode
    x = torch.arange(d, dtype=torch.float32) * (r + 1)
    coll.allreduce_mean_async_(x, tag="mode").wait()
    coll.allreduce_mean_(y := torch.arange(d, dtype=torch.float32) * (r + 1), tag="mode")
    expected = torch.arange(d, dtype=torch.float32) * (P + 1) / 2
    rng = np.random.default_rng(3)
    vectors = [torch.from_numpy(rng.standard_normal(d).astype(np.float32)) for _ in range(P)]
    rates = LinkRates.build(P, 0.3)
    ex = BlockExchange(coll, d, rates, seed=5, path="alltoallv" if P > 1 else "auto")
    mine = vectors[r].clone()
    ex.average(mine, 0)
    blockwise_average(vectors, 5, 0, rates)
    assert all_ranks(torch.allclose(x, expected) and torch.allclose(y, expected)
                     and torch.allclose(mine, vectors[r], atol=1e-6))


def test_init_decides_the_wait_from_the_node_s_affinity_masks(coll):
    """hpcsgd.init (collective) replaces the launcher-count guess by the node's own masks."""
    import os

    from mpi4py import MPI

    import hpcsgd
    from hpcsgd.comm import waiting

    hpcsgd.init(coll.comm, device="cpu")
    node = coll.comm.Split_type(MPI.COMM_TYPE_SHARED)
    masks = node.allgather(sorted(os.sched_getaffinity(0)))
    shared = node.size > len(set().union(*map(set, masks)))
    node.Free()
    env = os.environ.pop("HPCSGD_WAIT", None)
    try:
        assert all_ranks(waiting._node_shared is shared
                         and waiting.default_wait_mode() == ("sleep" if shared else "spin"))
    finally:
        if env is not None:
            os.environ["HPCSGD_WAIT"] = env


def test_bcast_overwrites_with_root(coll):
    x = torch.full((5,), float(coll.rank + 7))
    coll.bcast_(x)
    assert all_ranks(torch.all(x == 7.0))


def test_mean_and_consensus_closed_form(coll):
    P, r, d = coll.size, coll.rank, 50
    x = torch.full((d,), float(r))
    mean, distance = coll.mean_and_consensus(x)
    m = (P - 1) / 2
    expected = d * sum((i - m) ** 2 for i in range(P)) / P
    assert all_ranks(torch.allclose(mean, torch.full((d,), m)) and distance == pytest.approx(expected, rel=1e-9, abs=1e-9))


@pytest.mark.parametrize("d", [1, 7, 1000, 4099])
def test_exchange_lossless_is_exact_average(coll, d):
    P, r = coll.size, coll.rank
    x = torch.arange(d, dtype=torch.float32) + 1000.0 * r
    ex = BlockExchange(coll, d, LinkRates.build(P), seed=1)
    ex.average(x, step=0)
    expected = torch.arange(d, dtype=torch.float32) + 1000.0 * (P - 1) / 2
    assert all_ranks(torch.allclose(x, expected))


def test_exchange_lossless_fast_path_is_the_two_phase_result_within_a_few_ulp(coll):
    """At drop 0 the exchange runs one Allreduce; it equals the two-phase block average up to
    float summation order (its docstring's promise): within a few ulp of the terms, not bit for bit."""
    P, r, d = coll.size, coll.rank, 4099
    rng = np.random.default_rng(7)
    vectors = [torch.from_numpy(rng.standard_normal(d).astype(np.float32)) for _ in range(P)]
    mine = vectors[r].clone()
    # A sum's rounding error scales with its terms, not with its (possibly cancelled) result:
    # one ulp here is that of the mean magnitude of the terms; P-1 additions in another order
    # differ by at most P-1 of them (2 for P <= 3).
    scale = torch.stack(vectors).abs().mean(0)
    BlockExchange(coll, d, LinkRates.build(P), seed=1).average(mine, step=0)
    blockwise_average(vectors, 1, 0, LinkRates.build(P))
    ulp = torch.finfo(torch.float32).eps * scale.clamp_min(torch.finfo(torch.float32).tiny)
    assert all_ranks(bool(((mine - vectors[r]).abs() <= max(2, P - 1) * ulp).all()))


@pytest.mark.parametrize("path", ["alltoallv", "shared-memory"])
@pytest.mark.parametrize("delta", [0.1, 0.5, 0.9])
def test_exchange_matches_reference_with_drops(coll, delta, path):
    P, r, d = coll.size, coll.rank, 333
    rng = np.random.default_rng(42)
    vectors = [torch.from_numpy(rng.standard_normal(d).astype(np.float32)) for _ in range(P)]
    rates = LinkRates.build(P, delta)
    ex = BlockExchange(coll, d, rates, seed=5, path=path)
    assert all_ranks(ex.path == (path if P > 1 else "allreduce"))  # a network of one drops nothing
    for step in range(6):
        mine = vectors[r].clone()
        ex.average(mine, step)
        blockwise_average(vectors, 5, step, rates)
        assert all_ranks(torch.allclose(mine, vectors[r], atol=1e-6)), f"step {step}"


@pytest.mark.parametrize("path", ["alltoallv", "shared-memory"])
def test_dropped_messages_save_bytes(coll, path):
    P, d, steps = coll.size, 4000, 200
    totals = {}
    for delta in (0.0, 0.1):
        local = Collectives(coll.comm)
        ex = BlockExchange(local, d, LinkRates.build(P, delta), seed=3, path=path)
        x = torch.zeros(d)
        for step in range(steps):
            ex.average(x, step)
        totals[delta] = local.sum_float64(np.array([local.counters.bytes_sent, local.counters.bytes_saved]))
    if P == 1:
        assert totals[0.0][0] == 0 and totals[0.1][0] == 0  # nothing crosses a network of one
        return
    sent0, saved0 = totals[0.0]
    sent1, saved1 = totals[0.1]
    assert saved0 == 0
    assert sent1 + saved1 == pytest.approx(sent0)  # every byte is either sent or saved
    assert sent1 / sent0 == pytest.approx(0.9, abs=0.02)


@pytest.mark.parametrize("d", [5, 4099])
def test_shared_memory_path_is_the_alltoallv_path_bit_for_bit(coll, d):
    """The node-local fast path adds the same terms in the same order as the message path:
    identical bits, step after step, with drops, uneven blocks and a rank that skipped."""
    P, r = coll.size, coll.rank
    rates = LinkRates.build(P, 0.3)
    paths = {p: BlockExchange(coll, d, rates, seed=11, path=p) for p in ("alltoallv", "shared-memory")}
    rng = np.random.default_rng(100 + r)
    x = {p: torch.from_numpy(rng.standard_normal(d).astype(np.float32)) for p in paths}
    x["shared-memory"] = x["alltoallv"].clone()
    skipper = np.ones(P, dtype=bool)
    skipper[P - 1] = False
    for step in range(8):
        contributors = skipper if step % 3 == 2 else None
        reports = {p: ex.average(x[p], step, contributors=contributors) for p, ex in paths.items()}
        assert all_ranks(torch.equal(x["alltoallv"], x["shared-memory"])), f"step {step}"
        assert all_ranks(reports["alltoallv"] == reports["shared-memory"])  # the same bytes counted


def test_exchange_path_is_checked(coll):
    with pytest.raises(ValueError, match="exchange path must be one of"):
        BlockExchange(coll, 10, LinkRates.build(coll.size, 0.1), seed=1, path="rdma")


def test_masks_identical_on_every_rank(coll):
    rates = LinkRates.build(coll.size, 0.3)
    mask = arrival_mask(9, 17, 1, rates.phase1)
    gathered = coll.comm.allgather(mask.tobytes())
    assert all(g == gathered[0] for g in gathered)


def test_agree_raises_on_every_rank_naming_the_rank(coll):
    last = coll.size - 1

    def check():
        if coll.rank == last:
            raise ShardError("chunk 3 fails its checksum")
        return coll.rank

    with pytest.raises(ShardError, match="chunk 3 fails its checksum") as info:
        agree(coll.comm, check, "shards")
    assert info.value.collective
    if coll.size > 1:
        assert f"rank {last}" in str(info.value)
    assert agree(coll.comm, lambda: coll.rank) == coll.rank


def test_split_live_continues_on_survivors(coll):
    if coll.size < 2:
        pytest.skip("needs two ranks to fail one")
    dead = 1
    live = coll.split_live(coll.rank != dead)
    if coll.rank == dead:
        assert live is None
        return
    assert live.size == coll.size - 1
    assert list(live.world_ranks) == [r for r in range(coll.size) if r != dead]
    x = torch.full((3,), float(coll.rank))
    live.allreduce_mean_(x)
    survivors = [r for r in range(coll.size) if r != dead]
    assert torch.allclose(x, torch.full((3,), sum(survivors) / len(survivors)))  # survivors only: the dead rank has left


def _shm_mapped() -> tuple[int, int]:
    """(regions, bytes) this process maps from /dev/shm: where MPI's shared windows live."""
    files: dict[str, int] = {}
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith("/dev/shm/"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                files[fields[5]] = files.get(fields[5], 0) + hi - lo
    return len(files), sum(files.values())


@pytest.mark.mpi(min_size=2)
def test_shared_windows_are_freed_when_exchanges_are_rebuilt_and_at_close(coll):
    """Ten rebuilds (each failure rebuilds the model's and the momentum's exchange over the new
    live ranks): /dev/shm mappings do not grow; the strategy's close frees the last ones."""
    import os

    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps")
    d = 250_000  # 1 MB per rank and window
    rates = LinkRates.build(coll.size, 0.2)
    before = _shm_mapped()
    x = torch.ones(d)
    for i in range(10):
        model = BlockExchange(coll, d, rates, seed=1, path="shared-memory")
        momentum = BlockExchange(coll, d, rates, seed=1, path="shared-memory")
        model.average(x, step=i)
        momentum.average(x, step=i, count_round=False)
        opened = _shm_mapped()
        coll = coll.split_live(True)  # what Strategy.fail does: every rank is still there
    after = _shm_mapped()
    assert all_ranks(opened[1] >= before[1] + 2 * d * 4)  # the windows were there (the probe sees them)
    assert all_ranks(after[1] <= before[1] and torch.all(x == 1.0))
    last = BlockExchange(coll, d, rates, seed=1, path="shared-memory")
    last.average(x, step=0)
    coll.free_windows()  # Strategy.close
    coll.free_windows()  # twice is harmless
    assert all_ranks(_shm_mapped()[1] <= before[1])
    with pytest.raises(IndexError):
        last.average(x, step=1)  # a freed window is never touched again
