"""The shared-memory exchange's fences hold when ranks wait in different ways.

How a rank waits (spin, yield, sleep) is its own choice: ``HPCSGD_WAIT`` per process, or the
node decision of the last ``hpcsgd.init``, which a sub-communicator's ``init`` takes for its
ranks only. At 3 ranks on 2 cores that left two ranks spinning and one sleeping, and RPS's
shared-memory round deadlocked (the sleeping rank in an ``Ibarrier`` the others skipped).
"""

from __future__ import annotations

import pytest
import torch

import hpcsgd

from helpers import all_ranks


def _rps_steps(world, steps: int = 3) -> torch.Tensor:
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = hpcsgd.RPS(model, opt, world, tau=1, drop_rate=0.2, seed=3)
    for step in range(steps):
        x = torch.full((4, 6), float(world.rank + step))
        opt.zero_grad()
        model(x).square().mean().backward()
        strategy.step()
    strategy.close()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.mpi(min_size=2)
def test_rps_round_completes_when_one_rank_sleeps_and_the_others_spin(monkeypatch):
    world = hpcsgd.init(device="cpu")
    reference = _rps_steps(world)  # every rank waits the same way
    monkeypatch.setenv("HPCSGD_WAIT", "sleep" if world.rank == 0 else "spin")
    mixed = _rps_steps(world)
    assert all_ranks(torch.equal(mixed, reference))  # how a rank waits changes no value


@pytest.mark.mpi(min_size=3)
def test_rps_round_completes_after_a_sub_communicator_init():
    """The scenario that hung: ``init`` on two of the ranks, then a round over all of them."""
    world = hpcsgd.init(device="cpu")
    from mpi4py import MPI

    sub = world.comm.Split(0 if world.rank < 2 else MPI.UNDEFINED, key=world.rank)
    if sub != MPI.COMM_NULL:
        hpcsgd.init(sub, device="cpu")
        sub.Free()
    params = _rps_steps(hpcsgd.init(device="cpu"))
    assert all_ranks(bool(torch.isfinite(params).all()))
