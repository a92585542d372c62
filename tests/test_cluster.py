"""hpcsgd across nodes: 2 nodes x 2 ranks of a namespace cluster (tools/cluster) on this machine.

Each node has its own network, IPC, UTS and /dev/shm; the nodes talk only over veth links
shaped to 1 Gbit/s. Every strategy's run across the two nodes must give the same summary.json
figures, bit for bit, as the same run on one node (the plain mpiexec launch), while the
block exchange reports its cross-node path and the links' byte counters show the rounds
crossed. A bad host, a node that never answers at the start and one that stops answering
mid-run must end the job with exit 2 or 4 and a message naming them. Serial tests; they skip
(saying why) where namespaces cannot be made: without root, `ip netns`, unshare or nsenter.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import namespace_cluster
from launch import ROOT, env, hpcsgd, mpi

CLUSTER = ROOT / "tools" / "cluster"
NAME = "hpcsgd-test"  # its own namespaces: a user's `tools/cluster up` is left alone
PYTHON = [sys.executable, "-m", "mpi4py", "-m", "hpcsgd"]
CONFIG = str(ROOT / "jobs" / "configs" / "digits-risgd.toml")
# Short runs: 40 steps, a round every 4 (local, rps) or every step (sync, lossy-allreduce).
COMMON = ["--steps", "40", "--log-every", "10", "--eval-every", "0", "--seed", "3"]

# Every strategy; q = 2 makes the rps case RI-SGD's redundancy too. Drops make the exchange
# lossy, so it takes the shared-memory window on one node and, across nodes, each node's window
# for its own pairs and Ialltoallv for the pairs between nodes (node-aware).
STRATEGIES = {
    "sync": (["--algorithm", "sync"], "allreduce", "allreduce"),
    "local": (["--algorithm", "local", "--tau", "4"], "allreduce", "allreduce"),
    "rps": (["--algorithm", "rps", "--tau", "4", "--q", "2", "--drop-rate", "0.1"], "shared-memory", "node-aware"),
    "lossy-allreduce": (["--algorithm", "lossy-allreduce", "--drop-rate", "0.1"], "shared-memory", "node-aware"),
}
# Where the bytes went, and how many travelled (a node adds its rows before they cross), depend
# on the nodes, not a result: _check_node_bytes checks them against the closed form.
NODE_BYTES = {"bytes_sent", "bytes_intra_node", "bytes_inter_node"}
# Figures that must agree bit for bit; everything but the timings, the exchange path and
# the emulated-network clock (off here) is compared.
TIMINGS = {"wall_s", "compute_s_mean", "comm_s_mean", "data_s_mean"}


def cluster(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    e = {**env(), "HPCSGD_CLUSTER": NAME}
    return subprocess.run([sys.executable, str(CLUSTER), *args], capture_output=True, text=True, timeout=timeout, env=e, cwd=ROOT)


def cluster_popen(*args: str) -> subprocess.Popen:
    e = {**env(), "HPCSGD_CLUSTER": NAME}
    return subprocess.Popen([sys.executable, str(CLUSTER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=e, cwd=ROOT, start_new_session=True)


def _freeze_node1_until_the_job_ends(job: subprocess.Popen, timeout: float) -> tuple[str, float]:
    """SIGSTOP node1's processes; the job's stderr and the seconds from the freeze to its end."""
    frozen = cluster("freeze", "node1")
    assert frozen.returncode == 0, frozen.stderr
    t_freeze = time.monotonic()
    _, stderr = job.communicate(timeout=timeout + 60)
    return stderr, time.monotonic() - t_freeze


def _end_job_and_node1(job: subprocess.Popen) -> None:
    """Whatever happened: no launcher left, and what is left of node1 killed (a node rebooted)."""
    if job.poll() is None:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    cluster("kill", "node1")


@pytest.fixture(scope="module")
def nodes():
    """2 nodes x 2 ranks, links at 1 Gbit/s; torn down however the tests end."""
    with namespace_cluster(cluster, "2", "2", "--gbps", "1"):
        yield


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("cluster") / "shards-p4"
    r = hpcsgd("shard", "--source", "digits", "--parts", "4", "--partition", "label", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def counters() -> dict:
    r = cluster("counters", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def crossed(before: dict, after: dict) -> int:
    """Bytes the nodes sent over their links between two counter readings."""
    return sum(after[n]["tx_bytes"] - before[n]["tx_bytes"] for n in after)


def run_across(*args, timeout: float = 240) -> subprocess.CompletedProcess:
    return cluster("run", "--", *PYTHON, *map(str, args), timeout=timeout)


def _check_node_bytes(one: dict, two: dict, moved: int) -> None:
    """rps across 2 x 2: intra- and inter-node bytes by the closed form (tests/reference.py), and
    the links carried the inter-node bytes (MPI's headers, control traffic and the start-up on top)."""
    from hpcsgd.comm import LinkRates
    from reference import node_bytes

    assert (one["bytes_intra_node"], one["bytes_inter_node"]) == (one["bytes_sent"], 0)
    d = 64 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10  # digits-risgd.toml's MLP
    rounds = [t for t in range(40) if (t + 1) % 4 == 0]
    expected = node_bytes(4, 2, 3, LinkRates.build(4, 0.1), rounds, d)
    assert (two["bytes_intra_node"], two["bytes_inter_node"]) == expected
    assert two["bytes_intra_node"] + two["bytes_inter_node"] == two["bytes_sent"]
    assert one["bytes_sent"] == sum(node_bytes(4, 1, 3, LinkRates.build(4, 0.1), rounds, d))  # every message alone
    assert two["bytes_inter_node"] <= moved <= 2 * two["bytes_inter_node"] + (4 << 20), (moved, expected)
    print(f"\nrps 2x2: {two['bytes_intra_node']:,d} B intra-node, {two['bytes_inter_node']:,d} B inter-node; "
          f"{moved:,d} B crossed the links ({moved / two['bytes_inter_node']:.2f} x inter-node)")


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_same_summary_across_nodes(nodes, shards, tmp_path, strategy):
    flags, one_node_path, cross_path = STRATEGIES[strategy]
    args = [CONFIG, "--data", shards, *COMMON, *flags]
    ref = mpi(4, "train", *args, "--run-dir", tmp_path / "one-node", timeout=240)
    assert ref.returncode == 0, ref.stderr
    before = counters()
    start = time.perf_counter()
    r = run_across("train", *args, "--run-dir", tmp_path / "two-nodes")
    seconds = time.perf_counter() - start
    after = counters()
    assert r.returncode == 0, r.stderr
    one = json.loads((tmp_path / "one-node" / "summary.json").read_text())
    two = json.loads((tmp_path / "two-nodes" / "summary.json").read_text())
    assert (one["exchange"], two["exchange"]) == (one_node_path, cross_path)
    # The ranks sharing memory, as each run detected them: the topology, not a result.
    assert (one["ranks_per_node"], two["ranks_per_node"]) == (4, 2)
    differ = {k: (one.get(k), two.get(k))
              for k in (one.keys() | two.keys()) - TIMINGS - NODE_BYTES - {"exchange", "ranks_per_node"}
              if one.get(k) != two.get(k)}
    assert not differ, f"2 nodes x 2 ranks differ from one node: {differ}"
    # Each round averages the two nodes' models, so each node must receive at least a model's
    # worth per round, whatever the algorithm: a third of the ranks' bytes_sent (an allreduce
    # or a two-phase exchange sends 2(P-1)/P models per rank, P = 4). MPI's control traffic
    # is on top.
    assert two["bytes_sent"] > 0
    moved = crossed(before, after)
    assert moved >= two["bytes_sent"] / 3, (moved, two["bytes_sent"])
    if strategy == "rps":
        _check_node_bytes(one, two, moved)
    ready = re.search(r"ready after [0-9.]+s[^\n]*", r.stderr)
    assert ready, r.stderr
    print(f"\n{strategy}: 2x2 {seconds:.1f}s, {ready.group(0)}; {moved:,d} B crossed the links "
          f"({moved / two['bytes_sent']:.2f} x bytes_sent {two['bytes_sent']:,d}); "
          f"train loss {two['train_loss']!r}, exchange {one['exchange']} -> {two['exchange']}")


def test_bad_host_is_named(nodes, shards, tmp_path):
    r = cluster("run", "--hosts", "node0:2,node9:2", "--", *PYTHON, "train", CONFIG, "--data", str(shards),
                "--run-dir", str(tmp_path / "run"), timeout=60)
    assert r.returncode == 2, r.stderr
    assert "node9" in r.stderr and "not a node" in r.stderr
    assert not (tmp_path / "run").exists()


def test_node_that_never_answers_at_start_is_named(nodes, shards, tmp_path):
    """node1 frozen before the launch (its processes stopped, its link down): the launch ends
    with exit 2 naming it, in well under a collective timeout, and nothing starts."""
    frozen = cluster("freeze", "node1")
    assert frozen.returncode == 0, frozen.stderr
    try:
        start = time.perf_counter()
        r = cluster("run", "--", *PYTHON, "train", CONFIG, "--data", str(shards), "--run-dir", str(tmp_path / "run"),
                    timeout=120)
        seconds = time.perf_counter() - start
    finally:
        thawed = cluster("thaw", "node1")
    assert thawed.returncode == 0, thawed.stderr
    assert r.returncode == 2, r.stderr
    assert "node1" in r.stderr and "does not answer" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()
    assert seconds < 30, seconds  # the probe's 5 s, and the start of tools/cluster itself
    # Thawed, it answers again: the same probe lets a launch through.
    again = cluster("run", "--", "hostname", timeout=120)
    assert again.returncode == 0 and sorted(again.stdout.split()) == ["node0", "node0", "node1", "node1"], again.stderr
    print(f"\nnode1 frozen before the launch: exit 2 after {seconds:.1f}s: {r.stderr.strip().splitlines()[-1]}")


def node_pids(node: str) -> list[int]:
    """The hpcsgd processes in ``node``'s namespaces now."""
    out = subprocess.run(["ip", "netns", "pids", f"{NAME}-{node}"], capture_output=True, text=True, timeout=30).stdout
    pids = []
    for pid in out.split():
        try:
            if b"hpcsgd" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                pids.append(int(pid))
        except OSError:
            pass
    return pids


def test_node_that_freezes_during_start_up_is_named(nodes, shards, tmp_path):
    """node1 frozen just after the launch, its ranks started (after the launch's probe, before
    or inside MPI_Init): exit 2 naming it within the collective timeout, every process ended.

    Without the start-up watch of `tools/cluster run` the other node's ranks waited in MPI_Init
    for good, and MPICH's mpiexec did not even end on SIGTERM (11 min, until node1 was killed)."""
    timeout = 60
    job = cluster_popen("run", "--", *PYTHON, "train", CONFIG, "--data", str(shards), "--run-dir",
                        str(tmp_path / "run"), "--collective-timeout", str(timeout))
    try:
        deadline = time.monotonic() + 120
        while len(node_pids("node1")) < 2 and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.poll() is None and len(node_pids("node1")) == 2, job.communicate()[1]
        stderr, waited = _freeze_node1_until_the_job_ends(job, timeout)
    finally:
        _end_job_and_node1(job)
    assert job.returncode == 2, stderr
    message = stderr.strip().splitlines()[-1]
    assert "node1" in message and "stopped answering during the job's start-up" in message, stderr
    assert waited < timeout, waited
    assert node_pids("node0") == [], "ranks left running on node0"
    print(f"\nnode1 frozen at the start: exit 2 after {waited:.1f}s: {message}")


def test_node_that_stops_answering_ends_the_job(nodes, shards, tmp_path):
    """node1 frozen mid-run (SIGSTOP to its processes): exit 4 within the collective timeout, naming it."""
    timeout = 10
    run_dir = tmp_path / "run"
    # Rank 0 sleeps 50 ms a step so that the freeze lands mid-run on any machine.
    job = cluster_popen("run", "--", *PYTHON, "train", CONFIG, "--data", str(shards), "--run-dir", str(run_dir),
                        "--steps", "2000", "--log-every", "1", "--straggle", "0@1-1999:0.05",
                        "--collective-timeout", str(timeout))
    try:
        metrics = run_dir / "metrics" / "rank-0.jsonl"
        deadline = time.monotonic() + 180
        while not (metrics.exists() and metrics.stat().st_size) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert job.poll() is None, job.communicate()[1]
        stderr, waited = _freeze_node1_until_the_job_ends(job, timeout)
    finally:
        _end_job_and_node1(job)
    assert job.returncode == 4, stderr
    message = next((line for line in stderr.splitlines() if "collective timeout" in line), "")
    assert "on node1" in message and "no answer" in message, stderr
    assert waited < timeout + 30, waited
    print(f"\nnode1 frozen: exit 4 after {waited:.1f}s (collective timeout {timeout} s): {message}")
