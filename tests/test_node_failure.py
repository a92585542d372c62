"""A whole node lost: 3 nodes x 2 ranks simulated on one machine (``--ranks-per-node 2``), q = 2.

Under spread placement the copies of every chunk sit on two nodes, so losing node 1 (ranks 2
and 3) keeps coverage 100%; under cyclic placement chunk 3 had its copies on ranks 2 and 3
only, so coverage drops to 5/6 (closed form ``1 - (R - q + 1)/P``, tests/test_placement.py).
The loss is simulated (``--fail node:1@S``), real under Open MPI ULFM (``--fail-mode kill``:
both ranks SIGKILL themselves at step S, the survivors continue), and under MPICH a job that
ends and resumes from its checkpoint on a node's worth of ranks fewer.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from helpers import step_node_1_died, synthetic_shards
from launch import ROOT, mpi
from test_ulfm import MPIRUN, VENV, metrics, needs_ulfm, summary, ulfm_env

pytestmark = pytest.mark.slow

RUN = ("--q", 2, "--ranks-per-node", 2, "--algorithm", "local", "--tau", 1, "--steps", 40, "--batch-size", 8,
       "--mlp-hidden", 32, "--lr", 0.1, "--seed", 0, "--log-every", 5, "--eval-every", 0,
       "--eval-train-samples", 256, "--progress", "none")
NODE1 = ("--fail", "node:1@20")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory.mktemp("nodes") / "shards", 6, "label", n_train=960, n_test=240,
                            num_classes=6, features=12)


def train(n, shards, run, *flags, timeout=400):
    result = mpi(n, "train", "--data", shards, "--run-dir", run, *RUN, *map(str, flags), timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_lost_node_keeps_coverage_under_spread_and_drops_it_under_cyclic(shards, tmp_path):
    spread = train(6, shards, tmp_path / "spread", "--placement", "spread", *NODE1)
    cyclic = train(6, shards, tmp_path / "cyclic", *NODE1)
    for run, result, cov in ((tmp_path / "spread", spread, 1.0), (tmp_path / "cyclic", cyclic, 5 / 6)):
        s = summary(run)
        assert s["failures"] == {"2": 20, "3": 20} and s["live_rank_ids"] == [0, 1, 4, 5]
        assert s["ranks_per_node"] == 2 and s["coverage"] == cov
        assert f"rank(s) 2, 3 (node 1) failed at step 20; 4 live ranks, coverage {cov:.0%}" in result.stderr
        lines = [json.loads(x) for x in (run / "metrics" / "rank-0.jsonl").read_text().splitlines()]
        assert [x["coverage"] for x in lines] == [1.0] * 4 + [cov] * 4  # logged at steps 5..40
    assert summary(tmp_path / "spread")["placement"] == "spread" and summary(tmp_path / "cyclic")["placement"] == "cyclic"
    assert summary(tmp_path / "cyclic")["chunk_holders"]["3"] == 0


def test_a_node_gone_at_a_resume_under_mpich(shards, tmp_path):
    """A 6-rank job ends after its checkpoint at step 20 and comes back on 4 ranks (node 2 gone).

    Spread: ranks 4, 5 depart, every chunk still has a live copy, nothing is adopted, and the
    resumed job is bit for bit the uninterrupted run in which node 2 fails at step 20
    (re-weighted, as a resume must be). It finds R = 4 on this machine, but keeps the run's
    recorded R = 2. Cyclic: chunk 5 was on ranks 4, 5 only and is adopted from its shard.
    """
    flags = ("--placement", "spread", "--fail", "node:2@20", "--reweight", "--checkpoint-every", 20)
    reference = tmp_path / "reference"
    train(6, shards, reference, *flags)
    run = tmp_path / "run"
    train(6, shards, run, "--placement", "spread", "--reweight", "--checkpoint-every", 20)
    shutil.rmtree(run / "checkpoints" / "step-00000040")
    (run / "summary.json").unlink()
    args = list(map(str, RUN))
    del args[args.index("--ranks-per-node"):args.index("--ranks-per-node") + 2]  # R comes from the checkpoint
    resumed = mpi(4, "train", "--data", shards, "--run-dir", run, *args, "--placement", "spread", "--reweight",
                  "--checkpoint-every", 20, "--resume", timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "rank(s) 4, 5 of the run departed" in resumed.stderr and "(none needed); coverage 100%" in resumed.stderr
    s, ref = summary(run), summary(reference)
    assert s["coverage"] == 1.0 and s["adopted_chunks"] == {} and s["ranks_per_node"] == 2
    assert s["live_rank_ids"] == ref["live_rank_ids"] == [0, 1, 2, 3]
    for key in ("train_loss", "test_accuracy", "consensus_distance"):
        assert s[key] == ref[key], key
    keep = ("step", "loss", "consensus_distance", "coverage")
    for rank in range(4):
        mine = [json.loads(x) for x in (run / "metrics" / f"rank-{rank}.jsonl").read_text().splitlines()]
        theirs = [json.loads(x) for x in (reference / "metrics" / f"rank-{rank}.jsonl").read_text().splitlines()]
        assert [{k: r[k] for k in keep} for r in mine] == [{k: r[k] for k in keep} for r in theirs]

    cyclic = tmp_path / "cyclic"
    train(6, shards, cyclic, "--checkpoint-every", 20)
    shutil.rmtree(cyclic / "checkpoints" / "step-00000040")
    (cyclic / "summary.json").unlink()
    again = mpi(4, "train", "--data", shards, "--run-dir", cyclic, *RUN, "--checkpoint-every", 20, "--resume",
                timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(chunk 5 -> rank 0); coverage 100%" in again.stderr
    assert summary(cyclic)["adopted_chunks"] == {"5": 0} and summary(cyclic)["coverage"] == 1.0


def ulfm6(run_dir, shards, *args) -> subprocess.CompletedProcess:
    cmd = [str(MPIRUN), "--with-ft", "ulfm", "--oversubscribe", "-n", "6", str(VENV / "bin" / "python"), "-m",
           "mpi4py", "-m", "hpcsgd", "train", "--data", str(shards), "--run-dir", str(run_dir), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=ulfm_env(), cwd=ROOT)


@needs_ulfm
def test_a_node_killed_under_ulfm_continues_as_the_simulated_loss(shards, tmp_path):
    """Both ranks of node 1 SIGKILL themselves at step 20; the 4 survivors continue, with the
    same metrics, bit for bit, and the same accuracy as the simulated loss of node 1."""
    args = (*RUN, "--placement", "spread", *NODE1)
    killed = ulfm6(tmp_path / "kill", shards, *args, "--fail-mode", "kill")
    assert killed.returncode == 0, killed.stderr[-3000:]
    left = ulfm6(tmp_path / "leave", shards, *args)
    assert left.returncode == 0, left.stderr[-3000:]
    kill, leave = summary(tmp_path / "kill"), summary(tmp_path / "leave")
    assert kill["live_rank_ids"] == leave["live_rank_ids"] == [0, 1, 4, 5]
    assert kill["failures"] == leave["failures"] == {"2": 20, "3": 20}
    assert kill["coverage"] == leave["coverage"] == 1.0
    assert metrics(tmp_path / "kill") == metrics(tmp_path / "leave")
    for key in ("train_loss", "test_accuracy", "consensus_distance", "rounds"):
        assert kill[key] == leave[key], key
    records = {r["rank"]: r for r in kill["failure_records"]}
    assert set(records) == {2, 3}
    assert all(r["kind"] == "process death" and r["step"] == 20 for r in records.values())


@needs_ulfm
def test_a_node_killed_from_outside_at_a_random_moment(shards, tmp_path):
    """Both processes of node 1 SIGKILLed together from outside, mid-step: the survivors
    continue with coverage 100% (spread), close to the simulated loss of node 1 at that step."""
    import os
    import random
    import signal
    import time

    from test_ulfm import _rank_pid

    run_dir = tmp_path / "outside"
    longer = [*RUN, "--steps", 400, "--log-every", 25, "--placement", "spread"]
    cmd = [str(MPIRUN), "--with-ft", "ulfm", "--oversubscribe", "-n", "6", str(VENV / "bin" / "python"), "-m",
           "mpi4py", "-m", "hpcsgd", "train", "--data", str(shards), "--run-dir", str(run_dir), *map(str, longer)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ulfm_env(), cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        pids = [_rank_pid(str(run_dir), rank, deadline) for rank in (2, 3)]
        first = run_dir / "metrics" / "rank-2.jsonl"
        while time.monotonic() < deadline and not (first.exists() and first.read_text().strip()):
            time.sleep(0.02)  # training has started: 25 steps are logged
        assert first.exists() and first.read_text().strip(), "training did not start within 300 s"
        time.sleep(random.Random().uniform(0.0, 1.0))  # not at a step boundary
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    kill = summary(run_dir)
    step = step_node_1_died(kill)
    left = ulfm6(tmp_path / "leave", shards, *longer, "--fail", f"node:1@{step}")
    assert left.returncode == 0, left.stderr[-3000:]
    sim = summary(tmp_path / "leave")
    assert sim["coverage"] == 1.0
    assert abs(kill["train_loss"] - sim["train_loss"]) <= 0.1 * sim["train_loss"]
