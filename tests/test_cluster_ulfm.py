"""A whole node lost across real namespace nodes: 3 nodes x 2 ranks (tools/cluster), q = 2.

tests/test_node_failure.py simulates the nodes on one machine (``--ranks-per-node 2``); here
each node is a namespace of its own (its own network, IPC and /dev/shm), the ranks find R = 2
themselves, and the job is launched from the cluster's head with Open MPI's mpirun (ULFM)
through the ssh stand-in, its TCP over the nodes' eth0 links.

- ``--fail node:1@S --fail-mode kill``: both ranks of node 1 SIGKILL themselves; the survivors
  continue and every figure matches the loss only simulated (``--fail node:1@S``), bit for bit.
  Under spread placement coverage stays 100%; under cyclic it drops to 5/6.
- node 1's ranks SIGKILLed from outside at a random moment: the survivors finish, coverage 100%.
- ``tools/cluster kill node1``: every process of the node dies, Open MPI's daemon on it (prted)
  included. PRRTE 3.0 (Open MPI 5.0) cannot go on without a daemon ("PRTE has lost communication
  with a remote daemon ... on node node1 ... will terminate the job"), ULFM or not: the job ends
  and resumes from its checkpoint on the two nodes left, as under MPICH (parametrized).

Serial tests; they skip (saying why) without root or namespaces, and without ``.venv-openmpi``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import namespace_cluster, step_node_1_died, synthetic_shards
from launch import ROOT, env
from test_ulfm import MPIRUN, VENV, _rank_pid, metrics, summary

pytestmark = pytest.mark.slow

CLUSTER = ROOT / "tools" / "cluster"
NAME = "hpcsgd-test-ulfm"  # its own namespaces, apart from tests/test_cluster.py's
PYTHON = {"openmpi": str(VENV / "bin" / "python"), "mpich": sys.executable}
RUN = ("--q", 2, "--algorithm", "local", "--tau", 1, "--batch-size", 8, "--mlp-hidden", 32, "--lr", 0.1,
       "--seed", 0, "--eval-every", 0, "--eval-train-samples", 256, "--progress", "none")
SHORT = (*RUN, "--steps", 40, "--log-every", 5)
LONG = (*RUN, "--steps", 400, "--log-every", 25)
NODE1 = ("--fail", "node:1@20")
JOB_S = 480  # one launch of 6 ranks: about a minute under load, start-up mostly

needs_openmpi = pytest.mark.skipif(
    not (MPIRUN.exists() and (VENV / "bin" / "python").exists()),
    reason=f"no Open MPI environment at {VENV} (make it with `tools/setup --mpi openmpi`): ULFM runs skipped",
)


def cluster(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    e = {**env(), "HPCSGD_CLUSTER": NAME}
    return subprocess.run([sys.executable, str(CLUSTER), *args], capture_output=True, text=True, timeout=timeout,
                          env=e, cwd=ROOT)


def train_line(mpi: str, run_dir: Path, shards: Path, *args, hosts: str | None = None) -> list[str]:
    launch = ["run", "--mpi", mpi, *(["--with-ft", "ulfm"] if mpi == "openmpi" else [])]
    launch += ["--hosts", hosts] if hosts else []
    return [sys.executable, str(CLUSTER), *launch, "--", PYTHON[mpi], "-m", "mpi4py", "-m", "hpcsgd", "train",
            "--data", str(shards), "--run-dir", str(run_dir), *map(str, args)]


def launch(mpi: str, run_dir: Path, shards: Path, *args, hosts: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(train_line(mpi, run_dir, shards, *args, hosts=hosts), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**env(), "HPCSGD_CLUSTER": NAME}, cwd=ROOT,
                            start_new_session=True)


def finish(job: subprocess.Popen, timeout: float = JOB_S) -> str:
    """Wait for ``job``; its stderr. Killed (the whole session) if it overruns."""
    try:
        return job.communicate(timeout=timeout)[1]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate()


def train(mpi: str, run_dir: Path, shards: Path, *args, hosts: str | None = None) -> str:
    job = launch(mpi, run_dir, shards, *args, hosts=hosts)
    stderr = finish(job)
    assert job.returncode == 0, stderr[-3000:]
    # mpirun --with-ft ulfm exits 0 even after an MPI_Abort: the summary says the run completed.
    assert (run_dir / "summary.json").exists(), stderr[-3000:]
    return stderr


@pytest.fixture(scope="module")
def nodes():
    """3 nodes x 2 ranks, links unshaped; torn down however the tests end."""
    with namespace_cluster(cluster, "3", "2"):
        yield


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory.mktemp("nodes") / "shards", 6, "label", n_train=960, n_test=240,
                            num_classes=6, features=12)


def node_of(pid: int) -> str:
    """The cluster node whose network namespace holds ``pid``."""
    out = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True, timeout=30).stdout
    return out.strip().removeprefix(f"{NAME}-")


def node_processes(node: str) -> list[int]:
    """The processes in ``node``'s network namespace now, its holder aside."""
    out = subprocess.run(["ip", "netns", "pids", f"{NAME}-{node}"], capture_output=True, text=True, timeout=30).stdout
    pids = []
    for pid in out.split():
        try:
            if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"hpcsgd-cluster-"):
                pids.append(int(pid))
        except OSError:
            pass  # gone meanwhile
    return pids


def all_gone(*nodes: str, within: float = 30) -> bool:
    deadline = time.monotonic() + within
    while any(node_processes(n) for n in nodes) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not any(node_processes(n) for n in nodes)


FIGURES = ("train_loss", "test_accuracy", "consensus_distance", "coverage", "rounds", "live_rank_ids", "failures",
           "ranks_per_node")
SPREAD: dict = {}  # the spread kill run's summary, for the cyclic test's comparison


@needs_openmpi
def test_node_killed_under_ulfm_continues_as_the_simulated_loss(nodes, shards, tmp_path):
    args = (*SHORT, "--placement", "spread", *NODE1)
    train("openmpi", tmp_path / "kill", shards, *args, "--fail-mode", "kill")
    train("openmpi", tmp_path / "leave", shards, *args)
    kill, leave = summary(tmp_path / "kill"), summary(tmp_path / "leave")
    # R = 2 found by the ranks themselves: node 1 is ranks 2 and 3.
    assert kill["ranks_per_node"] == 2 and kill["placement"] == "spread"
    assert kill["live_rank_ids"] == [0, 1, 4, 5] and kill["failures"] == {"2": 20, "3": 20}
    assert kill["coverage"] == 1.0
    for key in FIGURES:
        assert kill[key] == leave[key], key
    assert metrics(tmp_path / "kill") == metrics(tmp_path / "leave")
    records = {r["rank"]: r for r in kill["failure_records"]}
    assert set(records) == {2, 3}
    assert all(r["kind"] == "process death" and r["step"] == 20 for r in records.values())
    SPREAD.update(kill)
    print(f"\nnode 1 killed at step 20 (spread, ULFM, 3 x 2 nodes): train loss {kill['train_loss']!r}, test accuracy "
          f"{kill['test_accuracy']!r}, coverage {kill['coverage']}; the simulated loss: the same, bit for bit")


@needs_openmpi
def test_the_same_loss_under_cyclic_placement_drops_coverage(nodes, shards, tmp_path):
    """Cyclic: chunk 3 had its copies on ranks 2 and 3 only (1 - (R - q + 1)/P = 5/6)."""
    train("openmpi", tmp_path / "kill", shards, *SHORT, *NODE1, "--fail-mode", "kill")
    kill = summary(tmp_path / "kill")
    assert kill["placement"] == "cyclic" and kill["ranks_per_node"] == 2
    assert kill["live_rank_ids"] == [0, 1, 4, 5] and kill["coverage"] == 5 / 6
    assert kill["chunk_holders"]["3"] == 0
    lines = [json.loads(x) for x in (tmp_path / "kill" / "metrics" / "rank-0.jsonl").read_text().splitlines()]
    assert [x["coverage"] for x in lines] == [1.0] * 4 + [5 / 6] * 4  # logged at steps 5..40
    than = (f"; spread: train loss {SPREAD['train_loss']:.4f}, test accuracy {SPREAD['test_accuracy']:.4f}"
            if SPREAD else "")
    print(f"\nnode 1 killed at step 20 (cyclic): coverage {kill['coverage']:.4f} (-{1 - kill['coverage']:.4f}), "
          f"train loss {kill['train_loss']:.4f}, test accuracy {kill['test_accuracy']:.4f}{than}")


def wait_for(path: Path, job: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline and job.poll() is None and not (path.exists() and path.stat().st_size):
        time.sleep(0.05)
    assert job.poll() is None, finish(job)[-3000:]
    assert path.exists() and path.stat().st_size, f"{path} not written in time"


@needs_openmpi
def test_ranks_of_a_node_killed_from_outside_at_a_random_moment(nodes, shards, tmp_path):
    """SIGKILL to both ranks of node 1 together, mid-step: the survivors finish with coverage 100%."""
    run_dir = tmp_path / "outside"
    args = (*LONG, "--placement", "spread")
    job = launch("openmpi", run_dir, shards, *args)
    try:
        deadline = time.monotonic() + JOB_S
        pids = [_rank_pid(str(run_dir), rank, deadline) for rank in (2, 3)]
        assert [node_of(pid) for pid in pids] == ["node1", "node1"]
        wait_for(run_dir / "metrics" / "rank-2.jsonl", job, deadline)  # training has started: 25 steps logged
        time.sleep(random.uniform(0.0, 1.0))  # not at a step boundary
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    finally:
        stderr = finish(job)
    assert job.returncode == 0, stderr[-3000:]
    kill = summary(run_dir)
    step = step_node_1_died(kill)
    train("openmpi", tmp_path / "leave", shards, *args, "--fail", f"node:1@{step}")
    sim = summary(tmp_path / "leave")
    assert sim["coverage"] == 1.0
    assert abs(kill["train_loss"] - sim["train_loss"]) <= 0.1 * sim["train_loss"]
    print(f"\nnode 1's ranks killed from outside at step {step}: coverage {kill['coverage']}, train loss "
          f"{kill['train_loss']:.4f} (the simulated loss at that step: {sim['train_loss']:.4f})")


@pytest.mark.parametrize("mpi", ["openmpi", "mpich"])
def test_whole_node_killed_ends_the_job_which_resumes_on_the_nodes_left(nodes, shards, tmp_path, mpi):
    """`tools/cluster kill node1` (its MPI daemon too) mid-run: the job ends without a summary,
    naming node1 (Open MPI); relaunched on node0 and node2 with --resume it continues from its
    last checkpoint on 4 ranks, coverage 100% (spread), and completes."""
    if mpi == "openmpi" and not MPIRUN.exists():
        pytest.skip(f"no Open MPI environment at {VENV}")
    run_dir = tmp_path / "run"
    args = (*LONG, "--placement", "spread", "--checkpoint-every", 25)
    job = launch(mpi, run_dir, shards, *args)
    try:
        deadline = time.monotonic() + JOB_S
        ckpt = run_dir / "checkpoints"
        while time.monotonic() < deadline and job.poll() is None and not any(ckpt.glob("step-*/COMPLETE")):
            time.sleep(0.05)
        assert job.poll() is None and any(ckpt.glob("step-*/COMPLETE")), "no checkpoint before the job ended"
        time.sleep(random.uniform(0.0, 1.0))
        killed = cluster("kill", "node1")
        assert killed.returncode == 0, killed.stderr
    finally:
        stderr = finish(job, timeout=180)
    assert not (run_dir / "summary.json").exists(), "the job finished although node1 was killed"
    if mpi == "mpich":
        assert job.returncode != 0, stderr[-3000:]
    # PRRTE 3.0 terminates the job on a lost daemon, saying so or not ("PRTE has lost
    # communication with a remote daemon ... on node node1", or "A daemon failed to report back"
    # when the ssh stand-in that started it dies first), and mpirun's exit status is 0 all the same.
    assert all_gone("node0", "node2"), "the job left processes behind"
    resumed = train(mpi, run_dir, shards, *args, "--resume", hosts="node0:2,node2:2")
    assert "of the run departed" in resumed and "coverage 100%" in resumed, resumed[-3000:]
    s = summary(run_dir)
    assert s["coverage"] == 1.0 and s["live_ranks"] == 4 and s["steps"] == 400 and s["ranks_per_node"] == 2
    said = next((x for x in stderr.splitlines() if "daemon" in x or "node1" in x), stderr.strip()[-200:])
    print(f"\n{mpi}: node1 killed whole: exit {job.returncode}, {said!r}; resumed on node0, node2: "
          f"{next((x for x in resumed.splitlines() if 'departed' in x), '')}; train loss {s['train_loss']:.4f}")
