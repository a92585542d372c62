"""The public strategies under MPI against closed forms: rank r's model is r, the mean is (P-1)/2.

Written against ``import hpcsgd`` only, like a user's script.
"""

from __future__ import annotations

import json

import pytest
import torch

import hpcsgd

from helpers import all_ranks

pytestmark = pytest.mark.mpi(min_size=1)


def test_constructor_broadcasts_rank_0s_model():
    world = hpcsgd.init(device="cpu")
    torch.manual_seed(world.rank)  # every rank draws a different initialisation
    model = torch.nn.Linear(3, 2)
    hpcsgd.LocalSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), world)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = world.comm.allgather(flat.tolist())
    assert all_ranks(all(v == everyone[0] for v in everyone))


def test_local_sgd_round_is_the_mean_and_fail_continues_with_the_survivors():
    world = hpcsgd.init(device="cpu")
    P = world.size
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    strategy = hpcsgd.LocalSGD(model, opt, world, tau=2)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(world.rank))
    for _ in range(2):  # lr 0: the models change only by averaging, at the second step
        opt.zero_grad()
        model(torch.ones(1, 3)).sum().backward()
        strategy.step()
    mean = (P - 1) / 2
    assert all_ranks(all(torch.all(p == mean) for p in model.parameters()))
    assert all_ranks(strategy.counters.rounds == 1 and strategy.steps == 2)
    assert all_ranks(strategy.consensus_distance() == 0.0)
    if P == 1:
        return
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(world.rank))
    alive = strategy.fail([P - 1])
    assert all_ranks(alive == (world.rank != P - 1))
    assert all_ranks(strategy.live_ranks == list(range(P - 1)))
    if not alive:
        return
    for _ in range(2):
        opt.zero_grad()
        model(torch.ones(1, 3)).sum().backward()
        strategy.step()
    survivors_mean = (P - 2) / 2
    ok = all(torch.allclose(p, torch.full_like(p, survivors_mean)) for p in model.parameters())
    assert strategy.coll.comm.allreduce(ok) == P - 1  # among the survivors only


def test_runlog_writes_what_report_reads(shared_tmp):
    world = hpcsgd.init(device="cpu")
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = hpcsgd.RPS(model, opt, world, tau=1, drop_rate=0.3, seed=1)
    log = hpcsgd.RunLog(shared_tmp / "run", world, {"algorithm": "rps", "q": 1, "tau": 1, "drop_rate": 0.3})
    g = torch.Generator().manual_seed(world.rank)
    for step in range(1, 5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(4, 3, generator=g)), torch.tensor([0, 1, 0, 1])).backward()
        strategy.step()
        record = log.log(step, strategy, loss=0.5)
    summary = log.finish(strategy, rank_means={"test_accuracy": float(world.rank)})
    assert all_ranks(record["rounds"] == 4 and record["live_ranks"] == world.size)
    if world.rank == 0:
        on_disk = json.loads((shared_tmp / "run" / "summary.json").read_text())
        assert on_disk == summary
        assert summary["algorithm"] == "rps" and summary["steps"] == 4 and summary["ranks"] == world.size
        assert summary["test_accuracy_rank_mean"] == (world.size - 1) / 2
        assert "drop_rate = 0.3" in (shared_tmp / "run" / "config.toml").read_text()
    lines = (shared_tmp / "run" / "metrics" / f"rank-{world.rank}.jsonl").read_text().splitlines()
    assert all_ranks([json.loads(line)["step"] for line in lines] == [1, 2, 3, 4])
