"""Gradient accumulation (``no_sync()``) and edits after averaging (``synchronize()``) under MPI,
against the single-process reference (ALGORITHMS.md, "Gradient accumulation and edits after
averaging"). Written against ``import hpcsgd`` only, like a user's script."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hpcsgd

from helpers import all_ranks
from reference import accumulated_sync

pytestmark = pytest.mark.mpi(min_size=1)

BUCKET_MB = 0.0004  # 100 floats: the MLP below spans two buckets, so hooks start some mid-backward


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _batch(t: int, rank: int, m: int):
    """Micro-batch m of rank ``rank`` at step t: any rank can draw any other rank's."""
    g = torch.Generator().manual_seed(1000 * t + 10 * rank + m)
    n = 4 + 3 * m  # micro-batches of different sizes
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _backward(model, t, rank, m):
    x, y = _batch(t, rank, m)
    F.cross_entropy(model(x), y).backward()


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _identical_everywhere(world, tensor) -> bool:
    everyone = world.comm.allgather(tensor.clone())
    return all(torch.equal(everyone[0], v) for v in everyone)


def test_no_sync_then_synchronize_gives_the_mean_accumulated_gradient_and_clipping_sees_it():
    """Two micro-batches, the first under no_sync(), overlap on: no communication inside it; after
    synchronize() .grad is the mean over ranks of the accumulated gradients (<= 1e-6) and
    clip_grad_norm_ returns its norm; step() averages nothing again; replicas stay identical."""
    world = hpcsgd.init(device="cpu")
    P, max_norm, steps = world.size, 0.05, 3
    model = _model()
    reference_model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
    strategy = hpcsgd.SyncSGD(model, opt, world, bucket_mb=BUCKET_MB)
    assert len(strategy.buckets) >= 2
    expected, expected_final = accumulated_sync(
        reference_model, torch.optim.SGD(reference_model.parameters(), lr=0.3, momentum=0.5),
        _batch, P, steps, micro=2, max_norm=max_norm)
    for t in range(steps):
        strategy.zero_grad()
        before = strategy.counters.as_dict()
        with strategy.no_sync():
            _backward(model, t, world.rank, 0)
        assert all_ranks(strategy.counters.as_dict() == before)  # nothing started inside no_sync()
        _backward(model, t, world.rank, 1)
        strategy.synchronize()
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()
        error = float((grad - expected[t]).abs().max())
        assert all_ranks(error <= 1e-6), error
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        assert all_ranks(abs(norm - float(expected[t].norm())) <= 1e-6 * max(1.0, norm)), norm
        assert all_ranks(norm > max_norm)  # it clipped the averaged gradient, not a local one
        rounds = strategy.counters.rounds
        strategy.step()
        assert all_ranks(strategy.counters.rounds == rounds)  # step() did not average again
        assert all_ranks(_identical_everywhere(world, _flat(model)))
    assert all_ranks(float((_flat(model) - expected_final).abs().max()) <= 1e-5)
    assert all_ranks(strategy.counters.rounds == steps)
    strategy.close()


@pytest.mark.parametrize("which", ["sync-overlap", "sync-blocking", "lossy-allreduce"])
def test_accumulation_with_adamw_equals_the_reference(which):
    """Four steps of AdamW on two micro-batches per step (the first under no_sync()), the
    optimizer zeroing gradients its own way (set to None): the reference's trajectory."""
    world = hpcsgd.init(device="cpu")
    P, steps = world.size, 4
    model = _model()
    reference_model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    if which == "lossy-allreduce":
        strategy = hpcsgd.LossyAllreduce(model, opt, world, drop_rate=0.0)
    else:
        strategy = hpcsgd.SyncSGD(model, opt, world, overlap=which == "sync-overlap", bucket_mb=BUCKET_MB)
    _, expected_final = accumulated_sync(
        reference_model, torch.optim.AdamW(reference_model.parameters(), lr=0.01, weight_decay=0.1),
        _batch, P, steps, micro=2)
    for t in range(steps):
        opt.zero_grad()  # set_to_none: autograd hands out fresh tensors, the strategy adopts them
        with strategy.no_sync():
            _backward(model, t, world.rank, 0)
        _backward(model, t, world.rank, 1)
        strategy.step()
        assert all_ranks(_identical_everywhere(world, _flat(model)))
    error = float((_flat(model) - expected_final).abs().max())
    assert all_ranks(error <= 1e-5), error
    strategy.close()


def test_misordered_backward_passes_are_refused_not_averaged_half_written():
    """Outside no_sync() a second gradient for a parameter in one step raises (naming no_sync);
    so do a no_sync() backward after the average started and a backward after synchronize()."""
    world = hpcsgd.init(device="cpu")
    model = _model()
    strategy = hpcsgd.SyncSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), world, bucket_mb=BUCKET_MB)
    cases = {
        "twice": lambda: _backward(model, 0, world.rank, 1),
        "no_sync after": lambda: _in_no_sync(strategy, model, world.rank),
    }
    for name, second in cases.items():
        strategy.zero_grad()
        _backward(model, 0, world.rank, 0)
        with pytest.raises(RuntimeError, match="no_sync") as raised:
            second()
        assert all_ranks("already being averaged" in str(raised.value) or "average has started" in str(raised.value))
        strategy.synchronize()  # completes the requests the first backward started, on every rank
        strategy.step()
    strategy.zero_grad()
    _backward(model, 1, world.rank, 0)
    strategy.synchronize()
    with pytest.raises(RuntimeError, match="synchronize"):
        _backward(model, 1, world.rank, 1)
    strategy.step()
    strategy.close()


def _in_no_sync(strategy, model, rank):
    with strategy.no_sync():
        _backward(model, 0, rank, 1)


@pytest.mark.parametrize("name", ["local", "rps"])
def test_model_averaging_strategies_accumulate_and_synchronize_without_communicating(name):
    """Under local SGD and RPS no_sync() and synchronize() are no-ops on communication: the run
    with them takes the same steps, bit for bit, as the run that just calls backward twice."""
    world = hpcsgd.init(device="cpu")
    results = []
    for use_api in (False, True):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        strategy = hpcsgd.LocalSGD(model, opt, world, tau=2) if name == "local" else \
            hpcsgd.RPS(model, opt, world, tau=2, drop_rate=0.3, seed=4)
        for t in range(4):
            opt.zero_grad()
            if use_api:
                with strategy.no_sync():
                    _backward(model, t, world.rank, 0)
            else:
                _backward(model, t, world.rank, 0)
            _backward(model, t, world.rank, 1)
            if use_api:
                before = strategy.counters.as_dict()
                strategy.synchronize()
                assert all_ranks(strategy.counters.as_dict() == before)
            strategy.step()
        results.append((_flat(model), strategy.counters.as_dict()))
        strategy.close()
    assert all_ranks(torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1])
