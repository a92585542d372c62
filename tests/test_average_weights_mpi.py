"""``average_weights = "samples"`` (ALGORITHMS.md, "Fractional and per-rank redundancy"): local SGD
and RPS with unequal per-rank batches against the single-process reference's weighted average;
with equal batches the same bits as ``"equal"``; overlapped rounds and a resume keep the weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from hpcsgd.config import build_config
from hpcsgd.train.loop import Trainer

from helpers import all_ranks, make_shards
from reference import simulate

pytestmark = pytest.mark.mpi(min_size=1)

STEPS = 12


def unequal_sizes(P: int) -> list[int]:
    """b_i per rank, all different where P > 1 (4, 8, 12, 6, 10, ...)."""
    return [4 + (4 * i) % 10 for i in range(P)]


class SizedTrainer(Trainer):
    """``hpcsgd train`` with per-rank batch sizes set through the sampler after setup, and
    set to ``later`` at step ``change_at`` (None: never; the sampler applies them from the
    next epoch on)."""

    sizes: list[int] | None = None
    later: list[int] | None = None
    change_at: int | None = None

    def setup(self) -> None:
        super().setup()
        if self.sizes is not None:
            self.batches.set_batch_sizes(self.sizes)
        if self.change_at is not None and self.start_step > self.change_at:
            self.batches.set_batch_sizes(self.later)

    def train_step(self, step: int) -> None:
        if step == self.change_at:
            self.batches.set_batch_sizes(self.later)
        super().train_step(step)


def config(shared_tmp, name, **overrides):
    from mpi4py import MPI

    data = make_shards(shared_tmp / "shards", MPI.COMM_WORLD.size, partition="label")
    values = {
        "data": str(data), "run_dir": str(shared_tmp / name), "steps": STEPS, "batch_size": 8, "lr": 0.2,
        "model": "mlp", "mlp_hidden": [16], "progress": "none", "eval_every": 0.0, "log_every": 4, "seed": 3,
        **overrides,
    }
    return build_config(values)


def run(shared_tmp, name, sizes=None, **overrides):
    """Train in-process on COMM_WORLD with per-rank ``sizes``; returns (this rank's x_i, the trainer)."""
    from mpi4py import MPI

    trainer = SizedTrainer(config(shared_tmp, name, **overrides), MPI.COMM_WORLD)
    trainer.sizes = sizes
    trainer.run()
    return trainer.api.flat.flat.detach().clone(), trainer


def reference(trainer, sizes):
    return simulate(trainer.cfg, trainer.membership.P, STEPS, batch_sizes=sizes)[trainer.membership.rank]


def close(a, b):
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


CASES = [
    pytest.param({"algorithm": "local", "tau": 3, "momentum": 0.5, "weight_decay": 1e-3}, id="local-tau3"),
    pytest.param({"algorithm": "local", "tau": 2, "q": 2}, id="local-q2"),
    pytest.param({"algorithm": "rps", "tau": 2, "drop_rate": 0.3, "momentum": 0.5}, id="rps-drop0.3"),
    pytest.param({"algorithm": "rps", "tau": 1, "drop_rate": 0.0}, id="rps-lossless"),
    pytest.param({"algorithm": "local", "tau": 2, "overlap_rounds": True}, id="local-overlap"),
    pytest.param({"algorithm": "rps", "tau": 2, "drop_rate": 0.3, "overlap_rounds": True}, id="rps-overlap"),
]


@pytest.mark.parametrize("flags", CASES)
def test_samples_weights_equal_the_weighted_reference(shared_tmp, flags):
    """Unequal b_i: every averaging weighs rank i by the samples it drew since the last round
    (RPS: per block over the ranks whose block arrived), as the reference does literally; and
    the result is not the equal-weight one (the weights matter)."""
    from mpi4py import MPI

    P = MPI.COMM_WORLD.size
    if flags.get("q", 1) > P:
        pytest.skip("q > P")
    sizes = unequal_sizes(P)
    x, trainer = run(shared_tmp, "samples", sizes, average_weights="samples", **flags)
    assert all_ranks(trainer.batches.sampler.batch_size == sizes[MPI.COMM_WORLD.rank])
    assert all_ranks(close(x, reference(trainer, sizes)))
    if P > 1:
        equal_cfg = config(shared_tmp, "eq-ref", average_weights="equal", **flags)
        equal = simulate(equal_cfg, P, STEPS, batch_sizes=sizes)[MPI.COMM_WORLD.rank]
        assert all_ranks(not close(x, equal))


@pytest.mark.parametrize("flags", CASES)
def test_samples_with_equal_batches_is_equal_bit_for_bit(shared_tmp, flags):
    from mpi4py import MPI

    if flags.get("q", 1) > MPI.COMM_WORLD.size:
        pytest.skip("q > P")
    x_samples, t_samples = run(shared_tmp, "samples", average_weights="samples", **flags)
    x_equal, t_equal = run(shared_tmp, "equal", average_weights="equal", **flags)
    assert all_ranks(torch.equal(x_samples, x_equal))
    assert all_ranks(t_samples.api.counters.as_dict() == t_equal.api.counters.as_dict())


def _lines(trainer):
    keep = ("step", "loss", "consensus_distance", "rounds")
    return [{k: json.loads(x)[k] for k in keep} for x in trainer.metrics.path.read_text().splitlines()]


@pytest.mark.parametrize("overlap", [False, True])
def test_resume_keeps_the_samples_since_the_last_round(shared_tmp, overlap):
    """tau 3, a checkpoint after step 16 (one step into a period), new batch sizes set at step
    16 (pending until the next epoch: the checkpoint holds them): the round after step 17
    weighs step 15's draws with steps 16-17's, so a resume that lost the count since the last
    round would leave another model. It continues bit for bit."""
    from mpi4py import MPI

    comm, P = MPI.COMM_WORLD, MPI.COMM_WORLD.size
    flags = {"algorithm": "rps", "drop_rate": 0.2, "tau": 3, "steps": 24, "checkpoint_every": 8, "log_every": 2,
             "average_weights": "samples", "overlap_rounds": overlap}

    def trainer_for(**extra):
        t = SizedTrainer(config(shared_tmp, "run", **flags, **extra), comm)
        t.sizes, t.later, t.change_at = unequal_sizes(P), unequal_sizes(P)[::-1], 16
        return t

    full = trainer_for()
    full.run()
    assert all_ranks(full.api.samples_since_round == 0)  # the last step ended a round
    expected_flat, expected = full.api.flat.flat.clone(), _lines(full)
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(shared_tmp / "run" / "checkpoints" / "step-00000024")
    comm.Barrier()
    resumed = trainer_for(resume=True)
    resumed.run()
    assert all_ranks(resumed.start_step == 16)
    assert all_ranks(torch.equal(resumed.api.flat.flat, expected_flat))
    assert all_ranks(_lines(resumed) == expected)


def test_samples_needs_the_step_sample_count():
    """The public API: average_weights is checked at construction, and under "samples" a step
    without ``samples=`` is refused, naming what is missing."""
    from mpi4py import MPI

    import hpcsgd
    from hpcsgd.errors import ConfigError

    world = hpcsgd.init(MPI.COMM_WORLD)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="average_weights must be one of equal, samples"):
        hpcsgd.LocalSGD(model, opt, world, tau=2, average_weights="size")
    strategy = hpcsgd.RPS(model, opt, world, tau=2, average_weights="samples")
    model(torch.ones(4, 3)).sum().backward()
    with pytest.raises(ConfigError, match=r"step\(samples=...\)"):
        strategy.step()
    with pytest.raises(ConfigError, match=r"step\(samples=...\)"):
        strategy.step(samples=-1)
    strategy.step(samples=4)
    assert strategy.state_dict()["samples_since_round"] == 4
    strategy.close()
