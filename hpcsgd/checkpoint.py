"""Checkpoints in HDF5, written so that a crash at any moment leaves the last one readable.

Layout: ``RUN_DIR/checkpoints/step-00000120/rank-K.h5`` (one file per live rank: each
rank's model, momentum and sampler differ under local SGD) and ``.../COMPLETE``, a small
JSON record (step, ranks, live ranks, config fingerprint) written by the first live rank
after every rank's file is in place. Each file is written to a temporary name, fsynced and
renamed; a directory without ``COMPLETE`` is ignored on resume, so a rank killed while
writing costs only the checkpoint being written. The stop signals that lead here are
in :mod:`hpcsgd.stop`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import torch

from .errors import CheckpointError
from .metrics import atomic_write_text

if TYPE_CHECKING:
    from .config import TrainConfig
    from .train import Trainer

EXIT_PREEMPTED = 3  # checkpoint written after SIGTERM/SIGUSR1; `--resume` continues the run
KEEP = 2  # complete checkpoints kept; older ones are removed once a newer one is complete
# Fields that do not change the trajectory: a run may resume with them changed.
_NOT_TRAJECTORY = {"run_dir", "resume", "progress", "threads", "device", "log_every", "eval_every", "eval_train_samples", "grad_diversity", "overlap", "bucket_mb", "checkpoint_every", "data"}


class Preempted(Exception):
    """Raised after the checkpoint that a stop signal asked for is on disk."""

    def __init__(self, step: int):
        super().__init__(f"stopped by signal after step {step}; checkpoint written")
        self.step = step


def fingerprint(cfg: "TrainConfig") -> str:
    """Hash of every config field that shapes the trajectory."""
    values = {k: v for k, v in vars(cfg).items() if k not in _NOT_TRAJECTORY}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def _step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def save(trainer: "Trainer", step: int) -> Path:
    """Write every live rank's state after ``step`` steps (collective over live ranks)."""
    coll = trainer.coll
    directory = _step_dir(trainer.run_dir, step)
    if coll.rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
    coll.comm.Barrier()
    path = directory / f"rank-{trainer.rank}.h5"
    tmp = directory / f".rank-{trainer.rank}.h5.tmp"
    momentum = [
        s["momentum_buffer"].reshape(-1)
        for s in (trainer.optimizer.state.get(p, {}) for p in trainer.model.parameters())
        if s.get("momentum_buffer") is not None
    ]
    with h5py.File(tmp, "w") as f:
        f["flat"] = trainer.flat.flat.detach().cpu().numpy()
        if momentum:
            f["momentum"] = torch.cat(momentum).detach().cpu().numpy()
        f["torch_rng"] = torch.get_rng_state().numpy()
        f.attrs["step"] = step
        f.attrs["fingerprint"] = fingerprint(trainer.cfg)
        f.attrs["ranks"] = trainer.P
        f.attrs["live_world"] = json.dumps(trainer.live_world)
        f.attrs["sampler"] = json.dumps(trainer.sampler.state_dict())
        f.attrs["counters"] = json.dumps(coll.counters.as_dict())
        f.attrs["timers"] = json.dumps(vars(trainer.timers))
        f.attrs["loss_window"] = json.dumps(trainer.loss_window)
        f.attrs["run_totals"] = json.dumps({
            "skipped_steps": trainer.skipped_steps,
            "failed_counters": trainer.failed_counters.tolist(),
            "diversity_sums": trainer.diversity_sums.tolist(),
        })
        f.attrs["wall_s"] = float(_elapsed(trainer))
        f.flush()
        os.fsync(f.id.get_vfd_handle())
    os.replace(tmp, path)
    coll.comm.Barrier()  # every rank's file is in place before the checkpoint counts
    if coll.rank == 0:
        record = {
            "step": step,
            "ranks": trainer.P,
            "live_world": list(trainer.live_world),
            "adopted": {str(c): r for c, r in trainer.adopted.items()},
            "fingerprint": fingerprint(trainer.cfg),
            "wall_s": float(_elapsed(trainer)),
        }
        atomic_write_text(directory / "COMPLETE", json.dumps(record) + "\n")
        _prune(trainer.run_dir)
    return directory


def _elapsed(trainer: "Trainer") -> float:
    import time

    return time.perf_counter() - trainer.t_start if hasattr(trainer, "t_start") else 0.0


def _prune(run_dir: Path) -> None:
    complete = _complete_dirs(run_dir)
    for old in complete[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)


def _complete_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(d for d in root.glob("step-*") if (d / "COMPLETE").exists())


def find_latest(run_dir: Path, cfg: "TrainConfig", ranks: int) -> dict | None:
    """The newest complete checkpoint's record, or None (then training starts fresh).

    ``ranks`` is the run's rank count P (its number of chunks); the job resuming it may
    have fewer (see :class:`hpcsgd.train.Trainer`), so that is checked there.
    """
    complete = _complete_dirs(Path(run_dir))
    if not complete:
        return None
    directory = complete[-1]
    path = directory / "COMPLETE"
    try:
        record = json.loads(path.read_text())
        meta = {
            "dir": str(directory),
            "step": int(record["step"]),
            "fingerprint": str(record["fingerprint"]),
            "ranks": int(record["ranks"]),
            "live_world": [int(r) for r in record["live_world"]],
            "adopted": {int(c): int(r) for c, r in record.get("adopted", {}).items()},
            "wall_s": float(record["wall_s"]),
        }
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint record {path} is unreadable: {exc!r}") from None
    if meta["fingerprint"] != fingerprint(cfg):
        raise CheckpointError(
            f"checkpoint {directory} was written by a run with another config; "
            f"use a new run directory or the original config"
        )
    if meta["ranks"] != ranks:
        raise CheckpointError(
            f"checkpoint {directory} was written by a run of {meta['ranks']} ranks, these shards have "
            f"P={ranks} chunks: resume with the shards the run started with"
        )
    return meta


def restore(trainer: "Trainer", meta: dict) -> int:
    """Load this rank's state from ``meta['dir']``; returns the step to continue from."""
    path = Path(meta["dir"]) / f"rank-{trainer.rank}.h5"
    try:
        with h5py.File(path, "r") as f:
            flat = np.asarray(f["flat"])
            if flat.shape != (trainer.flat.numel,):
                raise CheckpointError(
                    f"checkpoint {path} holds a model of {flat.size} values, this model has {trainer.flat.numel}"
                )
            trainer.flat.flat.copy_(torch.from_numpy(flat))
            if "momentum" in f:
                _restore_momentum(trainer, torch.from_numpy(np.asarray(f["momentum"])))
            torch.set_rng_state(torch.from_numpy(np.asarray(f["torch_rng"])))
            trainer.sampler.load_state_dict(json.loads(f.attrs["sampler"]), fresh=list(trainer.adopted))
            trainer.coll.counters.load(json.loads(f.attrs["counters"]))
            for key, value in json.loads(f.attrs["timers"]).items():
                setattr(trainer.timers, key, value)
            trainer.resume_loss_window = json.loads(f.attrs["loss_window"])
            totals = json.loads(f.attrs.get("run_totals", "{}"))  # absent in older checkpoints
            trainer.skipped_steps = int(totals.get("skipped_steps", 0))
            trainer.failed_counters = np.asarray(totals.get("failed_counters", [0.0] * 4), dtype=np.float64)
            trainer.diversity_sums = np.asarray(totals.get("diversity_sums", [0.0] * 3), dtype=np.float64)
            return int(f.attrs["step"])
    except (OSError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from None


def _restore_momentum(trainer: "Trainer", packed: torch.Tensor) -> None:
    offset = 0
    for p in trainer.model.parameters():
        n = p.numel()
        buf = packed[offset : offset + n].view_as(p).to(p.device).clone()
        trainer.optimizer.state[p]["momentum_buffer"] = buf
        offset += n
    if offset != packed.numel():
        raise CheckpointError("checkpoint momentum does not match the model's parameters")
