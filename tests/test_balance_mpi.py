"""``balance = "speed"`` under MPI: a slowed rank gets a smaller batch by a decision every rank
takes alike, logged in the metrics and summary.json, kept by a resume."""

from __future__ import annotations

import json
import shutil

import pytest

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
    assert all_ranks(all(c["step"] % spe == 0 and 0 < c["step"] < trainer.schedule.total_steps for c in changes))
    assert all_ranks(len(changes) <= 3)  # at most once per epoch, after epochs 1..3 of 4
    logged = [json.loads(x) for x in trainer.metrics.path.read_text().splitlines()]
    logged = [(x["batch_per_rank_step"], x["batch_per_rank"]) for x in logged if "batch_per_rank" in x]
    assert all_ranks(logged == [(c["step"], c["batch_per_rank"]) for c in changes])
    if P == 1:
        assert all_ranks(changes == [] and sizes == [B])  # one rank: nothing to balance
    else:  # rank 1 computes at a quarter speed: it draws the least, by far
        assert all_ranks(len(changes) >= 1)
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
