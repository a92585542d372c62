"""Checkpoint/resume under MPI: a resumed run continues the same trajectory bit for bit."""

from __future__ import annotations

import json
import shutil

import h5py
import pytest
import torch

from hpcsgd.train.resume import find_latest
from hpcsgd.errors import CheckpointError
from hpcsgd.train.loop import Trainer

from helpers import all_ranks, small_run_config

pytestmark = pytest.mark.mpi(min_size=1)


def _config(shared_tmp, run, **overrides):
    return small_run_config(shared_tmp, run, **{"algorithm": "rps", "drop_rate": 0.2, **overrides})


def _losses(trainer):
    lines = trainer.metrics.path.read_text().splitlines()
    keep = ("step", "loss", "consensus_distance", "bytes_sent", "messages_dropped", "rounds")
    return [{k: json.loads(x)[k] for k in keep} for x in lines]


def test_resume_continues_bit_for_bit(shared_tmp):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    full = Trainer(_config(shared_tmp, "run"), comm)
    full.run()
    expected_flat = full.api.flat.flat.clone()
    expected = _losses(full)

    # Forget everything after the step-16 checkpoint, as if the job had died at step 17.
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(shared_tmp / "run" / "checkpoints" / "step-00000024")
    comm.Barrier()
    resumed = Trainer(_config(shared_tmp, "run", resume=True), comm)
    resumed.run()
    assert all_ranks(resumed.start_step == 16)
    assert all_ranks(torch.equal(resumed.api.flat.flat, expected_flat))
    assert all_ranks(_losses(resumed) == expected)


def test_incomplete_checkpoint_is_ignored(shared_tmp):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    cfg = _config(shared_tmp, "run", steps=16)
    Trainer(cfg, comm).run()
    comm.Barrier()
    if comm.rank == 0:
        # A checkpoint whose writer died: a torn file, a temporary, no COMPLETE marker.
        torn = shared_tmp / "run" / "checkpoints" / "step-00000020"
        torn.mkdir()
        (torn / "rank-0.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
        (torn / ".rank-1.h5.tmp").write_bytes(b"partial")
    comm.Barrier()
    latest = find_latest(shared_tmp / "run", cfg, comm.size)
    assert all_ranks(latest["step"] == 16)
    with h5py.File(shared_tmp / "run" / "checkpoints" / "step-00000016" / f"rank-{comm.rank}.h5") as f:
        assert all_ranks(f.attrs["step"] == 16)


def test_checkpoint_from_another_config_is_refused(shared_tmp):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    Trainer(_config(shared_tmp, "run", steps=8), comm).run()
    other = _config(shared_tmp, "run", steps=8, lr=0.05, resume=True)
    with pytest.raises(CheckpointError, match="another config") as info:
        Trainer(other, comm).run()
    assert info.value.collective


@pytest.mark.mpi(min_size=2)
def test_resume_after_a_failure_with_reweighting_continues_bit_for_bit(shared_tmp):
    """The failed rank leaves again at once and the survivors re-weight again on resume
    (sampler batch sizes and loss scales are derived, not stored)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    last = comm.size - 1
    flags = dict(algorithm="local", tau=3, q=2, fail=[f"{last}@5"], reweight=True)
    full = Trainer(_config(shared_tmp, "run", **flags), comm)
    full.run()
    alive = comm.rank != last
    expected_flat, expected = full.api.flat.flat.clone(), _losses(full)
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(shared_tmp / "run" / "checkpoints" / "step-00000024")
    comm.Barrier()
    resumed = Trainer(_config(shared_tmp, "run", resume=True, **flags), comm)
    resumed.run()
    assert all_ranks(resumed.start_step == 16)
    assert all_ranks(not alive or (resumed.batches.sampler.local_batch_size, resumed.batches.sampler.sample_weights) == (full.batches.sampler.local_batch_size, full.batches.sampler.sample_weights))
    # Re-weighted: some survivor draws more than q*b, since a chunk lost one of its holders.
    assert all_ranks(comm.allreduce(alive and resumed.batches.sampler.local_batch_size != 2 * 8, op=MPI.LOR))
    assert all_ranks(not alive or torch.equal(resumed.api.flat.flat, expected_flat))
    assert all_ranks(not alive or _losses(resumed) == expected)
