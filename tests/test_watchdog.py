"""The collective watchdog: a rank that stops or stalls ends the job with exit 4, named."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcsgd.data import load_source, write_shards

from launch import BIN, ROOT, env

TIMEOUT = 5  # collective_timeout of these runs, seconds


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("watchdog") / "shards"
    write_shards(load_source("synthetic", seed=0, n_train=256, n_test=64, num_classes=4, features=8), 4, "iid", out, seed=0)
    return out


def _start(shards, run, *flags):
    cmd = [str(BIN / "mpiexec"), "-n", "4", sys.executable, "-m", "mpi4py", "-m", "hpcsgd", "train", "--data", str(shards),
           "--run-dir", str(run), "--steps", "100000", "--batch-size", "8", "--mlp-hidden", "16", "--log-every", "5",
           "--eval-every", "0", "--progress", "none", "--collective-timeout", str(TIMEOUT), *map(str, flags)]
    return subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_training(proc, run: Path, lines: int = 2) -> None:
    metrics = run / "metrics" / "rank-0.jsonl"
    deadline = time.time() + 180
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= lines):
        assert proc.poll() is None and time.time() < deadline, "job ended or never started"
        time.sleep(0.2)


def _rank_pid(run: Path, rank: int) -> int:
    """The pid of MPI rank ``rank`` of the job writing ``run`` (hydra exports PMI_RANK)."""
    pids = subprocess.run(["pgrep", "-f", "--", f"--run-dir {run} "], capture_output=True, text=True).stdout.split()
    for pid in map(int, pids):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"PMI_RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no process of rank {rank} among {pids}")


def test_sigstop_on_one_rank_ends_the_job_with_exit_4_naming_it(shards, tmp_path):
    run = tmp_path / "run"
    proc = _start(shards, run)
    victim = None
    try:
        _wait_for_training(proc, run)
        victim = _rank_pid(run, 2)
        os.kill(victim, signal.SIGSTOP)
        stopped = time.monotonic()
        _, err = proc.communicate(timeout=TIMEOUT + 60)
        took = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
        if victim is not None:
            try:
                os.kill(victim, signal.SIGKILL)  # if the launcher did not (it does: SIGKILL ends a stopped process)
            except ProcessLookupError:
                pass
    assert proc.returncode == 4, err
    assert took < TIMEOUT + 30, f"took {took:.1f}s"
    assert "collective timeout" in err and f"within {TIMEOUT} s" in err, err
    assert "rank(s) 2 did not arrive" in err and "no answer: stopped, hung or dead" in err, err
    assert "in step " in err and "Traceback" not in err, err
    assert err.count("hpcsgd: error:") == 1, err  # one message, from the lowest rank that arrived


def test_a_straggler_beyond_the_timeout_is_named_as_busy(shards, tmp_path):
    """Rank 1 sleeps 60 s in step 12 (a swapped-out node, say): the others name it, it answers."""
    run = tmp_path / "run"
    proc = _start(shards, run, "--straggle", "1@11:60")
    try:
        _, err = proc.communicate(timeout=TIMEOUT + 180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 4, err
    assert "rank(s) 1 did not arrive" in err and "busy outside any collective in step 12" in err, err
    assert "rank(s) 0, 2, 3 waited" in err, err


def test_message_names_each_kind_of_absence():
    from mpi4py import MPI

    from hpcsgd.comm.watchdog import Watchdog, _Call

    dog = Watchdog()
    dog.timeout = 5.0
    dog._peers = {1: ("node7", 4242)}
    call = _Call("Allreduce [avg]", MPI.COMM_SELF, 0.0, 37)
    replies = {1: None, 2: (None, 37, None), 3: ("Barrier [checkpoint]", 36, 7.5), 4: ("Allreduce [avg]", 37, 5.2)}
    replies = {r: s for r, s in replies.items() if s is not None}
    text = dog._message(call, [0, 1, 2, 3, 4], [0, 4], replies)
    assert "Allreduce [avg] in step 37 did not complete within 5 s" in text
    assert "rank(s) 1, 2, 3 did not arrive" in text and "rank(s) 0, 4 waited" in text
    assert "rank 1 (pid 4242 on node7): no answer: stopped, hung or dead" in text
    assert "rank 2 (unknown process): busy outside any collective in step 37" in text
    assert "rank 3 (unknown process): waiting in Barrier [checkpoint] in step 36 for 7.5 s" in text
    everyone = dog._message(call, [0, 4], [0, 4], {4: ("Allreduce [avg]", 37, 5.0)})
    assert "every rank (0, 4) arrived; the collective itself stalled" in everyone


def test_guard_is_free_when_off_and_records_the_call_when_on():
    from mpi4py import MPI

    from hpcsgd.comm.watchdog import Watchdog

    dog = Watchdog()
    with dog.guard("Allreduce [avg]", MPI.COMM_SELF):
        assert dog.current is None  # off: nothing recorded
    dog.timeout, dog.step = 600.0, 12
    with dog.guard("Allreduce [avg]", MPI.COMM_SELF):
        with dog.guard("Bcast [model]", MPI.COMM_SELF):
            assert (dog.current.op, dog.current.step) == ("Bcast [model]", 12)
        assert dog.current.op == "Allreduce [avg]"
    assert dog.current is None
