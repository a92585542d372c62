"""Every strategy's step logic against tests/reference.py with no MPI: P thread-ranks over a fake
communicator (tests/fake_comm.py), the strategy given its comm layer as ``collectives=``.

The unit layer: seconds for the whole file. The MPI tests (test_*_mpi.py) stay the
integration tests: the same strategies over real MPI, through the trainer and the CLI.
"""

from __future__ import annotations

import threading
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hpcsgd
from hpcsgd.algorithms import LocalSGD, LossyAllreduce, PeriodicStrategy, RPS, Strategy, SyncSGD
from hpcsgd.algorithms.registry import ALGORITHMS, REGISTRY
from hpcsgd.comm import Collectives, CommCounters, LinkRates
from hpcsgd.world import World

from fake_comm import run_ranks
from reference import _apply_delayed, _overlapped_round, accumulated_sync, averaged_state_run, blockwise_average

P, STEPS, D_IN, CLASSES = 4, 6, 6, 3


_TORCH_RNG = threading.Lock()  # torch's generator is one for all thread-ranks


def make_model() -> nn.Module:
    with _TORCH_RNG:
        torch.manual_seed(0)  # every rank starts from the same model (the strategy broadcasts it too)
        return nn.Sequential(nn.Linear(D_IN, 5), nn.Tanh(), nn.Linear(5, CLASSES))


def batch(t: int, r: int, m: int = 0):
    g = torch.Generator().manual_seed(10_000 * t + 100 * r + m)
    return torch.randn(7, D_IN, generator=g), torch.randint(0, CLASSES, (7,), generator=g)


def sgd(model, momentum: float = 0.0):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)


def fake_world(comm) -> World:
    return World(comm, comm.rank, comm.size, 0, comm.size, torch.device("cpu"), tuple(range(comm.size)))


def train(cls, steps: int = STEPS, momentum: float = 0.0, size: int = P, **options):
    """Each thread-rank trains a fresh model with ``cls``; returns [(flat x, counters)] in rank order."""

    def rank(comm):
        model = make_model()
        opt = sgd(model, momentum)
        strategy = cls(model, opt, fake_world(comm), collectives=Collectives(comm), **options)
        for t in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(batch(t, comm.rank)[0]), batch(t, comm.rank)[1]).backward()
            strategy.step()
        strategy.flush()
        out = strategy.flat.flat.detach().clone(), strategy.counters
        strategy.close()
        return out

    return run_ranks(size, rank)


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def close(a, b) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6)


# -- gradient averaging -----------------------------------------------------------------------
@pytest.mark.parametrize("overlap", [True, False])
def test_sync_is_one_model_on_the_mean_gradient(overlap):
    results = train(SyncSGD, overlap=overlap, bucket_mb=1e-4)  # several buckets, hooks in backward
    model = make_model()
    _, expected = accumulated_sync(model, sgd(model), batch, P, STEPS, micro=1)
    assert all(close(x, expected) for x, _ in results)
    assert all(torch.equal(results[0][0], x) for x, _ in results)  # replicas identical
    assert all(c.rounds == STEPS for _, c in results)  # one round per step, however many buckets


def test_sync_accumulates_in_no_sync_and_clips_after_synchronize():
    """Two micro-batches a step, the first inside no_sync(); the averaged gradient clipped in between."""

    def rank(comm):
        model = make_model()
        opt = sgd(model)
        strategy = SyncSGD(model, opt, fake_world(comm), collectives=Collectives(comm), bucket_mb=1e-4)
        for t in range(STEPS):
            opt.zero_grad()
            with strategy.no_sync():
                F.cross_entropy(model(batch(t, comm.rank, 0)[0]), batch(t, comm.rank, 0)[1]).backward()
            F.cross_entropy(model(batch(t, comm.rank, 1)[0]), batch(t, comm.rank, 1)[1]).backward()
            strategy.synchronize()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            strategy.step()
        return strategy.flat.flat.detach().clone()

    model = make_model()
    _, expected = accumulated_sync(model, sgd(model), batch, P, STEPS, micro=2, max_norm=0.05)
    assert all(close(x, expected) for x in run_ranks(P, rank))


def test_lossy_allreduce_averages_gradient_blocks_by_the_masks():
    rates = LinkRates.build(P, 0.3)
    results = train(LossyAllreduce, rates=rates, seed=7)
    models = [make_model() for _ in range(P)]
    opts = [sgd(m) for m in models]
    for t in range(STEPS):
        grads = []
        for r, (m, o) in enumerate(zip(models, opts)):
            o.zero_grad()
            F.cross_entropy(m(batch(t, r)[0]), batch(t, r)[1]).backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in m.parameters()]))
        blockwise_average(grads, 7, t, rates)
        for m, o, g in zip(models, opts, grads):
            offset = 0
            for p in m.parameters():
                p.grad.copy_(g[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
            o.step()
    assert all(close(x, _flat(m)) for (x, _), m in zip(results, models))
    assert not all(torch.equal(results[0][0], x) for x, _ in results)  # drops: the replicas drift
    assert all(c.messages_dropped > 0 and c.rounds == STEPS for _, c in results)


# -- model averaging ----------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm, tau, drop", [("local", 1, 0.0), ("local", 3, 0.0), ("rps", 1, 0.0),
                                                   ("rps", 2, 0.3), ("rps", 1, 0.5)])
@pytest.mark.parametrize("momentum, with_state", [(0.0, False), (0.9, True)])
def test_model_averaging_against_the_reference(algorithm, tau, drop, momentum, with_state):
    rates = LinkRates.build(P, drop)
    lossy = {"rates": rates, "seed": 3} if algorithm == "rps" else {}
    cls = REGISTRY[algorithm].cls
    results = train(cls, momentum=momentum, tau=tau, average_optimizer_state=with_state, **lossy)
    models = [make_model() for _ in range(P)]
    averaged_state_run(models, [sgd(m, momentum) for m in models], batch, STEPS, tau, algorithm, seed=3, rates=rates)
    assert all(close(x, _flat(m)) for (x, _), m in zip(results, models))
    assert all(c.rounds == STEPS // tau for _, c in results)


@pytest.mark.parametrize("algorithm, drop", [("local", 0.0), ("rps", 0.0), ("rps", 0.4)])
def test_overlapped_rounds_land_one_step_late(algorithm, drop):
    rates, tau = LinkRates.build(P, drop), 2
    lossy = {"rates": rates, "seed": 5} if algorithm == "rps" else {}
    results = train(REGISTRY[algorithm].cls, tau=tau, overlap_rounds=True, **lossy)
    cfg = SimpleNamespace(algorithm=algorithm, tau=tau, seed=5)
    models = [make_model() for _ in range(P)]
    opts = [sgd(m) for m in models]
    workers = [SimpleNamespace(flat=SimpleNamespace(flat=None)) for _ in models]
    pending = None
    for t in range(STEPS):
        for r, (m, o) in enumerate(zip(models, opts)):
            o.zero_grad()
            F.cross_entropy(m(batch(t, r)[0]), batch(t, r)[1]).backward()
            o.step()
        for w, m in zip(workers, models):
            w.flat.flat = _flat(m).clone()  # the reference edits the vector; the model takes it back
        pending = _overlapped_round(workers, pending if t else None, cfg, t, rates, P)
        for w, m in zip(workers, models):
            _load(m, w.flat.flat)
    for w, m in zip(workers, models):
        w.flat.flat = _flat(m).clone()
    _apply_delayed(workers, pending)  # the last round, applied by flush()
    assert all(close(x, w.flat.flat) for (x, _), w in zip(results, workers))


def _load(model, vector: torch.Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(vector[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


# -- the strategy's own state --------------------------------------------------------------------
def test_state_dict_round_trip_and_a_missing_key_warns():
    def rank(comm):
        model = make_model()
        strategy = LocalSGD(model, sgd(model), fake_world(comm), collectives=Collectives(comm), tau=2)
        strategy.steps, strategy.failed_counters = 5, CommCounters(bytes_sent=12, messages_dropped=2)
        strategy.counters.rounds = 3
        state = strategy.state_dict()
        other = LocalSGD(make_model(), sgd(make_model()), fake_world(comm), collectives=Collectives(comm), tau=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            other.load_state_dict(state)  # every key there: no warning
        restored = (other.steps, other.counters.rounds, other.failed_counters)
        partial = {k: v for k, v in state.items() if k != "failed_counters"}
        with pytest.warns(UserWarning, match="failed_counters"):
            other.load_state_dict(partial)
        with pytest.raises(hpcsgd.CheckpointError, match="had failed"):
            other.load_state_dict({**state, "live_ranks": [r for r in range(comm.size) if r != comm.rank]})
        return restored

    for steps, rounds, failed in run_ranks(2, rank):
        assert steps == 5 and rounds == 3 and failed == CommCounters(bytes_sent=12, messages_dropped=2)


def test_counters_add():
    a, b = CommCounters(1, 2, 3, 4, 5), CommCounters(10, 20, 30, 40, 50)
    assert a + b == CommCounters(11, 22, 33, 44, 55) and a == CommCounters(1, 2, 3, 4, 5)
    shared = a
    a += b
    assert shared is a and shared.bytes_sent == 22  # in place: layers sharing the object see it
    assert CommCounters.from_traffic(b.traffic()) == CommCounters(0, 20, 30, 40, 50)


def test_fail_hands_the_traffic_to_the_survivors():
    def rank(comm):
        model = make_model()
        strategy = LocalSGD(model, sgd(model), fake_world(comm), collectives=Collectives(comm), tau=1)
        strategy.counters.bytes_sent = 100 * (comm.rank + 1)
        alive = strategy.fail([1])
        return alive, strategy.live_ranks, strategy.failed_counters.bytes_sent, alive and strategy.live_rank

    results = run_ranks(3, rank)
    assert [alive for alive, *_ in results] == [True, False, True]
    assert results[0][1] == results[2][1] == [0, 2] and results[0][2] == results[2][2] == 200
    assert results[2][3] == 1  # rank 2 is the second live rank now


def test_registry_names_each_class_and_classes_are_defined_once():
    for spec in REGISTRY.values():
        assert issubclass(spec.cls, Strategy) and spec.cls.name == spec.name
    for name in ALGORITHMS:  # the built-in ones: the public class is the one class
        assert getattr(hpcsgd, REGISTRY[name].cls.__name__) is REGISTRY[name].cls
    assert issubclass(RPS, PeriodicStrategy) and issubclass(LocalSGD, PeriodicStrategy)  # one period logic


# -- a fifth strategy, defined here --------------------------------------------------------------
class WeightedEveryStep(Strategy):
    """After every optimizer step, ``x <- sum_i w_i x_i`` with weights ``w_i`` proportional to ``i + 1``."""

    name = "weighted-every-step"

    def after_step(self, step: int) -> None:
        weights = np.arange(1, self.coll.size + 1, dtype=np.float64)
        self.flat.flat.mul_(float(weights[self.coll.rank] / weights.sum()))
        self.coll.allreduce_sum_(self.flat.flat)


hpcsgd.algorithms.register(hpcsgd.algorithms.Algorithm("weighted-every-step", WeightedEveryStep, uses_tau=False, lossy=False))


def test_a_fifth_strategy_registered_in_one_line_trains_against_its_closed_form():
    def rank(comm):
        model = make_model()
        opt = sgd(model)
        strategy = hpcsgd.algorithms.build("weighted-every-step", model, opt, fake_world(comm),
                                           collectives=Collectives(comm))
        strategy.flat.flat.fill_(float(comm.rank))  # x_i = i, a zero gradient: one step is the weighted mean
        opt.zero_grad()
        (0.0 * model(batch(0, comm.rank)[0]).sum()).backward()
        strategy.step()
        return strategy.flat.flat.clone(), strategy.consensus_distance()

    results = run_ranks(3, rank)
    expected = (1 * 0 + 2 * 1 + 3 * 2) / 6
    assert all(torch.allclose(x, torch.full_like(x, expected)) and d == 0.0 for x, d in results)


@pytest.mark.mpi(min_size=1)
def test_the_fifth_strategy_trains_through_the_public_api_under_mpi():
    """hpcsgd.init, a RedundantSampler, a plain loop: every step lands on the weighted mean of the
    ranks' own SGD steps, on every rank."""
    from helpers import all_ranks

    world = hpcsgd.init(device="cpu")
    y = torch.arange(96) % CLASSES
    data = torch.utils.data.TensorDataset(torch.randn(96, D_IN, generator=torch.Generator().manual_seed(0)) + 2 * y[:, None], y)
    sampler = hpcsgd.RedundantSampler(data, world, q=min(2, world.size), batch_size=4, partition="label", labels=y, seed=1)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler)
    model = make_model()
    opt = sgd(model)
    strategy = hpcsgd.algorithms.build("weighted-every-step", model, opt, world)
    weights = np.arange(1, world.size + 1, dtype=np.float64) / (world.size * (world.size + 1) / 2)
    ok, losses, epochs = True, [], 3
    with torch.no_grad():
        start = F.cross_entropy(model(data.tensors[0]), y).item()  # the whole set, the same model on every rank
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, target in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), target)
            loss.backward()
            own = torch.cat([(p.detach() - 0.1 * p.grad).reshape(-1) for p in model.parameters()]).double()
            expected = sum(w * v for w, v in zip(weights, world.comm.allgather(own)))
            strategy.step()
            ok &= torch.allclose(strategy.flat.flat.double(), expected, rtol=1e-5, atol=1e-6)
            losses.append(loss.item())
    assert all_ranks(ok and len(losses) == epochs * len(sampler) and strategy.consensus_distance() == 0.0)
    with torch.no_grad():
        assert all_ranks(F.cross_entropy(model(data.tensors[0]), y).item() < start)  # it learns
