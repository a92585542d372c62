"""Shared fixtures: a temporary directory all MPI ranks agree on, tiny shard sets."""

from __future__ import annotations

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


def make_shards(out: Path, parts: int, partition: str = "iid", seed: int = 0, **options) -> Path:
    """Synthetic shards (rank 0 writes, everyone waits) for in-process MPI tests."""
    from mpi4py import MPI

    from hpcsgd.data import load_source, write_shards

    comm = MPI.COMM_WORLD
    if comm.rank == 0:
        opts = {"n_train": 256, "n_test": 64, "num_classes": 4, "features": 8, **options}
        write_shards(load_source("synthetic", seed=seed, **opts), parts, partition, out, seed=seed)
    comm.Barrier()
    return out


def all_ranks(ok: bool) -> bool:
    """True only if ``ok`` holds on every rank: assert on this, so all ranks fail together.

    A plain assert that fails on one rank lets the others run on into the next collective
    and hang; agreeing first keeps every rank on the same path.
    """
    from mpi4py import MPI

    return bool(MPI.COMM_WORLD.allreduce(bool(ok), op=MPI.LAND))
