"""Run directories: one job at a time, no run overwritten unasked, nothing deleted."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time

import pytest

from hpcsgd.data import load_source, write_shards
from hpcsgd.errors import ConfigError
from hpcsgd.train.rundir import LOCK_NAME, RunDirError, lock, read_record, run_entries

from launch import BIN, ROOT, env, mpi

FLAGS = ["--steps", "6", "--batch-size", "8", "--mlp-hidden", "16", "--eval-every", "0", "--progress", "none"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("rundir") / "shards"
    write_shards(load_source("synthetic", seed=0, n_train=256, n_test=64, num_classes=4, features=8), 2, "iid", out, seed=0)
    return out


def _train(shards, run, *flags, n=2, timeout=120):
    return mpi(n, "train", "--data", shards, "--run-dir", run, *FLAGS, *map(str, flags), timeout=timeout)


def _clean_metrics(path, steps):
    """Every line parses, the steps run 1..steps in order, one learning rate: one run, not two."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1)), [r["step"] for r in records]
    assert len({r["lr"] for r in records}) == 1
    return records


@pytest.mark.slow
def test_a_run_directory_holding_a_run_is_refused_then_overwritten_aside(shards, tmp_path):
    run = tmp_path / "run"
    first = _train(shards, run, "--lr", 0.1)
    assert first.returncode == 0, first.stderr
    old_metrics = (run / "metrics" / "rank-0.jsonl").read_text()

    again = _train(shards, run, "--lr", 0.05)
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr
    assert f"{run} already holds a run (config.toml, summary.json, metrics/, checkpoints/)" in again.stderr
    assert "--resume" in again.stderr and "--overwrite" in again.stderr
    assert (run / "metrics" / "rank-0.jsonl").read_text() == old_metrics  # untouched

    replaced = _train(shards, run, "--lr", 0.05, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    (aside,) = (run / "replaced").iterdir()
    assert f"moved the previous run in {run} to {aside} (nothing deleted)" in replaced.stderr
    assert (aside / "metrics" / "rank-0.jsonl").read_text() == old_metrics
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoints", "config.toml", "metrics", "summary.json"]
    assert list((aside / "checkpoints").glob("step-*/COMPLETE"))
    assert "lr = 0.05" in (run / "config.toml").read_text()
    assert "lr = 0.1\n" in (aside / "config.toml").read_text()
    # The new run resumes normally: its checkpoint is its own, not the old run's.
    resumed = _train(shards, run, "--lr", 0.05, "--resume")
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.slow
def test_second_job_on_one_run_directory_fails_at_once_and_the_first_finishes_clean(shards, tmp_path):
    run = tmp_path / "run"
    steps = 400  # rank 0 sleeps 0.1 s a step: the first job trains for 40 s or more
    cmd = [str(BIN / "mpiexec"), "-n", "2", sys.executable, "-m", "mpi4py", "-m", "hpcsgd", "train", "--data", str(shards),
           "--run-dir", str(run), "--steps", str(steps), "--batch-size", "8", "--mlp-hidden", "16", "--log-every", "1",
           "--eval-every", "0", "--lr", "0.1", "--progress", "none", "--straggle", f"0@0-{steps - 1}:0.1"]
    first = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = run / "metrics" / "rank-0.jsonl"
        deadline = time.time() + 180
        while not (metrics.exists() and metrics.read_text().count("\n") >= 5):
            assert first.poll() is None and time.time() < deadline, "first job ended or never started"
            time.sleep(0.1)
        holder = read_record(run / LOCK_NAME)["pid"]
        # The worst case: the second job asks to replace the run (it would move the first's files away).
        for extra in (["--resume"], ["--overwrite"], []):
            second = _train(shards, run, "--lr", 0.05, *extra)
            assert second.returncode != 0 and second.seconds < 10, (second.seconds, second.stderr)
            assert f"{run} is in use by another job: pid {holder} on host" in second.stderr, second.stderr
            assert first.poll() is None, "the first job must still be training"
        _, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    for rank in (0, 1):
        _clean_metrics(run / "metrics" / f"rank-{rank}.jsonl", steps)
    assert json.loads((run / "summary.json").read_text())["steps"] == steps
    assert not (run / "replaced").exists()


def test_lock_held_by_a_live_process_is_refused_naming_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from hpcsgd.train.rundir import lock; "
         "lock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(60)", str(tmp_path)],
        env=env(), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"in use by another job: pid {holder.pid} on host"):
            lock(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead job's lock; its record (a dead pid) is simply replaced.
    assert read_record(tmp_path / LOCK_NAME)["pid"] == holder.pid
    held = lock(tmp_path)
    assert held.kernel and read_record(tmp_path / LOCK_NAME)["pid"] == os.getpid()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_without_file_locking_the_record_decides_by_pid_and_host(tmp_path, monkeypatch, capsys):
    import socket

    import hpcsgd.train.rundir as rundir

    def no_locking(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(rundir.fcntl, "lockf", no_locking)
    live, stale = tmp_path / "live", tmp_path / "stale"
    for d, pid in ((live, os.getppid()), (stale, _dead_pid())):
        d.mkdir()
        (d / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then"}))
    with pytest.raises(RunDirError, match=f"pid {os.getppid()} on host .*cannot lock files"):
        lock(live)
    held = lock(stale)
    assert not held.kernel and read_record(stale / LOCK_NAME)["pid"] == os.getpid()
    assert "taking over the stale lock" in capsys.readouterr().err


def test_run_entries_ignore_the_lock_and_empty_folders(tmp_path):
    (tmp_path / LOCK_NAME).write_text("{}")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "slurm-1.out").write_text("a batch log is not a run")
    assert run_entries(tmp_path) == []
    (tmp_path / "metrics" / "rank-0.jsonl").write_text("")
    assert run_entries(tmp_path) == ["metrics/"]


def test_resume_and_overwrite_together_are_refused():
    from hpcsgd.config import build_config

    with pytest.raises(ConfigError, match="--resume .* or --overwrite .*, not both"):
        build_config({"data": "s", "run_dir": "r", "resume": True, "overwrite": True})
