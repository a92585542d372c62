"""What many test files share: agreeing on an assertion over ranks, small shard sets, run configs.

Imported as ``from helpers import ...`` (tests/ is on the path); conftest.py keeps the fixtures.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from launch import hpcsgd


def all_ranks(ok: bool) -> bool:
    """True only if ``ok`` holds on every rank: assert on this, so all ranks fail together.

    A plain assert that fails on one rank lets the others run on into the next collective
    and hang; agreeing first keeps every rank on the same path.
    """
    from mpi4py import MPI

    return bool(MPI.COMM_WORLD.allreduce(bool(ok), op=MPI.LAND))


def synthetic_shards(out: Path, parts: int, partition: str = "iid", seed: int = 0, **options) -> Path:
    """Synthetic shards written by this process (256 train and 64 test samples of 4 classes unless ``options``)."""
    from hpcsgd.data import load_source, write_shards

    opts = {"n_train": 256, "n_test": 64, "num_classes": 4, "features": 8, **options}
    write_shards(load_source("synthetic", seed=seed, **opts), parts, partition, out, seed=seed)
    return out


def make_shards(out: Path, parts: int, partition: str = "iid", seed: int = 0, **options) -> Path:
    """:func:`synthetic_shards` for in-process MPI tests: rank 0 writes, everyone waits.

    Also before the write: a test that makes the same shards again (``_config`` twice) must not
    have rank 0 rewrite them while another rank still reads the previous ones.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    comm.Barrier()
    if comm.rank == 0:
        synthetic_shards(out, parts, partition, seed, **options)
    comm.Barrier()
    return out


def digits_shards(out: Path, parts: int = 4, partition: str = "label") -> Path:
    """Shards of scikit-learn's digits, made by ``hpcsgd shard`` as a user makes them."""
    result = hpcsgd("shard", "--source", "digits", "--parts", parts, "--partition", partition, "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def small_run_config(shared_tmp: Path, run: str, **overrides):
    """A 24-step MLP run over label-skewed shards of one chunk per rank, checkpointed every 8 steps."""
    from mpi4py import MPI

    from hpcsgd.config import build_config

    data = make_shards(shared_tmp / "shards", MPI.COMM_WORLD.size, partition="label")
    values = {
        "data": str(data), "run_dir": str(shared_tmp / run), "steps": 24, "batch_size": 8, "lr": 0.2,
        "momentum": 0.9, "model": "mlp", "mlp_hidden": [16], "progress": "none", "eval_every": 0.0,
        "log_every": 2, "checkpoint_every": 8, "seed": 5, "tau": 2, **overrides,
    }
    return build_config(values)


@contextlib.contextmanager
def namespace_cluster(cluster, *up_args):
    """A namespace cluster for the block: ``cluster("up", *up_args)``, and down however it ends.

    ``cluster`` runs tools/cluster under the test file's cluster name; where none can be made
    (exit 77: no root, no namespaces) the test is skipped with tools/cluster's reason.
    """
    try:
        up = cluster("up", *up_args)
        if up.returncode == 77:
            pytest.skip(up.stderr.strip().splitlines()[-1])
        assert up.returncode == 0, up.stderr
        yield
    finally:
        down = cluster("down")
        assert down.returncode in (0, 77), down.stderr


def step_node_1_died(kill: dict) -> int:
    """The step at which node 1 of 3 x 2 ranks (ranks 2, 3) died, from the survivors' summary.

    Asserts what a whole node killed at once must leave: ranks 0, 1, 4, 5 live, coverage 100%
    (spread placement), both ranks recorded as process deaths, and at the same step.
    """
    assert kill["live_rank_ids"] == [0, 1, 4, 5] and kill["coverage"] == 1.0
    records = {r["rank"]: r for r in kill["failure_records"]}
    assert set(records) == {2, 3} and all(r["kind"] == "process death" for r in records.values())
    steps = {r["step"] for r in records.values()}
    assert len(steps) == 1, records  # killed together: gone from the same step
    (step,) = steps
    assert 25 <= step < 400
    return step
