"""Checkpoints under MPI when things go wrong: a full disk, a broken newest checkpoint."""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import hpcsgd.checkpoint as ckpt
from hpcsgd.errors import CheckpointError
from hpcsgd.train.loop import Trainer

from helpers import all_ranks, small_run_config

pytestmark = pytest.mark.mpi(min_size=1)


def _config(shared_tmp, run, **overrides):
    return small_run_config(shared_tmp, run, **{"algorithm": "local", **overrides})


def _records(trainer):
    keep = ("step", "loss", "consensus_distance", "rounds")
    return [{k: json.loads(x)[k] for k in keep} for x in trainer.metrics.path.read_text().splitlines()]


def _reference(shared_tmp):
    """An uninterrupted run: its final model and metrics are what every recovery must give."""
    full = Trainer(_config(shared_tmp, "reference"), _world())
    full.run()
    return full.api.flat.flat.clone(), _records(full)


def _world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _leftovers(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if ".tmp" in p.name or p.name.startswith(".rank-"))


def test_disk_full_during_a_checkpoint_fails_cleanly_and_the_resume_is_bit_exact(shared_tmp, monkeypatch):
    """The last rank's checkpoint file hits ENOSPC half-written at step 16: every rank raises the
    same CheckpointError, no temporary or partial file is left, step 8 stays the newest complete
    checkpoint, and resuming from it ends exactly where an uninterrupted run ends."""
    comm = _world()
    expected_flat, expected = _reference(shared_tmp)
    real_file = h5py.File

    def full_disk(name, mode="r", *args, **kwargs):
        if mode == "w" and "step-00000016" in str(name) and comm.rank == comm.size - 1:
            Path(name).write_bytes(b"\x89HDF\r\n\x1a\n partial")  # what a full disk leaves half-written
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_file(name, mode, *args, **kwargs)

    monkeypatch.setattr(ckpt.h5py, "File", full_disk)
    with pytest.raises(CheckpointError) as info:
        Trainer(_config(shared_tmp, "run"), comm).run()
    monkeypatch.undo()
    message = str(info.value)
    assert info.value.collective
    assert message.startswith("checkpoint at step 16: cannot write") and "No space left on device" in message
    assert "the previous checkpoint step-00000008 is intact" in message
    assert comm.size == 1 or message.endswith(f"(rank {comm.size - 1})")  # the rank whose disk was full
    run = shared_tmp / "run"
    comm.Barrier()
    assert all_ranks(_leftovers(run) == [])
    assert all_ranks(not (run / "checkpoints" / "step-00000016").exists())
    assert all_ranks([d.name for d in ckpt.complete_dirs(run)] == ["step-00000008"])

    resumed = Trainer(_config(shared_tmp, "run", resume=True), comm)
    resumed.run()
    assert all_ranks(resumed.start_step == 8)
    assert all_ranks(torch.equal(resumed.api.flat.flat, expected_flat))
    assert all_ranks(_records(resumed) == expected)


def _flip_a_byte_of_flat(directory: Path, rank: int) -> None:
    path = directory / f"rank-{rank}.h5"
    with h5py.File(path, "r") as f:
        offset = f["model/0"].id.get_offset()  # the first weight tensor of the model
    data = bytearray(path.read_bytes())
    data[offset + 3] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(directory: Path, rank: int) -> None:
    path = directory / f"rank-{rank}.h5"
    path.write_bytes(path.read_bytes()[:2000])


def _garble_record(directory: Path, rank: int) -> None:
    (directory / "COMPLETE").write_text('{"step": 24, "ran')


@pytest.mark.parametrize(
    "damage, why",
    [(_flip_a_byte_of_flat, "fails its checksum"), (_truncate, "unreadable or truncated"),
     (_garble_record, "COMPLETE record is unreadable")],
)
def test_resume_falls_back_to_the_newest_intact_checkpoint_with_a_warning(shared_tmp, capsys, damage, why):
    comm = _world()
    expected_flat, expected = _reference(shared_tmp)
    Trainer(_config(shared_tmp, "run"), comm).run()
    run = shared_tmp / "run"
    newest = run / "checkpoints" / "step-00000024"  # the two kept: steps 16 and 24
    comm.Barrier()
    if comm.rank == 0:
        damage(newest, comm.size - 1)
    comm.Barrier()
    capsys.readouterr()

    resumed = Trainer(_config(shared_tmp, "run", resume=True), comm)
    resumed.run()
    err = capsys.readouterr().err
    assert all_ranks(resumed.start_step == 16)
    assert all_ranks(comm.rank != 0 or (f"checkpoint {newest} is broken" in err and why in err
                                        and "resuming from the older intact checkpoint step-00000016" in err))
    assert all_ranks((run / "checkpoints" / "broken-step-00000024").is_dir())
    assert all_ranks(torch.equal(resumed.api.flat.flat, expected_flat))
    assert all_ranks(_records(resumed) == expected)


def test_no_intact_checkpoint_is_an_error_naming_each(shared_tmp):
    comm = _world()
    Trainer(_config(shared_tmp, "run", steps=16), comm).run()
    run = shared_tmp / "run"
    comm.Barrier()
    if comm.rank == 0:
        for step in (8, 16):
            _truncate(run / "checkpoints" / f"step-{step:08d}", 0)
    comm.Barrier()
    with pytest.raises(CheckpointError, match="no intact checkpoint in .*step-00000016: rank-0.h5 is unreadable"
                                              ".*step-00000008: rank-0.h5 is unreadable.*--overwrite") as info:
        Trainer(_config(shared_tmp, "run", steps=16, resume=True), comm).run()
    assert info.value.collective


def test_rank_files_carry_a_checksum_of_their_arrays(shared_tmp):
    comm = _world()
    Trainer(_config(shared_tmp, "run", steps=8), comm).run()
    directory = shared_tmp / "run" / "checkpoints" / "step-00000008"
    with h5py.File(directory / f"rank-{comm.rank}.h5", "r") as f:
        arrays = {}
        f.visititems(lambda name, obj: arrays.__setitem__(name, np.asarray(obj)) if isinstance(obj, h5py.Dataset) else None)
        digest = hashlib.sha256()
        for name in sorted(arrays):
            digest.update(name.encode())
            digest.update(memoryview(np.ascontiguousarray(arrays[name])).cast("B"))
        ok = f.attrs["sha256"] == digest.hexdigest()
        parts = set(f)
    assert all_ranks(ok and parts == {"model", "optimizer", "rng", "sampler", "strategy", "totals"})
    assert all_ranks(any(name.startswith("optimizer/") for name in arrays))  # momentum buffers are datasets
    assert all_ranks(ckpt.newest_intact(shared_tmp / "run", comm)["step"] == 8)
