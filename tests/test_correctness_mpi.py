"""Corner cases of the strategies against ALGORITHMS.md: skipped steps, BatchNorm buffers,
counters, failures and settings that do nothing. Rank-encoded inputs, closed forms."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from hpcsgd.comm import Collectives, LinkRates
from hpcsgd.config import build_config
from hpcsgd.optim import ScalingSGD
from hpcsgd.algorithms.registry import REGISTRY
from hpcsgd.train.loop import Trainer
from hpcsgd.world import World

from helpers import all_ranks, make_shards
from reference import blockwise_average

pytestmark = pytest.mark.mpi(min_size=1)

LR = 0.5


def _one_step(algorithm: str, skipping: set[int], drop_rate: float = 0.0):
    """One step of ``algorithm`` on COMM_WORLD with rank-encoded models; ranks in ``skipping``
    had a non-finite loss. Returns (this rank's x after the step, every rank's x and g before)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.rank, comm.size
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))  # parameters and floating buffers
    optimizer = ScalingSGD(model.parameters(), lr=LR)
    rates = LinkRates.build(size, drop_rate)
    spec = REGISTRY[algorithm]
    lossy = {"rates": rates, "seed": 5} if spec.lossy else {}
    tau = {"tau": 1} if spec.uses_tau else {}
    world = World(comm, rank, size, 0, 1, torch.device("cpu"), tuple(range(size)))
    strategy = spec.cls(model, optimizer, world, collectives=Collectives(comm), **tau, **lossy)
    flat = strategy.flat  # the strategy's flat buffer: parameters and floating buffers
    base = torch.arange(flat.numel, dtype=torch.float32) / 4
    flat.flat.copy_(base + rank)  # x_i = x_0 + i, buffers included (after the strategy's broadcast)
    grads = [torch.full((flat.n_params,), float(r + 1)) for r in range(size)]  # g_i = i + 1
    flat.zero_grad()
    if rank not in skipping:  # a skipping rank ran no backward: no gradient (zeros)
        for p, lo, hi in zip(flat.parameters, flat.param_offsets, flat.param_offsets[1:]):
            if flat.grad is None:
                p.grad = grads[rank][lo:hi].view_as(p).clone()
            else:
                p.grad.copy_(grads[rank][lo:hi].view_as(p))
    strategy.set_contributors(np.array([r not in skipping for r in range(size)]))
    strategy.step()  # reduce_gradients, optimizer_step and after_step of step 0
    strategy.close()
    before = [base + r for r in range(size)]
    return flat, before, grads


def _expected_model_average(flat, before, grads, skipping, algorithm, drop_rate):
    """Local SGD / RPS: every rank steps on its own gradient unless it skipped, then the models
    (skippers' current ones included) are averaged: plainly, or block-wise by the masks."""
    n = flat.n_params
    stepped = []
    for r, (x, g) in enumerate(zip(before, grads)):
        x = x.clone()
        if r not in skipping:
            x[:n] -= LR * g
        stepped.append(x)
    if algorithm == "local" or drop_rate == 0:
        mean = sum(stepped) / len(stepped)
        return [mean] * len(stepped)
    blockwise_average(stepped, 5, 0, LinkRates.build(len(stepped), drop_rate))
    return stepped


def _expected_gradient_average(flat, before, grads, skipping):
    """Sync: the mean gradient over the ranks that contributed, applied by every rank;
    floating buffers averaged over the contributors too."""
    n = flat.n_params
    live = [r for r in range(len(before)) if r not in skipping]
    out = []
    for x in before:
        x = x.clone()
        if live:
            x[:n] -= LR * sum(grads[r] for r in live) / len(live)
            x[n:] = sum(before[r][n:] for r in live) / len(live)
        out.append(x)
    return out


@pytest.mark.parametrize(
    "algorithm,drop_rate",
    [("local", 0.0), ("rps", 0.0), ("rps", 0.4), ("sync", 0.0), ("lossy-allreduce", 0.0)],
)
def test_skipped_step_leaves_every_rank_at_the_formulas_value(algorithm, drop_rate):
    """nan_policy = skip (ALGORITHMS.md, "Non-finite steps"): rank 1 skips; afterwards every
    rank holds what the formula gives for the ranks' actual inputs. Before the fix, local SGD
    mixed a mean with pre-scaled sums (2.2424 where 1.4957 was due) and sync's skipper parted."""
    from mpi4py import MPI

    size = MPI.COMM_WORLD.size
    for skipping in ({1 % size}, set(), set(range(size))):
        flat, before, grads = _one_step(algorithm, skipping, drop_rate)
        if algorithm in ("local", "rps"):
            expected = _expected_model_average(flat, before, grads, skipping, algorithm, drop_rate)
        else:
            expected = _expected_gradient_average(flat, before, grads, skipping)
        mine = expected[MPI.COMM_WORLD.rank]
        assert all_ranks(torch.allclose(flat.flat, mine, rtol=1e-6, atol=1e-6)), (skipping, flat.flat, mine)


def _config(tmp, name, **overrides):
    from mpi4py import MPI

    data = overrides.pop("data", None) or make_shards(tmp / "shards", MPI.COMM_WORLD.size, partition="label")
    values = {
        "data": str(data), "run_dir": str(tmp / name), "steps": 12, "batch_size": 8, "lr": 0.1,
        "model": "mlp", "mlp_hidden": [16], "progress": "none", "eval_every": 0.0, "log_every": 1,
        "seed": 3, **overrides,
    }
    return build_config(values)


def _run(cfg):
    from mpi4py import MPI

    trainer = Trainer(cfg, MPI.COMM_WORLD)
    summary = trainer.run()
    return trainer, MPI.COMM_WORLD.bcast(summary)


def _records(trainer):
    return [json.loads(line) for line in trainer.metrics.path.read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ["sync", "lossy-allreduce"])
def test_sync_keeps_batchnorm_replicas_identical(shared_tmp, algorithm):
    """ResNet-20 on label shards: BatchNorm statistics are averaged with the gradients every
    step, so the replicas stay identical (consensus distance exactly 0; was 1.25 -> 5.27)."""
    from mpi4py import MPI

    data = make_shards(
        shared_tmp / "img", MPI.COMM_WORLD.size, partition="label", features=3 * 8 * 8, input_shape=(3, 8, 8)
    )
    cfg = _config(shared_tmp, "bn", data=data, algorithm=algorithm, model="resnet20", steps=4, batch_size=4)
    trainer, summary = _run(cfg)
    flats = MPI.COMM_WORLD.allgather(trainer.api.flat.flat)
    assert trainer.api.flat.n_buffers > 0
    assert all_ranks(all(torch.equal(flats[0], f) for f in flats))
    assert all_ranks(all(r["consensus_distance"] == 0.0 for r in _records(trainer)))
    assert all_ranks(summary["consensus_distance"] == 0.0)
    # The averaged model is every rank's model: the two train losses agree.
    assert all_ranks(summary["train_loss"] == pytest.approx(summary["train_loss_rank_mean"], rel=1e-6))


def test_momentum_averaging_is_no_round_of_its_own(shared_tmp):
    """tau 4, 12 steps: 3 rounds with or without averaged momentum (it used to report 6)."""
    for algorithm in ("local", "rps"):
        cfg = _config(shared_tmp, algorithm, algorithm=algorithm, tau=4, momentum=0.9, average_optimizer_state=True,
                      drop_rate=0.3 if algorithm == "rps" else 0.0)
        trainer, summary = _run(cfg)
        assert all_ranks(summary["rounds"] == 3 and trainer.api.coll.counters.rounds == 3)


def test_rps_momentum_goes_through_the_loss_layer(shared_tmp):
    """Averaged momentum rides in the model's messages: the same drops, counted as bytes."""
    from mpi4py import MPI

    if MPI.COMM_WORLD.size == 1:
        pytest.skip("needs 2 ranks to drop anything")
    flags = dict(algorithm="rps", tau=2, momentum=0.9, drop_rate=0.3)
    plain, _ = _run(_config(shared_tmp, "plain", **flags))
    with_momentum, _ = _run(_config(shared_tmp, "mom", average_optimizer_state=True, **flags))
    a, b = plain.api.counters, with_momentum.api.counters
    assert all_ranks(b.bytes_saved > a.bytes_saved and b.bytes_sent > a.bytes_sent)
    assert all_ranks(b.messages_dropped == 2 * a.messages_dropped and b.rounds == a.rounds)


@pytest.mark.mpi(min_size=2)
def test_summary_traffic_includes_ranks_that_failed(shared_tmp):
    """bytes_sent and arrival in summary.json = the sums over every rank's last metrics line."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    last = comm.size - 1
    cfg = _config(shared_tmp, "fail", algorithm="rps", drop_rate=0.2, fail=[f"{last}@6"])
    trainer, summary = _run(cfg)
    final = comm.allgather(_records(trainer)[-1])
    assert all_ranks(summary["bytes_sent"] == sum(r["bytes_sent"] for r in final))
    assert all_ranks(summary["bytes_saved"] == sum(r["bytes_saved"] for r in final))
    sent = sum(r["messages_sent"] for r in final)
    dropped = sum(r["messages_dropped"] for r in final)
    assert all_ranks(summary["arrival_realised"] == pytest.approx(sent / (sent + dropped)))


def test_skipped_steps_are_counted(shared_tmp):
    from mpi4py import MPI

    cfg = _config(shared_tmp, "nan", algorithm="local", tau=2, lr=1e30, nan_policy="skip")
    trainer, summary = _run(cfg)
    mine = _records(trainer)[-1]["skipped_steps"]
    assert all_ranks(mine >= 10)  # lr 1e30 blows the model up at the first step
    assert all_ranks(summary["skipped_steps"] == MPI.COMM_WORLD.allreduce(mine))


def test_pointless_settings_record_their_effective_values(shared_tmp):
    """drop_rate under sync is recorded as 0; a failure after the last step never happens."""
    from mpi4py import MPI

    last = MPI.COMM_WORLD.size - 1
    cfg = _config(shared_tmp, "noop", algorithm="sync", drop_rate=0.3, fail=[f"{last}@500"] if last else [])
    trainer, summary = _run(cfg)
    assert all_ranks(summary["drop_rate"] == 0.0 and summary["failures"] == {})
    assert all_ranks(summary["live_ranks"] == MPI.COMM_WORLD.size)


def test_gradient_diversity_logs_both_measures(shared_tmp):
    cfg = _config(shared_tmp, "div", algorithm="local", tau=2, grad_diversity=True, log_every=4)
    trainer, summary = _run(cfg)
    records = _records(trainer)
    assert all_ranks(all(r["grad_diversity_intra"] >= 1.0 - 1e-6 for r in records))
    assert all_ranks(all(r["grad_diversity_inter"] > 0 for r in records))
    intra = np.mean([r["grad_diversity_intra"] for r in records])
    from mpi4py import MPI

    expected = MPI.COMM_WORLD.allreduce(intra) / MPI.COMM_WORLD.size
    assert all_ranks(summary["grad_diversity_intra"] == pytest.approx(expected))
    assert all_ranks(summary["grad_diversity_inter"] == pytest.approx(np.mean([r["grad_diversity_inter"] for r in records])))


def test_size_weighting_on_uneven_chunks_draws_and_weighs_by_size(shared_tmp):
    """dirichlet shards: each held chunk gives draws in proportion to its size, the loss is
    the weighted sum; uniform draws b everywhere and, with equal weights, the plain mean."""
    from mpi4py import MPI

    from hpcsgd.data import draws_per_step, read_index

    size = MPI.COMM_WORLD.size
    data = make_shards(shared_tmp / "dir", size, partition="dirichlet:0.3", n_train=400)
    sizes = read_index(data).chunk_sizes
    trainer, _ = _run(_config(shared_tmp, "size", data=data, algorithm="local", tau=2, chunk_weighting="size"))
    expected = draws_per_step(8, sizes, "size")
    assert all_ranks(trainer.batches.sampler.batch_per_chunk == {c: expected[c] for c in trainer.batches.sampler.held_chunks})
    uniform, _ = _run(_config(shared_tmp, "uni", data=data, algorithm="local", tau=2, chunk_weighting="uniform"))
    assert all_ranks(uniform.batches.weight_vector is None and uniform.batches.sampler.local_batch_size == 8)
    if len(set(sizes)) > 1:
        assert all_ranks(trainer.batches.weight_vector is not None or len(trainer.batches.sampler.held_chunks) == 1)


@pytest.mark.mpi(min_size=2)
def test_coverage_counts_samples_on_unequal_chunks(shared_tmp):
    """dirichlet shards, q = 1, rank 0 fails: coverage = 1 - |C_0| / N in the survivors'
    metrics and in summary.json (ALGORITHMS.md, "Data": the fraction of samples held)."""
    from mpi4py import MPI

    from hpcsgd.data import read_index

    comm = MPI.COMM_WORLD
    data = make_shards(shared_tmp / "dir", comm.size, partition="dirichlet:0.3", n_train=400)
    sizes = read_index(data).chunk_sizes
    assert all_ranks(len(set(sizes)) > 1 and sizes[0] * comm.size != sum(sizes))  # not the chunk fraction
    trainer = Trainer(_config(shared_tmp, "cov", data=data, algorithm="local", tau=2, q=1, fail=["0@6"]), comm)
    summaries = [s for s in comm.allgather(trainer.run()) if s is not None]  # the first live rank's
    summary = summaries[0]
    expected = 1 - sizes[0] / sum(sizes)
    on_disk = json.loads((shared_tmp / "cov" / "summary.json").read_text())
    assert all_ranks(summary["coverage"] == pytest.approx(expected, abs=1e-12) and on_disk["coverage"] == summary["coverage"])
    records = _records(trainer)
    assert all_ranks(records[0]["coverage"] == 1.0)
    assert all_ranks(comm.rank == 0 or records[-1]["coverage"] == pytest.approx(expected, abs=1e-12))
