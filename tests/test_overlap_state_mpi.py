"""Overlapped rounds as part of the training state (ALGORITHMS.md, "Overlapped rounds"): a
checkpoint saves the round in flight instead of applying it early, a resume applies it at the
same step, and whatever touches the model between steps waits for the round's snapshot, under
a worker thread slowed on purpose, evaluation every step and a failure."""

from __future__ import annotations

import json
import time

import pytest
import torch

from hpcsgd.algorithms.overlap import RoundInFlight
from hpcsgd.comm.watchdog import WATCHDOG
from hpcsgd.config import build_config
from hpcsgd.data import read_index
from hpcsgd.train.evaluation import Evaluator
from hpcsgd.train.schedule import Schedule
from hpcsgd.train.stop import StopSignal
from hpcsgd.algorithms import Strategy
from hpcsgd.train.loop import Trainer
from hpcsgd.train.resume import Preempted

from helpers import all_ranks, make_shards

pytestmark = pytest.mark.mpi(min_size=1)

FLAGS = {"local": {"algorithm": "local"}, "rps": {"algorithm": "rps", "drop_rate": 0.3}}


def _config(tmp, run, **overrides):
    from mpi4py import MPI

    data = make_shards(tmp / "shards", MPI.COMM_WORLD.size, partition="label")
    values = {
        "data": str(data), "run_dir": str(tmp / run), "steps": 24, "batch_size": 8, "lr": 0.2,
        "momentum": 0.5, "model": "mlp", "mlp_hidden": [16], "progress": "none", "eval_every": 0.0,
        "log_every": 2, "checkpoint_every": 0, "seed": 5, "tau": 2, "overlap_rounds": True, **overrides,
    }
    return build_config(values)


def _run(cfg):
    from mpi4py import MPI

    trainer = Trainer(cfg, MPI.COMM_WORLD)
    summary = MPI.COMM_WORLD.bcast(trainer.run())
    return trainer, summary


def _lines(trainer, keep=("step", "loss", "consensus_distance", "bytes_sent", "rounds")):
    lines = [json.loads(x) for x in trainer.metrics.path.read_text().splitlines()]
    return [{k: line.get(k) for k in keep} for line in lines]


@pytest.mark.parametrize("name", ["local", "rps"])
def test_checkpoints_leave_an_overlapped_trajectory_as_it_is(shared_tmp, name, monkeypatch):
    """tau 2, momentum 0.5, 24 steps: the same train loss, model and metrics bit for bit with
    a checkpoint every 3 steps (those after steps 6, 12, 18 with a round in flight) as without."""
    plain, plain_summary = _run(_config(shared_tmp, f"{name}-plain", **FLAGS[name]))
    saved_rounds = []
    state_dict = Strategy.state_dict

    def recording(self):
        state = state_dict(self)
        saved_rounds.append((state["steps"], state["round_in_flight"] is not None))
        return state

    monkeypatch.setattr(Strategy, "state_dict", recording)
    saved, saved_summary = _run(_config(shared_tmp, f"{name}-ckpt", checkpoint_every=3, **FLAGS[name]))
    monkeypatch.undo()
    expected = [(done, done % 6 == 0 and done < 24) for done in range(3, 25, 3)]
    assert all_ranks(saved_rounds == expected), saved_rounds
    assert all_ranks(torch.equal(plain.api.flat.flat, saved.api.flat.flat))
    assert all_ranks(plain_summary["train_loss"] == saved_summary["train_loss"])
    assert all_ranks(_lines(plain) == _lines(saved))


@pytest.mark.parametrize("name", ["local", "rps"])
def test_a_preempted_overlapped_run_resumes_into_the_uninterrupted_one(shared_tmp, name, monkeypatch):
    """A stop signal after step 10 (a round in flight): checkpoint, Preempted; the resumed run
    applies the saved round after step 11 and ends where the uninterrupted run ends."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    full, full_summary = _run(_config(shared_tmp, f"{name}-full", **FLAGS[name]))
    asked = StopSignal.requested
    monkeypatch.setattr(StopSignal, "requested", lambda self, coll: asked(self, coll) or WATCHDOG.step == 10)
    cut = Trainer(_config(shared_tmp, f"{name}-cut", **FLAGS[name]), comm)
    with pytest.raises(Preempted):
        cut.run()
    monkeypatch.setattr(StopSignal, "requested", asked)
    assert all_ranks(cut.api._in_flight.pending)  # the round was saved, not applied
    resumed, resumed_summary = _run(_config(shared_tmp, f"{name}-cut", resume=True, **FLAGS[name]))
    assert all_ranks(resumed.start_step == 10)
    assert all_ranks(torch.equal(full.api.flat.flat, resumed.api.flat.flat))
    assert all_ranks(full_summary["train_loss"] == resumed_summary["train_loss"])
    assert all_ranks(_lines(full) == _lines(resumed))
    cut.api.close()


def _every_step(tmp, run, **overrides):
    """A config that logs and evaluates after every step."""
    from mpi4py import MPI

    cfg = _config(tmp, run, **overrides)
    spe = Schedule.from_config(cfg, read_index(cfg.data).train_size, MPI.COMM_WORLD.size).steps_per_epoch
    return _config(tmp, run, eval_every=1.0 / spe, log_every=1, **overrides)


@pytest.mark.parametrize("name", ["local", "rps"])
def test_evaluation_every_step_waits_for_a_slowed_snapshot(shared_tmp, name, monkeypatch):
    """The worker thread takes its snapshot late (0.5 s after the round starts), when the
    evaluation of the averaged model (slowed to 0.2 s per pass: own test, own train, then the
    averaged model's) has written the mean into the model: the run must equal the one without
    the slowdowns, and the one without evaluation, bit for bit; with a failure as well."""
    from mpi4py import MPI

    P = MPI.COMM_WORLD.size
    fail = {"fail": [f"{P - 1}@7"]} if P > 1 else {}
    flags = {**FLAGS[name], "steps": 12, **fail}
    quiet, _ = _run(_config(shared_tmp, f"{name}-quiet", **flags))
    fast, fast_summary = _run(_every_step(shared_tmp, f"{name}-fast", **flags))
    take, sums = RoundInFlight._take_snapshot, Evaluator.sums

    def late_snapshot(self, x):
        time.sleep(0.5)
        take(self, x)

    def slow_sums(self, x, y):
        time.sleep(0.2)
        return sums(self, x, y)

    monkeypatch.setattr(RoundInFlight, "_take_snapshot", late_snapshot)
    monkeypatch.setattr(Evaluator, "sums", slow_sums)
    slow, slow_summary = _run(_every_step(shared_tmp, f"{name}-slow", **flags))
    monkeypatch.undo()
    alive = slow.membership.rank in slow.membership.live
    assert all_ranks(not alive or torch.equal(fast.api.flat.flat, slow.api.flat.flat))
    assert all_ranks(not alive or torch.equal(quiet.api.flat.flat, slow.api.flat.flat))
    keep = ("step", "loss", "consensus_distance", "avg_test_loss", "test_loss", "live_ranks")
    assert all_ranks(_lines(fast, keep) == _lines(slow, keep))
    assert all_ranks(fast_summary["train_loss"] == slow_summary["train_loss"])
    assert all_ranks(any(line["avg_test_loss"] is not None for line in _lines(slow, keep)))
