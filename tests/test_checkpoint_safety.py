"""A checkpoint onto a really full filesystem, and Ctrl-C: both leave a run that resumes."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcsgd.checkpoint import read_part

from diskfull import tmpfs
from helpers import synthetic_shards
from launch import BIN, ROOT, env, mpi

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory.mktemp("ckpt-safety") / "shards", 4, "label")


@pytest.fixture
def small_tmpfs(tmp_path):
    """An 8 MiB tmpfs (root only: skipped where mount is not allowed)."""
    with tmpfs(tmp_path / "tmpfs", "8m") as mount:
        yield mount


FLAGS = ["--steps", "160", "--checkpoint-every", "20", "--batch-size", "8", "--mlp-hidden", "16", "--algorithm", "local",
         "--tau", "2", "--momentum", "0.9", "--log-every", "1000", "--eval-every", "0", "--progress", "none", "--seed", "4"]


def _launch(shards, run, *extra):
    cmd = [str(BIN / "mpiexec"), "-n", "4", sys.executable, "-m", "mpi4py", "-m", "hpcsgd", "train", "--data", str(shards),
           "--run-dir", str(run), *FLAGS, *extra]
    return subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _fill(directory: Path) -> Path:
    """Write a file until the filesystem is full; returns it (delete it to free the space)."""
    filler = directory / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def _final_state(run: Path) -> tuple[dict, list]:
    summary = json.loads((run / "summary.json").read_text())
    final = run / "checkpoints" / "step-00000160"
    flats = []
    for rank in range(4):
        model_state = read_part(final / f"rank-{rank}.h5", "model")
        flats.append(np.concatenate([v.reshape(-1).numpy() for v in model_state.values()]))
    keep = ("train_loss", "test_accuracy", "train_loss_rank_mean", "consensus_distance", "rounds")
    return {k: summary[k] for k in keep}, flats


def test_checkpoint_onto_a_full_filesystem_exits_2_cleanly_and_resumes_bit_exact(shards, small_tmpfs, tmp_path):
    reference = mpi(4, "train", "--data", shards, "--run-dir", tmp_path / "reference", *FLAGS, timeout=300)
    assert reference.returncode == 0, reference.stderr

    run = small_tmpfs / "run"
    # Rank 0 sleeps 50 ms a step, so the disk fills between two checkpoints, not before the first.
    slow = ["--straggle", "0@0-159:0.05"]  # no effect on the trajectory, but part of the config
    proc = _launch(shards, run, *slow)
    try:
        deadline = time.time() + 180
        while not list(run.glob("checkpoints/step-*/COMPLETE")):
            assert proc.poll() is None and time.time() < deadline, "job ended or never checkpointed"
            time.sleep(0.05)
        filler = _fill(small_tmpfs)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err
    assert "No space left on device" in err and "is intact: free space and rerun with --resume" in err, err
    assert "Traceback" not in err and err.count("hpcsgd: error") == 1, err
    leftovers = [p for p in run.rglob("*") if ".tmp" in p.name or p.name.startswith(".rank-")]
    assert leftovers == [], leftovers
    complete = sorted(run.glob("checkpoints/step-*/COMPLETE"))
    assert complete and all(len(list(c.parent.glob("rank-*.h5"))) == 4 for c in complete)
    assert all((d / "COMPLETE").exists() for d in run.glob("checkpoints/step-*")), "an incomplete step was left"

    filler.unlink()
    resumed = mpi(4, "train", "--data", shards, "--run-dir", run, *FLAGS, *slow, "--resume", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    got, got_flats = _final_state(run)
    want, want_flats = _final_state(tmp_path / "reference")
    assert got == want
    assert all(np.array_equal(a, b) for a, b in zip(got_flats, want_flats))


def test_ctrl_c_checkpoints_and_exits_3_like_sigterm(shards, tmp_path):
    """Ctrl-C at a terminal: mpiexec forwards SIGINT to the ranks, which checkpoint and exit 3."""
    run = tmp_path / "run"
    slow = ["--log-every", "5", "--straggle", "0@0-159:0.1"]
    proc = _launch(shards, run, *slow)
    try:
        metrics = run / "metrics" / "rank-0.jsonl"
        deadline = time.time() + 180
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.time() < deadline, "job ended or never started"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # to mpiexec, as a terminal's Ctrl-C does
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err
    assert "stopped by signal" in err and "--resume" in err and "Traceback" not in err, err
    complete = sorted(run.glob("checkpoints/step-*/COMPLETE"))
    step = json.loads(complete[-1].read_text())["step"]
    assert 15 <= step < 160 and not (run / "summary.json").exists()
    resumed = mpi(4, "train", "--data", shards, "--run-dir", run, *FLAGS, *slow, "--resume", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == 160
