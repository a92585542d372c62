"""A modern loop's needs under MPI: the averaged model, resume on fewer ranks, logs that continue.

Written against ``import hpcsgd`` (plus the CLI's own plan, to check the library uses it).
Resuming on fewer ranks runs in one job: every rank saves, then a sub-communicator of fewer
ranks is the "requeued job" that loads.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mpi4py import MPI

import hpcsgd
from hpcsgd.data.fractional import Redundancy, per_rank_redundancy
from hpcsgd.train.membership import Membership
from hpcsgd.redundant import RedundantSampler

from helpers import all_ranks

pytestmark = pytest.mark.mpi(min_size=1)

STRATEGIES = {
    "sync": lambda m, o, w: hpcsgd.SyncSGD(m, o, w),
    "local": lambda m, o, w: hpcsgd.LocalSGD(m, o, w, tau=3),
    "local-overlapped": lambda m, o, w: hpcsgd.LocalSGD(m, o, w, tau=1, overlap_rounds=True),
    "rps": lambda m, o, w: hpcsgd.RPS(m, o, w, tau=1, drop_rate=0.3, seed=2),
    "lossy": lambda m, o, w: hpcsgd.LossyAllreduce(m, o, w, drop_rate=0.3, seed=2),
}


def _net():
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


def _own_values(rank: int, n: int) -> torch.Tensor:
    """Rank ``rank``'s model values: the rank plus noise any rank can redraw."""
    return rank + torch.randn(n, generator=torch.Generator().manual_seed(100 + rank))


def _flat(model) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in [*model.parameters(), *model.buffers()]
                      if t.is_floating_point()])


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_averaged_model_is_the_mean_of_the_live_ranks_and_each_rank_gets_its_own_back(name):
    world = hpcsgd.init(device="cpu")
    P = world.size
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    strategy = STRATEGIES[name](model, opt, world)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(world.rank))
    for _ in range(2):  # a few real steps first (an overlapped round is then in flight)
        opt.zero_grad()
        model(x).sum().backward()
        strategy.step()
    live = list(range(P))
    for round_ in range(2):  # all ranks, then the survivors of a failure
        n = strategy.flat.numel
        strategy.flush()  # a round in flight lands first; then each rank's model is set
        with torch.no_grad():
            strategy.flat.flat.copy_(_own_values(world.rank, n))
        own = _flat(model).clone()
        # Every rank's values are known everywhere: the mean over the live ones, in float64.
        expected = torch.stack([_own_values(r, n).double() for r in live]).mean(0).float()
        with strategy.averaged_model() as inside:
            ok = inside is model and torch.allclose(_flat(model), expected, rtol=0, atol=1e-6)
        ok &= torch.equal(_flat(model), own)  # bit for bit, BatchNorm statistics included
        ok &= strategy.flat.flat.data_ptr() == next(model.parameters()).data_ptr()
        assert strategy.coll.comm.allreduce(bool(ok), op=MPI.LAND)  # over the live ranks
        if round_ == 1 or P == 1:
            break
        alive = strategy.fail([P - 1])
        live = live[:-1]
        if not alive:
            return


def test_averaged_model_of_equal_values_is_exact_and_restores_after_an_exception():
    world = hpcsgd.init(device="cpu")
    model = torch.nn.Linear(3, 2)
    strategy = hpcsgd.LocalSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), world)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(world.rank))
    with pytest.raises(RuntimeError, match="inside"):
        with strategy.averaged_model():
            exact = all(torch.all(p == (world.size - 1) / 2) for p in model.parameters())
            raise RuntimeError("inside")
    assert all_ranks(exact and all(torch.all(p == world.rank) for p in model.parameters()))


def _dataset(n=240, classes=6):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    return torch.utils.data.TensorDataset(torch.randn(n, 5, generator=g) + y[:, None], y)


def _job(world, q=2, tau=2, redundancy=None):
    """The parts of one rank's job (a fresh script start); ``redundancy`` (mu) instead of q."""
    data = _dataset()
    held = {"q": min(q, world.size)} if redundancy is None else {"redundancy": redundancy}
    sampler = hpcsgd.RedundantSampler(data, world, **held, batch_size=4, partition="label", labels=data.tensors[1],
                                      seed=1)
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    strategy = hpcsgd.LocalSGD(model, opt, world, tau=tau)
    return data, {"model": model, "optimizer": opt, "sampler": sampler, "strategy": strategy}


def _train(data, parts, steps):
    model, opt, sampler, strategy = (parts[k] for k in ("model", "optimizer", "sampler", "strategy"))
    for _ in range(steps):
        idx = sampler.next_indices()
        x, y = data[idx]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        strategy.step()


@pytest.mark.parametrize("mu", [None, 0.5], ids=["q2", "mu0.5"])
def test_load_checkpoint_on_fewer_ranks_adopts_chunks_as_the_cli_does(shared_tmp, capfd, mu):
    comm = MPI.COMM_WORLD
    P = comm.size
    if mu is not None and P < 3:
        pytest.skip("fractional redundancy resumed on fewer ranks needs mu <= W - 1 on the W >= 2 processes left")
    world = hpcsgd.init(device="cpu")
    data, parts = _job(world, redundancy=mu)
    _train(data, parts, 6)
    hpcsgd.save_checkpoint(shared_tmp, world, parts, step=6)
    spe = len(parts["sampler"])
    W = max(1, P // 2) if P > 3 else max(1, P - 1)  # 4 -> 2, 3 -> 2, 2 -> 1, 1 -> 1 (no resize)
    sub = comm.Split(0 if comm.rank < W else MPI.UNDEFINED, comm.rank)
    ok = True
    if sub != MPI.COMM_NULL:
        small = hpcsgd.init(sub, device="cpu")
        data, fresh = _job(small, redundancy=mu)
        assert hpcsgd.load_checkpoint(shared_tmp, small, fresh) == 6
        s, sampler = fresh["strategy"], fresh["sampler"]
        # The CLI's plan, from the fractional module's own pieces (not the sampler's for_run).
        redundancy = None if mu is None else Redundancy(per_rank_redundancy(P, mu, 0.0, None, 1),
                                                        tuple(sampler.chunk_sizes), 1, sampler.placement)
        plan = Membership.assign(P, min(2, P) if mu is None else 1, W, sub.rank, {},
                                 {"step": 6, "live_world": list(range(P)), "adopted": {}, "dir": str(shared_tmp)},
                                 chunk_sizes=list(sampler.chunk_sizes), redundancy=redundancy)
        ok &= s.world.size == P and s.world.rank == sub.rank and s.live_ranks == list(range(W))
        ok &= sampler.adopted == plan.adopted and len(sampler) == spe and s.steps == 6
        ok &= (sampler.redundancy is None) == (mu is None) and (mu is None or bool(plan.adopted))  # a partial chunk adopted whole
        ok &= sampler.coverage(s.live_ranks) == 1.0
        # The CLI's sampler for the same plan, loaded from the same rank file, draws the same batches.
        from hpcsgd.checkpoint import read_part, step_dir
        from hpcsgd.world import world_for_run

        run_world = world_for_run(sub, plan.roles, P, torch.device("cpu"))
        held = {"q": min(2, P)} if mu is None else {"redundancy": mu}
        cli = RedundantSampler.over_chunks([len(c) for c in sampler.chunks], run_world, **held, batch_size=4, seed=1,
                                           adopted=plan.adopted)
        cli.set_live(plan.live)
        cli.load_state_dict(read_part(step_dir(shared_tmp, 6) / f"rank-{plan.rank}.h5", "sampler"))
        for _ in range(3):
            a, b = sampler.next_chunk_batch(), cli.next_chunk_batch()
            ok &= [c for c, _ in a] == [c for c, _ in b] and all(np.array_equal(i, j) for (_, i), (_, j) in zip(a, b))
        _train(data, fresh, 4)  # LocalSGD goes on over the live ranks
        with s.averaged_model():
            mean = torch.cat([p.detach().reshape(-1) for p in fresh["model"].parameters()])
        everyone = sub.allgather(mean.tolist())
        ok &= all(v == everyone[0] for v in everyone)
        hpcsgd.save_checkpoint(shared_tmp, small, fresh, step=10)  # the run's P and adoption go on
        record = json.loads((step_dir(shared_tmp, 10) / "COMPLETE").read_text())
        ok &= record["ranks"] == P and record["live_world"] == list(range(W))
        ok &= {int(c): r for c, r in record["adopted"].items()} == plan.adopted
        sub.Free()
    assert all_ranks(ok)
    err = capfd.readouterr().err
    if comm.rank == 0 and W < P:
        assert f"resuming a run of {P} ranks on {W} processes at step 6" in err and "coverage 100%" in err


def test_load_checkpoint_on_more_ranks_than_live_is_refused_on_every_rank(shared_tmp):
    comm = MPI.COMM_WORLD
    if comm.size == 1:
        pytest.skip("needs 2 ranks or more")
    W = comm.size - 1
    sub = comm.Split(0 if comm.rank < W else MPI.UNDEFINED, comm.rank)
    if sub != MPI.COMM_NULL:
        small = hpcsgd.init(sub, device="cpu")
        data, parts = _job(small, q=1)
        hpcsgd.save_checkpoint(shared_tmp, small, parts, step=0)
        sub.Free()
    comm.Barrier()
    world = hpcsgd.init(device="cpu")
    _, parts = _job(world, q=1)
    with pytest.raises(hpcsgd.CheckpointError) as caught:
        hpcsgd.load_checkpoint(shared_tmp, world, parts)
    assert all_ranks(f"has {W} live ranks of a run of {W}; this job has {comm.size} processes: resume on at most {W}"
                     in str(caught.value))


def test_runlog_continues_after_the_resume_step(shared_tmp):
    world = hpcsgd.init(device="cpu")
    data, parts = _job(world)
    config = {"algorithm": "local", "q": 2, "tau": 2}
    log = hpcsgd.RunLog(shared_tmp, world, config, sampler=parts["sampler"])
    for step in (2, 4, 6, 8):
        _train(data, parts, 2)
        log.log(step, parts["strategy"], loss=float(step))
    departed = shared_tmp / "metrics" / f"rank-{world.size + 3}.jsonl"  # a rank no process plays now
    if world.rank == 0:
        departed.write_text("".join(json.dumps({"step": s, "wall_s": 1.0}) + "\n" for s in (2, 4, 6)))
    world.comm.Barrier()
    wall_at_4 = [json.loads(line) for line in log.metrics.path.read_text().splitlines()][1]["wall_s"]
    log.metrics.close()

    again = hpcsgd.RunLog(shared_tmp, world, config, resume_step=4, sampler=parts["sampler"])
    record = again.log(6, parts["strategy"], loss=6.5)
    summary = again.finish(parts["strategy"])
    steps = [json.loads(line)["step"] for line in again.metrics.path.read_text().splitlines()]
    losses = [json.loads(line)["loss"] for line in again.metrics.path.read_text().splitlines()]
    assert all_ranks(steps == [2, 4, 6] and losses == [2.0, 4.0, 6.5])
    assert all_ranks(record["wall_s"] >= wall_at_4 and record["coverage"] == 1.0)
    if world.rank == 0:
        assert [json.loads(line)["step"] for line in departed.read_text().splitlines()] == [2, 4]
        assert summary["ranks"] == world.size and summary["world_size"] == world.size
        assert summary["coverage"] == 1.0 and summary["wall_s"] >= wall_at_4
    with pytest.raises(hpcsgd.ConfigError, match="resume_step must be an integer >= 0"):
        hpcsgd.RunLog(shared_tmp, world, config, resume_step=-1)


def test_runlog_summary_coverage_after_failures():
    """q=1: a failed rank's chunk is lost; the summary says so (from the sampler or config q)."""
    world = hpcsgd.init(device="cpu")
    P = world.size
    if P == 1:
        pytest.skip("needs 2 ranks or more")
    import tempfile
    from pathlib import Path

    path = Path(world.comm.bcast(tempfile.mkdtemp(prefix="hpcsgd-test-") if world.rank == 0 else None))
    data, parts = _job(world, q=1)
    log = hpcsgd.RunLog(path, world, {"q": 1}, sampler=parts["sampler"])
    alive = parts["strategy"].fail([P - 1])
    summary = log.finish(parts["strategy"]) if alive else None
    if world.rank == 0:
        assert summary["coverage"] == (P - 1) / P and summary["live_ranks"] == P - 1
    world.comm.Barrier()
