"""Fractional and per-rank redundancy in `hpcsgd train`'s trainer, under MPI (any P): the drawn
per-rank redundancies agree on every rank and survive a resume bit for bit, each rank draws
``b + n_t`` from its own chunk and its subset of the next, coverage after a failure is the
closed form in samples, and per-rank batch sizes keep one epoch length."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from hpcsgd.config import build_config
from hpcsgd.data.fractional import Redundancy, partial_draws
from hpcsgd.train.loop import Trainer

from helpers import all_ranks, make_shards

pytestmark = pytest.mark.mpi(min_size=1)


def _config(shared_tmp, run, **overrides):
    from mpi4py import MPI

    data = make_shards(shared_tmp / "shards", MPI.COMM_WORLD.size, partition="label")
    values = {
        "data": str(data), "run_dir": str(shared_tmp / run), "steps": 24, "batch_size": 8, "lr": 0.2,
        "model": "mlp", "mlp_hidden": [16], "progress": "none", "eval_every": 0.0, "log_every": 2,
        "checkpoint_every": 8, "seed": 5, "algorithm": "local", "tau": 2, **overrides,
    }
    return build_config(values)


def _losses(trainer):
    lines = trainer.metrics.path.read_text().splitlines()
    return [{k: json.loads(x)[k] for k in ("step", "loss", "consensus_distance", "coverage")} for x in lines]


def test_drawn_per_rank_redundancy_agrees_on_every_rank_and_resumes_bit_for_bit(shared_tmp):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    mu = min(0.5, comm.size - 1)
    settings = {"redundancy": mu, "redundancy_spread": min(0.3, comm.size - 1)}  # sigma <= P - 1
    full = Trainer(_config(shared_tmp, "run", **settings), comm)
    full.run()
    drawn = full.batches.sampler.redundancy_per_rank
    assert all_ranks(len(set(comm.allgather(drawn))) == 1)
    assert all_ranks(abs(sum(drawn) / len(drawn) - mu) < 1e-9 and all(0 <= m <= comm.size - 1 for m in drawn))
    summary = json.loads((shared_tmp / "run" / "summary.json").read_text())
    assert all_ranks(summary["redundancy_per_rank"] == list(drawn) and summary["objective"] == "batch mean")
    expected, expected_flat = _losses(full), full.api.flat.flat.clone()

    comm.Barrier()
    if comm.rank == 0:  # as if the job had died after the step-16 checkpoint
        shutil.rmtree(shared_tmp / "run" / "checkpoints" / "step-00000024")
    comm.Barrier()
    resumed = Trainer(_config(shared_tmp, "run", resume=True, **settings), comm)
    resumed.run()
    assert all_ranks(resumed.start_step == 16)
    assert all_ranks(resumed.batches.sampler.redundancy_per_rank == drawn)
    assert all_ranks(torch.equal(resumed.api.flat.flat, expected_flat))
    assert all_ranks(_losses(resumed) == expected)


def test_mu_half_draws_b_plus_n_t_and_coverage_after_a_failure_is_the_closed_form(shared_tmp):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    P = comm.size
    if P < 2:
        pytest.skip("mu = 0.5 needs P >= 2 (mu <= P - 1)")
    fail = {"fail": ["1@6"]}
    t = Trainer(_config(shared_tmp, "run", redundancy=0.5, batch_size=5, checkpoint_every=0, **fail), comm)
    t.setup()
    sampler = t.batches.sampler
    sizes = [sum(len(idx) for _, idx in sampler.next_chunk_batch()) for _ in range(6)]
    f = sampler.redundancy.holding(sampler.rank).fraction
    assert all_ranks(sizes == [5 + partial_draws(s, 5, f) for s in range(6)] == [7, 8, 7, 8, 7, 8][:6])
    comm.Barrier()
    t = Trainer(_config(shared_tmp, "run2", redundancy=0.5, batch_size=5, checkpoint_every=0, **fail), comm)
    t.run()
    chunks = t.job.index.chunk_sizes
    n1 = chunks[1]
    # rank 1 gone: its chunk survives only as rank 0's half of it
    closed = (sum(chunks) - n1 + round(n1 / 2)) / sum(chunks)
    assert all_ranks(t.membership.coverage() == closed)
    assert all_ranks(Redundancy((0.5,) * P, tuple(chunks)).partly_covered([0], []) == round(chunks[1] / 2))
    if comm.rank != 1:
        last = _losses(t)[-1]
        assert last["coverage"] == closed


def test_per_rank_batch_sizes_keep_one_epoch_length_on_every_rank(shared_tmp):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    P = comm.size
    sizes = [4 + 2 * r for r in range(P)]
    t = Trainer(_config(shared_tmp, "run", batch_size=sizes, checkpoint_every=0, steps=0, epochs=1), comm)
    t.setup()
    s = t.batches.sampler
    assert all_ranks(len(set(comm.allgather(len(s)))) == 1 and len(s) == t.schedule.steps_per_epoch)
    assert all_ranks(len(s.next_chunk_batch()[0][1]) == sizes[comm.rank] and s.loss_weights is None)
    comm.Barrier()
    t = Trainer(_config(shared_tmp, "run2", batch_size=sizes, checkpoint_every=0, steps=0, epochs=1), comm)
    t.run()
    summary = json.loads((shared_tmp / "run2" / "summary.json").read_text())
    assert all_ranks(summary["batch_per_rank"] == sizes and summary["steps"] == len(s))
