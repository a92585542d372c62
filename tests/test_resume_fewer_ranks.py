"""A requeued job with a node gone: resume a 4-rank run on fewer ranks from its checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest

from hpcsgd.data import load_chunk, read_index

from helpers import synthetic_shards
from launch import mpi

pytestmark = pytest.mark.slow

FLAGS = ["--steps", "120", "--checkpoint-every", "60", "--batch-size", "8", "--mlp-hidden", "32", "--algorithm",
         "local", "--tau", "4", "--lr", "0.2", "--momentum", "0.9", "--log-every", "5", "--eval-every", "0",
         "--progress", "none", "--seed", "3"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory.mktemp("resize") / "shards", 4, "label", n_train=512, n_test=256,
                            num_classes=8, features=12)


def _train(n, shards, run, *flags):
    result = mpi(n, "train", "--data", shards, "--run-dir", run, *FLAGS, *map(str, flags), timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def _stopped_at_60(shards, run, *flags):
    """A 4-rank run whose newest checkpoint is step 60, as if the job had died after it."""
    _train(4, shards, run, *flags)
    shutil.rmtree(run / "checkpoints" / "step-00000120")
    (run / "summary.json").unlink()


def _cut_back_to_60(reference, run):
    """:func:`_stopped_at_60` of a run already trained with the same flags: a copy of it cut back.

    The tests that compare a resumed job with the uninterrupted run trained that same 4-rank
    job twice (once to keep, once to cut back); the run is a pure function of its flags (what
    they assert bit for bit), so a copy is that second run without a second launch. A run
    directory's path is no part of its checkpoints' config (trajectory.NOT_TRAJECTORY).
    """
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints" / "step-00000120")
    (run / "summary.json").unlink()


def _records(run, rank):
    keep = ("step", "loss", "consensus_distance", "live_ranks", "coverage", "rounds")
    lines = (run / "metrics" / f"rank-{rank}.jsonl").read_text().splitlines()
    return [{k: r[k] for k in keep} for r in map(json.loads, lines)]


def _summary(run):
    return json.loads((run / "summary.json").read_text())


def test_resume_on_3_of_4_ranks_equals_rank_3_leaving_at_the_checkpoint(shards, tmp_path):
    """q=2: rank 3's chunks are still held, so nothing is re-assigned, and the resumed job
    follows bit for bit the uninterrupted run in which rank 3 fails at step 60 (re-weighted:
    the resumed job must re-weight at start, the uninterrupted one does so at the failure)."""
    flags = ("--q", 2, "--fail", "3@60", "--reweight")
    reference = tmp_path / "reference"
    _train(4, shards, reference, *flags)
    run = tmp_path / "run"
    _cut_back_to_60(reference, run)  # the same job as the reference, stopped after step 60
    resumed = _train(3, shards, run, *flags, "--resume")
    assert "departed" not in resumed.stderr  # rank 3 was scheduled to fail there: no re-assignment
    for rank in range(3):
        assert _records(run, rank) == _records(reference, rank)
    a, b = _summary(run), _summary(reference)
    assert (a["train_loss"], a["test_accuracy"], a["rounds"]) == (b["train_loss"], b["test_accuracy"], b["rounds"])
    assert a["world_size"] == 3 and b["world_size"] == 4 and a["live_ranks"] == b["live_ranks"] == 3


def test_resume_on_fewer_ranks_reassigns_orphaned_chunks_and_says_so(shards, tmp_path):
    """q=1: rank 3's chunk has no other holder; the resumed job reads it from the same
    shards on a survivor, keeps coverage at 100%, and keeps learning its classes."""
    run = tmp_path / "run"
    _stopped_at_60(shards, run, "--q", 1)
    resumed = _train(3, shards, run, "--q", 1, "--resume")
    assert "resuming a run of 4 ranks on 3 processes at step 60" in resumed.stderr
    assert "chunk 3 -> rank 0" in resumed.stderr and "coverage 100%" in resumed.stderr
    s = _summary(run)
    assert s["departed"] == [3] and s["adopted_chunks"] == {"3": 0}
    assert s["coverage"] == 1.0 and s["live_ranks"] == 3 and s["world_size"] == 3
    assert s["chunk_holders"] == {"0": 1, "1": 1, "2": 1, "3": 1}
    assert _records(run, 0)[-1]["coverage"] == 1.0

    # The same departure as a crash-stop failure (no re-reading of shards) loses chunk 3.
    failed = tmp_path / "failed"
    _train(4, shards, failed, "--q", 1, "--fail", "3@60")
    lost = sorted({int(k) for k in load_chunk(read_index(shards), 3)[1]})
    acc = lambda s: sum(s["per_class_accuracy"][k] for k in lost) / len(lost)  # noqa: E731
    assert _summary(failed)["coverage"] == 0.75
    assert acc(s) > acc(_summary(failed)) + 0.2, (acc(s), acc(_summary(failed)))

    # Requeued again with 4 processes: the checkpoint has 3 live ranks, so the spare one
    # exits, the adoption sticks, and the result equals the 3-process continuation.
    shutil.rmtree(run / "checkpoints" / "step-00000120")
    three = _summary(run)
    (run / "summary.json").unlink()
    again = _train(3, shards, run, "--q", 1, "--resume", "--checkpoint-every", 30)  # writes step 90
    assert _summary(run)["train_loss"] == three["train_loss"]
    shutil.rmtree(run / "checkpoints" / "step-00000120")
    (run / "summary.json").unlink()
    again = _train(4, shards, run, "--q", 1, "--resume")
    assert "at step 90" in again.stderr and "1 spare process(es) exit" in again.stderr
    assert _summary(run)["train_loss"] == three["train_loss"]
    assert _summary(run)["adopted_chunks"] == {"3": 0}


def test_roles_on_fewer_ranks_skip_a_rank_due_to_fail_at_the_resume_step():
    """Faults {0: 60}, resumed on 3 ranks at step 60: rank 0 leaves at once, so the processes
    play 1, 2, 3 and none departs (was: roles 0, 1, 2, rank 3 departed, 2 ranks training)."""
    from hpcsgd.train.membership import Membership

    resume = {"step": 60, "live_world": [0, 1, 2, 3], "adopted": {}, "dir": "step-00000060"}
    plans = [Membership.assign(4, 1, 3, i, {0: 60}, resume) for i in range(3)]
    assert [m.rank for m in plans] == [1, 2, 3] and plans[0].roles == [1, 2, 3]
    assert plans[0].departed == [] and plans[0].adopted == {}
    # A rank due to fail later is played like any other; with room for it, the doomed one is kept.
    later = Membership.assign(4, 1, 3, 0, {0: 90}, resume)
    assert later.roles == [0, 1, 2] and later.departed == [3]
    four = [Membership.assign(4, 1, 4, i, {0: 60}, resume).rank for i in range(4)]
    assert four == [0, 1, 2, 3]


def test_resume_on_fewer_ranks_when_a_rank_fails_at_the_resume_step(shards, tmp_path):
    """The issue's case end to end: faults {0: 60}, q = 2, checkpoint at 60, resumed on 3 ranks:
    3 ranks train (1, 2, 3) and the run equals the uninterrupted one in which rank 0 fails at 60."""
    flags = ("--q", 2, "--fail", "0@60")
    reference = tmp_path / "reference"
    _train(4, shards, reference, *flags)
    run = tmp_path / "run"
    _cut_back_to_60(reference, run)  # the same job as the reference, stopped after step 60
    resumed = _train(3, shards, run, *flags, "--resume")
    assert "departed" not in resumed.stderr
    s, r = _summary(run), _summary(reference)
    assert s["live_rank_ids"] == [1, 2, 3] and s["live_ranks"] == 3 and s["departed"] == []
    for rank in (1, 2, 3):
        assert _records(run, rank) == _records(reference, rank)
    assert (s["train_loss"], s["test_accuracy"], s["rounds"]) == (r["train_loss"], r["test_accuracy"], r["rounds"])


def test_resume_on_fewer_ranks_needs_the_checkpoint(shards, tmp_path):
    fresh = mpi(3, "train", "--data", shards, "--run-dir", tmp_path / "fresh", *FLAGS, timeout=60)
    assert fresh.returncode == 2 and fresh.seconds < 30
    assert "has P=4 chunks but the job has 3 ranks" in fresh.stderr and "--resume" in fresh.stderr

    # Ranks 2 and 3 failed (simulated) before the checkpoint: it has two live ranks to resume.
    run = tmp_path / "run"
    _stopped_at_60(shards, run, "--q", 2, "--fail", "2@30", "--fail", "3@30")
    three = mpi(3, "train", "--data", shards, "--run-dir", run, *FLAGS, "--q", 2, "--fail", "2@30", "--fail", "3@30",
                "--resume", timeout=60)
    assert three.returncode == 2 and three.seconds < 30, three.stderr
    assert "step-00000060 has 2 live ranks of 4: launch at most 2 ranks, or 4" in three.stderr
    two = _train(2, shards, run, "--q", 2, "--fail", "2@30", "--fail", "3@30", "--resume")
    assert "departed" not in two.stderr  # ranks 2 and 3 failed by schedule: their data stays lost
    assert _summary(run)["coverage"] == 0.75 and _summary(run)["live_ranks"] == 2
