"""Shared fixtures: a temporary directory all MPI ranks agree on (shared functions: helpers.py).

Also the order in which tools/test's two pytest workers take the files (slowest first).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def shared_tmp():
    """A fresh directory made by rank 0 and known to every rank (pytest's tmp_path is per process)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    path = comm.bcast(tempfile.mkdtemp(prefix="hpcsgd-test-") if comm.rank == 0 else None)
    yield Path(path)
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(path, ignore_errors=True)


# The serial stage's slowest files, slowest first (from tools/test's --durations on the quiet
# machine). tools/test runs that stage on two pytest-xdist workers with --dist loadfile and
# --no-loadscope-reorder: a worker takes the next file in collection order when it runs dry,
# so starting the long files first leaves short ones to even out the end, instead of one worker
# still in a long file while the other idles. A file not listed keeps its place after these.
SLOWEST_FIRST = (
    "test_cluster_ulfm.py", "test_claims.py", "test_examples.py", "test_ulfm.py", "test_node_failure.py", "test_bench.py",
    "test_resume_fewer_ranks.py", "test_checkpoint_safety.py", "test_signals.py", "test_rundir.py",
    "test_api_vs_cli.py", "test_cli_errors.py", "test_api_modern.py", "test_cluster.py", "test_watchdog.py",
    "test_exchange_nodes_cli.py", "test_bench_xnode.py",
)


def pytest_collection_modifyitems(config, items):
    """On an xdist worker (whose collection order the scheduler follows): the slowest files first."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return  # a plain run, and the MPI stages, keep pytest's order
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order in a file
