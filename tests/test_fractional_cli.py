"""`hpcsgd train --redundancy MU` at -n 4: mu = 0 is local SGD (q = 1) and mu = 1 is q = 2, bit
for bit (summary.json compared key by key, timings aside); bad redundancies and per-rank batch
sizes end the job with exit 2 and one message naming the keys (README, "Bad input")."""

from __future__ import annotations

import json
import shutil

import pytest

from hpcsgd.data import load_source, write_shards

from launch import mpi

TIMINGS = ("wall_s", "compute_s_mean", "comm_s_mean", "data_s_mean")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("fractional") / "p4"
    write_shards(load_source("synthetic", seed=0, n_train=256, n_test=64, num_classes=4, features=8), 4, "label", out,
                 seed=0)
    return out


def _train(shards, run_dir, *extra, timeout=180):
    batch = () if "--batch-size" in extra else ("--batch-size", 6)  # a list flag: a second one would extend it
    return mpi(4, "train", "--data", shards, "--run-dir", run_dir, "--steps", 12, *batch, "--tau", 3,
               "--lr", 0.2, "--mlp-hidden", 16, "--log-every", 3, "--progress", "none", *map(str, extra),
               timeout=timeout)


def _summary(run_dir):
    found = json.loads((run_dir / "summary.json").read_text())
    return {k: v for k, v in found.items() if k not in TIMINGS}


@pytest.mark.parametrize("mu, q", [(0, 1), (1, 2)])
def test_integer_redundancy_equals_q_bit_for_bit(shards, tmp_path, mu, q):
    by_mu, by_q = tmp_path / "mu", tmp_path / "q"
    for run_dir, flags in ((by_mu, ("--redundancy", mu)), (by_q, ("--q", q))):
        result = _train(shards, run_dir, *flags)
        assert result.returncode == 0, result.stderr
    a, b = _summary(by_mu), _summary(by_q)
    assert a["q"] == b["q"] == q and a["redundancy"] == b["redundancy"] == float(mu)
    assert a["redundancy_per_rank"] == [float(mu)] * 4 and a["batch_per_rank"] == [6] * 4
    assert a == b  # every figure: losses, accuracies, bytes, rounds, coverage
    for rank in range(4):  # every rank's metric lines, timings aside
        lines = [(d / "metrics" / f"rank-{rank}.jsonl").read_text().splitlines() for d in (by_mu, by_q)]
        strip = [[{k: v for k, v in json.loads(x).items() if not k.endswith("_s")} for x in m] for m in lines]
        assert strip[0] == strip[1] and len(strip[0]) >= 4


def test_fractional_run_records_its_redundancy_and_coverage(shards, tmp_path):
    result = _train(shards, tmp_path / "half", "--redundancy", 0.5, "--fail", "1@6")
    assert result.returncode == 0, result.stderr
    s = _summary(tmp_path / "half")
    assert s["redundancy"] == 0.5 and s["redundancy_per_rank"] == [0.5] * 4 and s["objective"] == "batch mean"
    assert s["coverage"] == (3 * 64 + 32) / 256  # chunk 1 lives on only as rank 0's half of it
    assert "coverage 88%" in result.stderr, result.stderr


@pytest.mark.parametrize("extra, message", [
    (("--q", 3, "--redundancy", 0.5), "q = 3 and redundancy = 0.5 disagree"),
    (("--redundancy", 3.5), "redundancy must be in [0, P-1] = [0, 3] (P=4), got 3.5"),
    (("--redundancy", -1), "redundancy must be a number >= 0"),
    (("--redundancy-per-rank", 0.5, 0.5), "redundancy_per_rank must give one value per rank: 2 values for P=4"),
    (("--redundancy-per-rank", 0.5, 0.5, 0.5, 0.5, "--redundancy-spread", 0.1),
     "give redundancy_per_rank (the values) or redundancy_spread (a draw), not both"),
    (("--batch-size", 4, 4, 4), "batch_size must give one value per rank: 3 values for P=4"),
    (("--redundancy", 0.5, "--reweight"), "reweight does not combine with fractional"),
])
def test_bad_redundancy_exits_2_on_every_rank(shards, tmp_path, extra, message):
    result = _train(shards, tmp_path / "bad", *extra, timeout=90)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr, result.stderr
    assert result.stderr.count("error") == 1 and "Traceback" not in result.stderr, result.stderr


def test_resume_on_3_ranks_adopts_the_chunk_held_only_in_part(shards, tmp_path):
    """mu = 0.5 on 4 ranks, resumed on 3 from its step-6 checkpoint: rank 3 departs, rank 2
    holds only half of chunk 3, so a survivor adopts chunk 3 whole and coverage stays 100%."""
    run = tmp_path / "run"
    first = _train(shards, run, "--redundancy", 0.5, "--checkpoint-every", 6)
    assert first.returncode == 0, first.stderr
    per_rank = _summary(run)["redundancy_per_rank"]
    shutil.rmtree(run / "checkpoints" / "step-00000012")
    (run / "summary.json").unlink()
    result = mpi(3, "train", "--data", shards, "--run-dir", run, "--steps", 12, "--batch-size", 6, "--tau", 3,
                 "--lr", 0.2, "--mlp-hidden", 16, "--log-every", 3, "--progress", "none", "--redundancy", 0.5,
                 "--checkpoint-every", 6, "--resume", timeout=180)
    assert result.returncode == 0, result.stderr
    assert "chunk 3 -> rank 0" in result.stderr and "coverage 100%" in result.stderr, result.stderr
    s = _summary(run)
    assert s["adopted_chunks"] == {"3": 0} and s["coverage"] == 1.0 and s["redundancy_per_rank"] == per_rank
