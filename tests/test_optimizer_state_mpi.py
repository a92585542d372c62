"""``average_optimizer_state`` for any torch optimizer under MPI, against the single-process
reference (ALGORITHMS.md, "Local SGD and RI-SGD"): every per-parameter state tensor averaged
with the model, scalar state checked, what cannot be averaged refused by name."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hpcsgd
from hpcsgd.comm import LinkRates
from hpcsgd.errors import ConfigError, TrainingError

from helpers import all_ranks
from reference import averaged_state_run

pytestmark = pytest.mark.mpi(min_size=1)

SEED, DROP = 7, 0.3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3))


def _batch(t: int, rank: int, _m: int = 0):
    g = torch.Generator().manual_seed(100 * t + rank)
    return torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)


def _adamw(params):
    return torch.optim.AdamW(params, lr=0.05, weight_decay=0.01)


def _build(name, model, opt, world, **options):
    if name == "local":
        return hpcsgd.LocalSGD(model, opt, world, tau=2, **options)
    return hpcsgd.RPS(model, opt, world, tau=2, drop_rate=DROP, seed=SEED, **options)


def _state_vector(opt, model, name) -> torch.Tensor:
    return torch.cat([opt.state[p][name].reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("name", ["local", "rps"])
def test_adamw_moments_are_averaged_with_the_model_as_the_reference_does(name):
    """AdamW, tau 2, 5 steps: after each round exp_avg and exp_avg_sq are the same on every rank
    (local; RPS where no message was lost: the reference's blocks and masks say which), and
    model and moments equal the reference's at every rank."""
    world = hpcsgd.init(device="cpu")
    P, steps = world.size, 5
    model = _model()
    references = [_model() for _ in range(P)]
    ref_opts = [_adamw(m.parameters()) for m in references]
    opt = _adamw(model.parameters())
    strategy = _build(name, model, opt, world, average_optimizer_state=True)
    averaged_state_run(references, ref_opts, _batch, steps, 2, name, SEED, LinkRates.build(P, DROP))
    for t in range(steps):
        opt.zero_grad()
        x, y = _batch(t, world.rank)
        F.cross_entropy(model(x), y).backward()
        strategy.step()
        if name == "local" and t % 2 == 1:  # a round: the moments agree everywhere
            for key in ("exp_avg", "exp_avg_sq"):
                everyone = world.comm.allgather(_state_vector(opt, model, key))
                assert all_ranks(all(torch.equal(everyone[0], v) for v in everyone))
    mine, ref = references[world.rank], ref_opts[world.rank]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ref_flat = torch.cat([p.detach().reshape(-1) for p in mine.parameters()])
    errors = [float((flat - ref_flat).abs().max())]
    for key in ("exp_avg", "exp_avg_sq"):
        errors.append(float((_state_vector(opt, model, key) - _state_vector(ref, mine, key)).abs().max()))
    assert all_ranks(max(errors) <= 1e-5), errors
    assert all_ranks(opt.state[next(model.parameters())]["step"] == steps)
    if name == "local" and P > 1:  # the moments did differ before the last round: averaging did something
        plain = _model()
        plain_opt = _adamw(plain.parameters())
        plain_strategy = _build(name, plain, plain_opt, world)
        for t in range(steps):
            plain_opt.zero_grad()
            F.cross_entropy(plain(_batch(t, world.rank)[0]), _batch(t, world.rank)[1]).backward()
            plain_strategy.step()
        everyone = world.comm.allgather(_state_vector(plain_opt, plain, "exp_avg"))
        assert all_ranks(not all(torch.equal(everyone[0], v) for v in everyone))
    strategy.close()


def test_rps_without_drops_leaves_every_moment_identical_after_a_round():
    world = hpcsgd.init(device="cpu")
    model = _model()
    opt = _adamw(model.parameters())
    strategy = hpcsgd.RPS(model, opt, world, tau=2, drop_rate=0.0, average_optimizer_state=True)
    for t in range(4):
        opt.zero_grad()
        x, y = _batch(t, world.rank)
        F.cross_entropy(model(x), y).backward()
        strategy.step()
    for key in ("exp_avg", "exp_avg_sq"):
        everyone = world.comm.allgather(_state_vector(opt, model, key))
        assert all_ranks(all(torch.equal(everyone[0], v) for v in everyone))
    strategy.close()


class RowStats(torch.optim.Optimizer):
    """A made-up optimizer whose state is one value per row: not shaped like its parameter."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["row_mean"] = p.grad.reshape(p.shape[0], -1).mean(1)
                p.add_(p.grad, alpha=-group["lr"])


@pytest.mark.parametrize("name", ["local", "rps"])
def test_optimizers_whose_state_cannot_be_averaged_are_refused_by_name(name):
    world = hpcsgd.init(device="cpu")
    model = _model()
    for opt, why in ((RowStats(model.parameters()), "'row_mean'"),
                     (torch.optim.LBFGS(model.parameters()), "trial step"),
                     (torch.optim.Adafactor(model.parameters()), "not shaped like its parameter")):
        with pytest.raises(ConfigError, match="average_optimizer_state") as raised:
            _build(name, model, opt, world, average_optimizer_state=True)
        message = str(raised.value)
        assert all_ranks(type(opt).__name__ in message and why in message), message
    # the same optimizers are fine when their state stays local
    _build(name, model, RowStats(model.parameters()), world).close()


def test_scalar_state_that_differs_across_ranks_is_refused_on_every_rank():
    """Adam's step counts differ (rank 0 stepped once more): the round raises on every rank
    together instead of averaging moments of different ages."""
    world = hpcsgd.init(device="cpu")
    if world.size == 1:
        pytest.skip("needs 2 ranks to disagree")
    model = _model()
    opt = _adamw(model.parameters())
    strategy = hpcsgd.LocalSGD(model, opt, world, tau=1, average_optimizer_state=True)
    x, y = _batch(0, world.rank)
    F.cross_entropy(model(x), y).backward()
    if world.rank == 0:
        opt.step()  # outside the strategy: rank 0's Adam is one step ahead
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    with pytest.raises(TrainingError, match="'step'"):
        strategy.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert all_ranks(not torch.equal(before, after))  # the local step ran; the round did not
    strategy.close()


def test_sgd_momentum_averaging_keeps_its_trajectory_on_a_model_with_buffers():
    """SGD momentum (the state averaged before any optimizer was): every rank's momentum and
    model equal after a local round, BatchNorm statistics included, at any P."""
    world = hpcsgd.init(device="cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    strategy = hpcsgd.LocalSGD(model, opt, world, tau=2, average_optimizer_state=True)
    reference = copy.deepcopy(model)
    for t in range(2):
        opt.zero_grad()
        x, y = _batch(t, world.rank)
        F.cross_entropy(model(x), y).backward()
        strategy.step()
    everyone = world.comm.allgather(_state_vector(opt, model, "momentum_buffer"))
    assert all_ranks(all(torch.equal(everyone[0], v) for v in everyone))
    flats = world.comm.allgather(strategy.flat.flat.clone())
    assert all_ranks(all(torch.equal(flats[0], v) for v in flats))
    # the reference: P copies, the momenta averaged by hand
    models = [copy.deepcopy(reference) for _ in range(world.size)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    for t in range(2):
        for r, (m, o) in enumerate(zip(models, opts)):
            o.zero_grad()
            x, y = _batch(t, r)
            F.cross_entropy(m(x), y).backward()
            o.step()
    mean_momentum = sum(_state_vector(o, m, "momentum_buffer") for m, o in zip(models, opts)) / world.size
    assert all_ranks(float((everyone[0] - mean_momentum).abs().max()) <= 1e-6)
    strategy.close()
