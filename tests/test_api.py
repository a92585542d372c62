"""The public API on one process: no import side effects, the sampler, argument checks, checkpoints.

Like a user's script, this uses ``import hpcsgd`` only.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import hpcsgd


class FakeComm:
    """The two things the sampler reads from a world's communicator (rank and size) for rank r of P."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size


def fake_world(rank: int, size: int) -> hpcsgd.World:
    return hpcsgd.World(FakeComm(rank, size), rank, size, 0, 1, torch.device("cpu"), tuple(range(size)))


def dataset(n=103, classes=5):
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1)
    y = torch.arange(n) % classes
    ds = torch.utils.data.TensorDataset(x, y)
    ds.targets = y
    return ds


def test_import_has_no_side_effects():
    code = ("import sys, hpcsgd; assert not any(m.split('.')[0] in ('torch', 'mpi4py') for m in sys.modules), "
            "sorted(m for m in sys.modules if m.startswith(('torch', 'mpi4py')))[:5]; print(len(hpcsgd.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == len(hpcsgd.__all__) > 10
    for name in hpcsgd.__all__:
        assert getattr(hpcsgd, name).__doc__, name


def test_sampler_covers_q_chunks_and_every_rank_has_the_same_length():
    P, q, b = 4, 2, 3
    ds = dataset()
    samplers = [hpcsgd.RedundantSampler(ds, fake_world(r, P), q=q, batch_size=b, partition="label", seed=1) for r in range(P)]
    assert {len(s) for s in samplers} == {int(np.ceil(len(ds) / P / b))}
    chunks = samplers[0].chunks
    assert sorted(np.concatenate(chunks).tolist()) == list(range(len(ds)))  # a partition of the data set
    for r, s in enumerate(samplers):
        held = set(chunks[r].tolist()) | set(chunks[(r + 1) % P].tolist())
        batches = list(s)
        assert len(batches) == len(s)
        assert all(set(batch) <= held for batch in batches)
        # own chunk first, then the next: b (or the size-weighted draw) from each
        own = len(batches[0]) - sum(1 for i in batches[0] if i in set(chunks[(r + 1) % P].tolist()))
        assert own >= 1


def test_set_epoch_continues_or_seeks_to_the_same_batches():
    ds, world = dataset(), fake_world(2, 4)
    walked = hpcsgd.RedundantSampler(ds, world, q=2, batch_size=4, seed=3)
    epochs = []
    for epoch in range(3):
        walked.set_epoch(epoch)
        epochs.append(list(walked))
    fresh = hpcsgd.RedundantSampler(ds, world, q=2, batch_size=4, seed=3)
    fresh.set_epoch(2)
    assert list(fresh) == epochs[2]
    restored = hpcsgd.RedundantSampler(ds, world, q=2, batch_size=4, seed=3)
    restored.load_state_dict(walked.state_dict())
    walked.set_epoch(3)
    restored.set_epoch(3)
    assert list(restored) == list(walked)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"q": 5}, "q must be an integer in 1..4 (P=4), got 5"),
        ({"q": 0}, "q must be an integer in 1..4 (P=4), got 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"partition": "zipf"}, "partition must be one of iid, label, dirichlet:ALPHA"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ],
)
def test_sampler_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        hpcsgd.RedundantSampler(dataset(), fake_world(0, 4), **kwargs)


def test_label_partition_needs_labels():
    ds = torch.utils.data.TensorDataset(torch.zeros(10, 1), torch.zeros(10, dtype=torch.long))
    with pytest.raises(hpcsgd.ConfigError, match="partition 'label' needs labels"):
        hpcsgd.RedundantSampler(ds, fake_world(0, 2), partition="label")
    hpcsgd.RedundantSampler(ds, fake_world(0, 2), partition="label", labels=ds.tensors[1])  # given: fine


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda m, o, w: hpcsgd.LocalSGD(m, o, w, tau=0), "tau must be an integer >= 1, got 0"),
        (lambda m, o, w: hpcsgd.RPS(m, o, w, tau=2, drop_rate=1.0), "drop_rate must be in [0, 1)"),
        (lambda m, o, w: hpcsgd.RPS(m, o, w, seed=-2), "seed must be an integer >= 0, got -2"),
        (lambda m, o, w: hpcsgd.LossyAllreduce(m, o, w, drop_rate=-0.1), "drop_rate must be in [0, 1)"),
        (lambda m, o, w: hpcsgd.SyncSGD(m, o, w, bucket_mb=0), "bucket_mb must be a number > 0, got 0"),
        (lambda m, o, w: hpcsgd.LocalSGD(m, "sgd", w), "optimizer must be a torch.optim.Optimizer, got str"),
    ],
)
def test_strategy_arguments_are_checked_at_construction(build, message):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError) as info:
        build(model, opt, fake_world(0, 4))
    assert message in str(info.value)


def test_checkpoint_round_trip_of_state_dict_parts(tmp_path):
    world = hpcsgd.init(device="cpu")
    assert hpcsgd.init(device="cpu") is world  # idempotent
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    strategy = hpcsgd.LocalSGD(model, opt, world, tau=2)
    sampler = hpcsgd.RedundantSampler(dataset(), world, batch_size=4)
    for x, y in torch.utils.data.DataLoader(dataset(), batch_sampler=sampler):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x.repeat(1, 4)), y % 3).backward()
        strategy.step()
    parts = {"model": model, "optimizer": opt, "sampler": sampler, "strategy": strategy}
    assert hpcsgd.load_checkpoint(tmp_path, world, parts) is None  # nothing yet
    hpcsgd.save_checkpoint(tmp_path, world, parts, step=strategy.steps)
    saved = {k: v.state_dict() for k, v in parts.items()}

    torch.manual_seed(1)
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    strategy2 = hpcsgd.LocalSGD(model2, opt2, world, tau=2)
    sampler2 = hpcsgd.RedundantSampler(dataset(), world, batch_size=4)
    parts2 = {"model": model2, "optimizer": opt2, "sampler": sampler2, "strategy": strategy2}
    assert hpcsgd.load_checkpoint(tmp_path, world, parts2) == strategy.steps
    for key, value in saved["model"].items():
        assert torch.equal(model2.state_dict()[key], value), key
    buffers = [s["momentum_buffer"] for s in opt2.state_dict()["state"].values()]
    assert buffers and all(torch.equal(a, s["momentum_buffer"]) for a, s in zip(buffers, saved["optimizer"]["state"].values()))
    assert sampler2.state_dict() == saved["sampler"] and strategy2.state_dict() == saved["strategy"]
    assert list(sampler2) == list(sampler)  # the data stream continues where it stopped
    # the model still lives in the strategy's flat buffer after loading
    assert strategy2.flat.flat.data_ptr() == next(model2.parameters()).data_ptr()
    with pytest.raises(hpcsgd.CheckpointError, match="has no part"):
        hpcsgd.load_checkpoint(tmp_path, world, {"other": model2})
