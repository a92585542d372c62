"""``balance = "speed"`` under MPI: a slowed rank gets a smaller batch by a decision every rank
takes alike (the first after a warm-up window inside the first epoch), logged in the metrics and
summary.json, kept by a resume, and a resume from a checkpoint before, right after or after a
mid-epoch change continues bit for bit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from hpcsgd.config import build_config
from hpcsgd.train.loop import Trainer

from helpers import all_ranks, make_shards

pytestmark = pytest.mark.mpi(min_size=1)

B = 16


def _config(shared_tmp, run, **overrides):
    from mpi4py import MPI

    P = MPI.COMM_WORLD.size
    data = make_shards(shared_tmp / "shards", P, partition="iid", n_train=128 * P)
    values = {
        "data": str(data), "run_dir": str(shared_tmp / run), "epochs": 4, "batch_size": B, "lr": 0.1,
        "model": "mlp", "mlp_hidden": [256, 256], "progress": "none", "eval_every": 0.0, "log_every": 2,
        "seed": 1, "algorithm": "local", "tau": 2, "balance": "speed",
        "slowdown": ["1:4"] if P > 1 else [], **overrides,
    }
    return build_config(values)


def _run(cfg):
    from mpi4py import MPI

    trainer = Trainer(cfg, MPI.COMM_WORLD)
    return trainer, MPI.COMM_WORLD.bcast(trainer.run())


def test_a_slowed_rank_gets_a_smaller_batch_the_same_on_every_rank(shared_tmp):
    from mpi4py import MPI

    comm, P = MPI.COMM_WORLD, MPI.COMM_WORLD.size
    trainer, summary = _run(_config(shared_tmp, "run"))
    balance = trainer.batches.pace.balance
    spe = trainer.schedule.steps_per_epoch
    sizes = summary["batch_per_rank"]
    agreed = (balance.sizes, balance.changes)  # (the timing window is each rank's own)
    assert all_ranks(all(other == agreed for other in comm.allgather(agreed)))  # one decision
    assert all_ranks(sizes == balance.sizes and sum(sizes) == P * B)
    assert all_ranks(summary["balance"] == "speed" and summary["average_weights"] == "samples")
    assert all_ranks(trainer.batches.sampler.batch_size == sizes[trainer.membership.rank])
    changes = summary["balance_changes"]
    # Decisions after the warm-up window (steps 1..3 of the first epoch's 8: the default, at least
    # 3 timed steps), then at the ends of epochs 2 and 3 of 4: sizes from steps 4, 16, 24.
    assert all_ranks(spe == 8 and balance.first == 3 and summary["balance_first_decision"] == 4)
    assert all_ranks(all(c["step"] in (4, 16, 24) for c in changes))
    assert all_ranks([c["step"] for c in changes] == sorted({c["step"] for c in changes}))  # at most once each
    logged = [json.loads(x) for x in trainer.metrics.path.read_text().splitlines()]
    logged = [(x["batch_per_rank_step"], x["batch_per_rank"]) for x in logged if "batch_per_rank" in x]
    assert all_ranks(logged == [(c["step"], c["batch_per_rank"]) for c in changes])
    if P == 1:
        assert all_ranks(changes == [] and sizes == [B])  # one rank: nothing to balance
    else:  # rank 1 computes at a quarter speed: it draws the least, by far, from inside the first epoch
        assert all_ranks(len(changes) >= 1 and changes[0]["step"] == 4)
        assert all_ranks(changes[0]["batch_per_rank"][1] < B)
        assert all_ranks(all(sizes[1] < b for r, b in enumerate(sizes) if r != 1))
        assert all_ranks(sizes[1] <= B // 2)


class Recording(Trainer):
    def setup(self):
        super().setup()
        self.sizes_at_start = list(self.batches.pace.balance.sizes)
        self.rank_batch_at_start = self.batches.sampler.batch_size


def test_a_resume_continues_with_the_sizes_in_effect(shared_tmp):
    from mpi4py import MPI

    comm, P = MPI.COMM_WORLD, MPI.COMM_WORLD.size
    if P == 1:
        pytest.skip("one rank: the sizes never change")
    full, summary = _run(_config(shared_tmp, "run", checkpoint_every=12, steps=0))
    spe, total = full.schedule.steps_per_epoch, full.schedule.total_steps
    saved = [s for s in range(12, total, 12)]
    last = saved[-1]
    in_effect = [B] * P
    for change in summary["balance_changes"]:
        if change["step"] <= last:
            in_effect = change["batch_per_rank"]
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(shared_tmp / "run" / "checkpoints" / f"step-{total:08d}")
    comm.Barrier()
    resumed = Recording(_config(shared_tmp, "run", checkpoint_every=12, steps=0, resume=True), comm)
    resumed.run()
    assert all_ranks(resumed.start_step == last and spe > 1)
    assert all_ranks(resumed.sizes_at_start == in_effect)
    assert all_ranks(resumed.rank_batch_at_start == in_effect[resumed.membership.rank])


class Timed(Trainer):
    """Compute times that depend on the samples only (rank 1 four times slower per sample), so that
    the decisions of a resumed run are those of the uninterrupted one, and a comparison bit for bit
    tests the draws and the state, not the machine's timing noise."""

    def setup(self):
        super().setup()
        balance, slow = self.batches.pace.balance, 4.0 if self.membership.rank == 1 else 1.0
        record = balance.record
        balance.record = lambda step, samples, seconds: record(step, samples, samples * slow * 1e-4)

    keep: tuple[int, ...] = ()  # checkpoints to copy aside (a run keeps only its newest two)

    def save(self, step):
        super().save(step)
        if step in self.keep and self.world.rank == 0:  # rank 0 returns once the checkpoint is complete
            directory = self.job.run_dir / "checkpoints" / f"step-{step:08d}"
            shutil.copytree(directory, self.job.run_dir.parent / "kept" / directory.name)


def _lines(trainer):
    keep = ("step", "loss", "consensus_distance", "batch_per_rank", "batch_per_rank_step")
    return [{k: json.loads(x).get(k) for k in keep} for x in trainer.metrics.path.read_text().splitlines()]


def test_a_resume_across_a_mid_epoch_change_is_bit_identical(shared_tmp):
    """Sizes change after step 3 (the warm-up window), inside the first epoch of 8 steps. Resumes
    from the checkpoints after steps 2 (before the decision), 4 (right after it: the checkpoint
    holds the new sizes, no step drew them yet), 6 (mid-epoch, drawn with them) and 10 (the next
    epoch) end with the uninterrupted run's model, metrics lines and changes, bit for bit."""
    from mpi4py import MPI

    comm, P = MPI.COMM_WORLD, MPI.COMM_WORLD.size
    cfg = dict(checkpoint_every=2, steps=0, slowdown=[])
    saved_at = (2, 4, 6, 10)
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(shared_tmp / "kept", ignore_errors=True)
    comm.Barrier()
    full = Timed(_config(shared_tmp, "full", **cfg), comm)
    full.keep = saved_at
    summary = comm.bcast(full.run())
    expected_flat, expected_lines = full.api.flat.flat.clone(), _lines(full)
    changes = summary["balance_changes"]
    if P == 1:
        assert all_ranks(changes == [])  # one rank: the decisions keep its size
    else:
        assert all_ranks(changes[0]["step"] == 4 and sum(changes[0]["batch_per_rank"]) == P * B)
        assert all_ranks(changes[0]["batch_per_rank"][1] < B and full.batches.sampler.batch_size
                         == changes[-1]["batch_per_rank"][comm.rank])
        assert all_ranks(any(x["batch_per_rank_step"] == 4 for x in expected_lines))  # logged with its step
    for saved in saved_at:
        run = shared_tmp / f"from-{saved}"
        comm.Barrier()
        if comm.rank == 0:  # the finished run's directory with only the checkpoint after step `saved`
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(shared_tmp / "full", run, ignore=shutil.ignore_patterns("step-*"))
            name = f"step-{saved:08d}"
            shutil.copytree(shared_tmp / "kept" / name, run / "checkpoints" / name)
        comm.Barrier()
        resumed = Timed(_config(shared_tmp, f"from-{saved}", resume=True, **cfg), comm)
        again = comm.bcast(resumed.run())
        assert all_ranks(resumed.start_step == saved)
        assert all_ranks(torch.equal(resumed.api.flat.flat, expected_flat))
        assert all_ranks(_lines(resumed) == expected_lines)
        assert all_ranks(again["balance_changes"] == changes)
        assert all_ranks(again["batch_per_rank"] == summary["batch_per_rank"])
