"""Agreed outcomes leave with a plain exit code on every rank, never through MPI_Abort.

Under ``python -m mpi4py`` a non-zero SystemExit becomes ``MPI_Abort`` at exit; mpiexec
reports the code either way, but srun kills the other tasks and reports 137, so a job
checkpointed by a signal looked crashed and was not requeued (tools/slurm-check runs the same
checks under a real srun). MPICH prints ``Abort(...)`` for every aborting rank: none may show.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from helpers import synthetic_shards
from launch import BIN, ROOT, env, mpi

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory.mktemp("exit") / "p2", 2, "iid")


def test_collective_bad_input_after_mpi_init_exits_2_without_abort(shards, tmp_path):
    # Found while reading the shard index, after MPI_Init and torch: every rank raises it.
    result = mpi(4, "train", "--data", shards, "--run-dir", tmp_path / "run", "--steps", 3, "--progress", "none",
                 timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("hpcsgd: error: shards:") == 1, result.stderr
    assert "Abort" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_signal_stop_exits_3_on_every_rank_without_abort(shards, tmp_path):
    run = tmp_path / "run"
    cmd = [str(BIN / "mpiexec"), "-n", "2", sys.executable, "-m", "mpi4py", "-m", "hpcsgd", "train", "--data",
           str(shards), "--run-dir", str(run), "--steps", "100000", "--mlp-hidden", "16", "--log-every", "5",
           "--eval-every", "0", "--progress", "none"]
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = run / "metrics" / "rank-0.jsonl"
        deadline = time.time() + 240
        while not (metrics.exists() and metrics.read_text().strip()):
            assert proc.poll() is None and time.time() < deadline, "job ended or never started"
            time.sleep(0.2)
        pids = subprocess.run(["pgrep", "-f", "--", f"--run-dir {run} "], capture_output=True, text=True).stdout.split()
        ranks = [int(p) for p in pids if int(p) != proc.pid]
        assert len(ranks) == 2, ranks
        for pid in ranks:
            subprocess.run(["kill", "-USR1", str(pid)])
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err
    assert "stopped by signal" in err and "Abort" not in err, err
    assert list(run.glob("checkpoints/step-*/COMPLETE"))


def test_a_bug_on_one_rank_still_aborts_the_job(tmp_path):
    """Not agreed: a rank-local failure must take the others down (exit non-zero, no hang)."""
    script = tmp_path / "bug.py"
    script.write_text(
        "from mpi4py import MPI\n"
        "from hpcsgd.cli import leave\n"
        "if MPI.COMM_WORLD.rank == 1:\n"
        "    leave(1)\n"  # not an agreed exit: SystemExit(1), which mpi4py turns into MPI_Abort
        "MPI.COMM_WORLD.Barrier()\n"  # rank 0 would wait here forever without the abort
    )
    result = subprocess.run([str(BIN / "mpiexec"), "-n", "2", sys.executable, "-m", "mpi4py", str(script)],
                            capture_output=True, text=True, timeout=120, env=env(), cwd=ROOT)
    assert result.returncode == 1, result.stderr
    assert "Abort(1)" in result.stderr
