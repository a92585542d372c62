"""Thread pools sized for the ranks sharing a node, before numpy and torch start them.

The demo ran 7x slower without OMP_NUM_THREADS=1: numpy's OpenBLAS pool (one thread per core,
spinning after each BLAS call) on 4 ranks x 2 cores. These tests check the decision
(hpcsgd.comm.threads) and, in real mpiexec jobs, the pool sizes a rank ends up with, from the
command line and from the Python API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hpcsgd.comm import threads

from launch import BIN, ROOT


@pytest.fixture
def clean_env(monkeypatch):
    for name in [*threads.THREAD_VARIABLES, "SLURM_CPUS_PER_TASK", "SLURM_STEP_TASKS_PER_NODE", "SLURM_NODEID",
                 "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE", "PALS_LOCAL_SIZE"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "_warned", False)
    return monkeypatch


@pytest.mark.parametrize(
    "variables, expected",
    [
        ({}, None),
        ({"MPI_LOCALNRANKS": "4"}, 4),  # MPICH's Hydra
        ({"OMPI_COMM_WORLD_LOCAL_SIZE": "3"}, 3),  # Open MPI
        ({"SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_NODEID": "0"}, 4),  # srun
        ({"SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "1"}, 2),
        ({"SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "3"}, 1),
        ({"SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "9"}, None),
        ({"SLURM_STEP_TASKS_PER_NODE": "garbage", "SLURM_NODEID": "0"}, None),
        ({"MPI_LOCALNRANKS": "0"}, None),
    ],
)
def test_ranks_on_this_node_from_the_launcher(clean_env, variables, expected):
    for name, value in variables.items():
        clean_env.setenv(name, value)
    assert threads.launcher_local_size() == expected


def test_threads_per_rank_precedence(clean_env):
    clean_env.setattr(threads, "node_cores", lambda: 16)
    assert threads.threads_per_rank(4) == 4  # cores shared out
    assert threads.threads_per_rank(32) == 1  # never 0
    assert threads.threads_per_rank(None) is None  # depends on the ranks, which are unknown
    clean_env.setenv("SLURM_CPUS_PER_TASK", "3")
    assert threads.threads_per_rank(4) == 3 and threads.threads_per_rank(None) == 3
    clean_env.setenv("OMP_NUM_THREADS", "2")
    assert threads.threads_per_rank(4) == 2
    assert threads.threads_per_rank(4, requested=5) == 5  # the threads config key wins


def test_waits_give_the_core_away_only_on_an_oversubscribed_node(clean_env):
    """hpcsgd/comm/waiting.py: MPI's spinning wait on a node with a core per rank, polite waits beyond."""
    from hpcsgd.comm import waiting
    from hpcsgd.comm.waiting import default_wait_mode

    clean_env.delenv("HPCSGD_WAIT", raising=False)
    clean_env.setattr(waiting, "_node_shared", None)  # before hpcsgd.init: the launcher's count stands in
    cores = threads.node_cores()
    assert default_wait_mode() == "spin"  # the launcher says nothing: nothing to share
    clean_env.setenv("MPI_LOCALNRANKS", str(cores))
    assert default_wait_mode() == "spin"
    clean_env.setenv("MPI_LOCALNRANKS", str(cores + 1))
    assert default_wait_mode() == "sleep"
    clean_env.setenv("HPCSGD_WAIT", "Yield")
    assert default_wait_mode() == "yield"
    clean_env.setenv("HPCSGD_WAIT", "nap")
    with pytest.raises(ValueError, match="HPCSGD_WAIT must be one of spin, yield, sleep, got 'nap'"):
        default_wait_mode()


@pytest.mark.parametrize("affinities,shared", [
    ([{0, 1}] * 4, True),  # 4 unbound ranks on 2 cores (this machine)
    ([{0}, {1}, {2}, {3}], False),  # srun binding 4 tasks to a core each: a cluster node
    ([{0}, {0}, {1}, {1}], True),  # bound two to a core (mpirun --oversubscribe --bind-to core)
    ([{0, 1}] * 2, False),
    ([set(range(16))] * 4, False),  # 4 unbound ranks on 16 cores
])
def test_whether_a_node_s_ranks_share_cores(affinities, shared):
    from hpcsgd.comm.waiting import cores_are_shared

    assert cores_are_shared(affinities) is shared


def test_limit_before_import_sets_every_pool_and_keeps_what_the_user_set(clean_env):
    clean_env.setattr(threads, "node_cores", lambda: 2)
    assert threads.limit_before_import() is None and "OMP_NUM_THREADS" not in os.environ  # no launcher
    clean_env.setenv("MPI_LOCALNRANKS", "4")
    clean_env.setenv("OPENBLAS_NUM_THREADS", "2")
    assert threads.limit_before_import() == 1
    assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["MKL_NUM_THREADS"] == "1"
    assert os.environ["OPENBLAS_NUM_THREADS"] == "2"


def test_oversubscription_warns_once_and_only_for_extra_threads(clean_env, capsys):
    assert threads.warn_if_oversubscribed(1, 4, 0, cores=2) is None  # 1 thread per rank: the ranks' choice
    assert threads.warn_if_oversubscribed(2, 1, 0, cores=2) is None  # fits
    message = threads.warn_if_oversubscribed(2, 4, 0, cores=2)
    assert message and "4 ranks on this node x 2 threads each = 8 threads on 2 cores" in message
    assert "OMP_NUM_THREADS" in message and message in capsys.readouterr().err
    assert threads.warn_if_oversubscribed(2, 4, 0, cores=2) is None  # once per process


def test_only_the_first_rank_of_a_node_prints_the_warning(clean_env, capsys):
    assert threads.warn_if_oversubscribed(4, 2, 1, cores=4)
    assert capsys.readouterr().err == ""


# ---- in real jobs -------------------------------------------------------------------------

POOLS = r"""
import json, sys
{setup}
import numpy, torch
from threadpoolctl import threadpool_info
blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
sys.stdout.write(json.dumps({{"blas": blas, "torch": torch.get_num_threads()}}) + "\n")  # one write: no interleaving
"""
CLI_START = "from hpcsgd.comm.threads import limit_before_import; limit_before_import()"  # what hpcsgd.cli.main does
TRAIN_START = """
import numpy  # numpy (and its OpenBLAS pool) loaded before hpcsgd could set the environment
from mpi4py import MPI
from hpcsgd.comm.device import apply_threads
apply_threads(MPI.COMM_WORLD)  # what training does in its setup
"""
API_START = """
import numpy  # the user's script imports numpy (and starts OpenBLAS) before hpcsgd
import hpcsgd
hpcsgd.init(device="cpu")  # the public API's first call sizes the pools
"""


def _pools(n: int, setup: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([str(BIN / "mpiexec"), "-n", str(n), sys.executable, "-c", POOLS.format(setup=setup)],
                            capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
@pytest.mark.parametrize("setup", [CLI_START, TRAIN_START, API_START], ids=["command-line", "training", "python-api"])
def test_every_pool_of_a_rank_is_sized_for_the_ranks_on_its_node(setup):
    ranks = 4
    expected = max(1, threads.node_cores() // ranks)
    pools = _pools(ranks, setup)
    assert len(pools) == ranks
    for pool in pools:
        assert pool["torch"] == expected
        assert pool["blas"] and all(n == expected for n in pool["blas"]), pools
