"""Checkpoints in HDF5, written so that a crash at any moment leaves the last one readable.

Layout: ``RUN_DIR/checkpoints/step-00000120/rank-K.h5`` (one file per live rank: each
rank's model, momentum and sampler differ under local SGD) and ``.../COMPLETE``, a small
JSON record (step, ranks, live ranks, the shards' identity, config fingerprint) written by the
first live rank after every rank's file is in place. Each file is written to a temporary name,
fsynced and renamed; a directory without ``COMPLETE`` is ignored on resume, so a rank killed
while writing costs only the checkpoint being written. A write that fails (a full disk) is
agreed on by every rank: the temporary files and the incomplete step are removed, the job ends
with one message, and the previous checkpoint stays as it was. Each rank file carries a
SHA-256 of its arrays; on resume a checkpoint whose record or files are unreadable, truncated
or altered is moved aside (``checkpoints/broken-step-...``) with a warning, and the next older
intact one is used. The stop signals that lead here are in :mod:`hpcsgd.stop`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import torch

from .comm.agree import agree
from .comm.watchdog import WATCHDOG
from .errors import CheckpointError
from .metrics import atomic_write_text

if TYPE_CHECKING:
    from mpi4py import MPI

    from .config import TrainConfig
    from .data.shards import ShardIndex
    from .train import Trainer

EXIT_PREEMPTED = 3  # checkpoint written after SIGTERM/SIGUSR1/SIGINT; `--resume` continues the run
KEEP = 2  # complete checkpoints kept; older ones are removed once a newer one is complete
# Fields that do not change the trajectory: a run may resume with them changed.
_NOT_TRAJECTORY = {"run_dir", "resume", "progress", "threads", "device", "log_every", "eval_every", "eval_train_samples", "grad_diversity", "overlap", "bucket_mb", "checkpoint_every", "data", "overwrite", "collective_timeout"}


class Preempted(Exception):
    """Raised after the checkpoint that a stop signal asked for is on disk."""

    def __init__(self, step: int):
        super().__init__(f"stopped by signal after step {step}; checkpoint written")
        self.step = step


def fingerprint(cfg: "TrainConfig", shards: dict | None = None) -> str:
    """Hash of every config field that shapes the trajectory, and of the shards' content.

    ``shards`` is :func:`shard_identity` of the shards trained on; None gives the fingerprint
    checkpoints written before the shards were part of it carry.
    """
    values = {k: v for k, v in vars(cfg).items() if k not in _NOT_TRAJECTORY}
    if shards is not None:
        values["shards"] = shards["digest"]
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def shard_identity(index: "ShardIndex") -> dict:
    """What names a shard set in messages, and a digest of its chunk and test checksums."""
    digest = hashlib.sha256(json.dumps([list(index.chunk_checksums), index.test_checksum]).encode()).hexdigest()
    return {"path": str(index.path), "source": index.source, "partition": index.partition, "seed": index.seed,
            "parts": index.parts, "digest": digest[:16]}


def _describe_shards(shards: dict) -> str:
    return (f"{shards.get('path')} ({shards.get('source')}, {shards.get('partition')}, seed {shards.get('seed')}, "
            f"P={shards.get('parts')}, content {shards.get('digest')})")


def _step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def save(trainer: "Trainer", step: int) -> Path:
    """Write every live rank's state after ``step`` steps (collective over live ranks).

    Three agreements (rank 0 makes the folder; every rank writes its file; rank 0 writes
    COMPLETE), so a failure anywhere ends every rank with the same CheckpointError, after the
    incomplete step is removed. A step already complete (a resumed run saving the step it
    resumed from) is left as it is.
    """
    coll = trainer.coll
    directory = _step_dir(trainer.run_dir, step)
    if (directory / "COMPLETE").exists():
        return directory
    what = f"checkpoint at step {step}"
    shards = shard_identity(trainer.index)

    def make() -> None:
        if coll.rank == 0:
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CheckpointError(_cannot_write(directory, exc, trainer.run_dir)) from None

    def complete() -> None:
        if coll.rank == 0:
            record = {
                "step": step,
                "ranks": trainer.P,
                "live_world": list(trainer.live_world),
                "adopted": {str(c): r for c, r in trainer.adopted.items()},
                "fingerprint": fingerprint(trainer.cfg, shards),
                "shards": shards,
                "wall_s": float(_elapsed(trainer)),
            }
            try:
                atomic_write_text(directory / "COMPLETE", json.dumps(record) + "\n")
            except OSError as exc:
                raise CheckpointError(_cannot_write(directory / "COMPLETE", exc, trainer.run_dir)) from None
            _prune(trainer.run_dir)

    agree(coll.comm, make, what)
    try:
        agree(coll.comm, lambda: _write_rank_file(trainer, directory, step, shards), what)
        agree(coll.comm, complete, what)
    except CheckpointError:
        if coll.rank == 0:
            shutil.rmtree(directory, ignore_errors=True)  # incomplete: no COMPLETE, so never resumed from
        if getattr(trainer, "stop", None) is not None:
            trainer.stop.drain()  # every rank is here: finish the step's stop-flag exchange, leave none pending
        raise
    return directory


def _write_rank_file(trainer: "Trainer", directory: Path, step: int, shards: dict) -> None:
    """This rank's state to ``rank-K.h5`` through a temporary name; on failure nothing is left."""
    path = directory / f"rank-{trainer.rank}.h5"
    tmp = directory / f".rank-{trainer.rank}.h5.tmp"
    momentum = [
        s["momentum_buffer"].reshape(-1)
        for s in (trainer.optimizer.state.get(p, {}) for p in trainer.model.parameters())
        if s.get("momentum_buffer") is not None
    ]
    arrays = {"flat": trainer.flat.flat.detach().cpu().numpy(), "torch_rng": torch.get_rng_state().numpy()}
    if momentum:
        arrays["momentum"] = torch.cat(momentum).detach().cpu().numpy()
    try:
        with h5py.File(tmp, "w") as f:
            for name, array in arrays.items():
                f[name] = array
            f.attrs["sha256"] = _digest(arrays)
            f.attrs["step"] = step
            f.attrs["fingerprint"] = fingerprint(trainer.cfg, shards)
            f.attrs["ranks"] = trainer.P
            f.attrs["live_world"] = json.dumps(trainer.live_world)
            f.attrs["sampler"] = json.dumps(trainer.sampler.state_dict())
            f.attrs["counters"] = json.dumps(trainer.coll.counters.as_dict())
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
    except (OSError, RuntimeError) as exc:  # h5py reports a full disk as OSError or RuntimeError
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise CheckpointError(_cannot_write(path, exc, trainer.run_dir)) from None


def _digest(arrays: dict) -> str:
    """SHA-256 over the arrays of a rank file, in name order (what "intact" is checked against)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(memoryview(np.ascontiguousarray(arrays[name])).cast("B"))
    return h.hexdigest()


def _cannot_write(path: Path, exc: BaseException, run_dir: Path) -> str:
    """Why a checkpoint write failed, what is left, and what to do."""
    code = getattr(exc, "errno", None)
    # h5py's strerror is a long multi-line HDF5 trace; the errno says it in three words.
    reason = os.strerror(code) if code else (getattr(exc, "strerror", None) or str(exc))
    try:
        free = f"; {shutil.disk_usage(path.parent if path.parent.exists() else run_dir).free / 2**20:.1f} MiB free there"
    except OSError:
        free = ""
    previous = _complete_dirs(run_dir)
    kept = (f"the previous checkpoint {previous[-1].name} is intact: free space and rerun with --resume"
            if previous else "no earlier checkpoint exists: free space and rerun")
    return f"cannot write {path}: {reason}{free}; {kept}"


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


def find_latest(
    run_dir: Path, cfg: "TrainConfig", ranks: int, shards: "ShardIndex | None" = None, comm: "MPI.Comm | None" = None
) -> dict | None:
    """The newest intact checkpoint's record, or None (then training starts fresh).

    A complete checkpoint whose record or rank files are unreadable, truncated or fail their
    checksum is broken: it is moved aside to ``checkpoints/broken-step-...`` with a warning
    naming it, and the next older one is tried. ``ranks`` is the run's rank count P (its
    number of chunks); the job resuming it may have fewer (see :class:`hpcsgd.train.Trainer`),
    so that is checked there. ``shards`` defaults to the index in ``cfg.data``. With
    ``comm``, this is collective: each rank checks a share of the rank files and all agree.
    """
    if shards is None:
        from .data import read_index

        shards = read_index(cfg.data)
    run_dir = Path(run_dir)
    broken: list[tuple[Path, str]] = []
    for directory in reversed(_complete_dirs(run_dir)):
        problem = _check_intact(directory, comm)
        if problem is None:
            meta = _read_record(directory)
            _check_fits(meta, directory, cfg, ranks, shard_identity(shards))
            if broken:
                _set_aside(broken, directory, comm)
            return meta
        broken.append((directory, problem))
    if broken:
        listed = "; ".join(f"{d.name}: {why}" for d, why in broken)
        raise CheckpointError(
            f"no intact checkpoint in {run_dir / 'checkpoints'} ({listed}); start afresh with --overwrite instead "
            f"of --resume (the run is moved aside, not deleted)"
        )
    return None


def _read_record(directory: Path) -> dict:
    record = json.loads((directory / "COMPLETE").read_text())
    return {
        "dir": str(directory),
        "step": int(record["step"]),
        "fingerprint": str(record["fingerprint"]),
        "ranks": int(record["ranks"]),
        "live_world": [int(r) for r in record["live_world"]],
        "adopted": {int(c): int(r) for c, r in record.get("adopted", {}).items()},
        "wall_s": float(record["wall_s"]),
        "shards": record.get("shards"),
    }


def _check_intact(directory: Path, comm: "MPI.Comm | None") -> str | None:
    """Why ``directory`` cannot be resumed from, or None; with ``comm``, every rank's answer."""
    try:
        meta = _read_record(directory)
    except (OSError, KeyError, TypeError, ValueError, AttributeError) as exc:
        problem: str | None = f"its COMPLETE record is unreadable ({type(exc).__name__}: {exc})"
    else:
        files = meta["live_world"]
        mine = files if comm is None else files[comm.rank :: comm.size]
        problem = next(filter(None, (_check_rank_file(directory, r, meta["step"]) for r in mine)), None)
    if comm is None or comm.size == 1:
        return problem
    with WATCHDOG.guard("Allgather [checkpoint integrity]", comm):
        problems = comm.allgather(problem)
    return next(filter(None, problems), None)


def _check_rank_file(directory: Path, rank: int, step: int) -> str | None:
    """Why one rank file is not intact (missing, unreadable, another step, altered), or None."""
    path = directory / f"rank-{rank}.h5"
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        with h5py.File(path, "r") as f:
            if int(f.attrs["step"]) != step:
                return f"{path.name} holds step {int(f.attrs['step'])}, its record says {step}"
            arrays = {name: np.asarray(f[name]) for name in f}
            expected = f.attrs.get("sha256")
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        return f"{path.name} is unreadable or truncated ({exc})"
    if expected is not None and _digest(arrays) != str(expected):
        return f"{path.name} fails its checksum (altered or corrupted)"
    return None


def _check_fits(meta: dict, directory: Path, cfg: "TrainConfig", ranks: int, shards: dict) -> None:
    """Refuse a checkpoint of another rank count, other shards or another config, naming both."""
    if meta["ranks"] != ranks:
        raise CheckpointError(
            f"checkpoint {directory} was written by a run of {meta['ranks']} ranks, these shards have "
            f"P={ranks} chunks: resume with the shards the run started with"
        )
    written = meta.get("shards")
    if written is not None and written.get("digest") != shards["digest"]:
        raise CheckpointError(
            f"checkpoint {directory} was written on other shards: {_describe_shards(written)}; this run reads "
            f"{_describe_shards(shards)}: resume with the shards the run started with, or start a new run"
        )
    expected = fingerprint(cfg, shards if written is not None else None)
    if meta["fingerprint"] != expected:
        raise CheckpointError(
            f"checkpoint {directory} was written by a run with another config; "
            f"use a new run directory or the original config"
        )


def _set_aside(broken: list[tuple[Path, str]], chosen: Path, comm: "MPI.Comm | None") -> None:
    """Warn about, and move aside, the broken checkpoints newer than the one resumed from.

    Moved, not left: pruning keeps the newest two complete checkpoints, and must not keep a
    broken one in place of the intact one being resumed from.
    """
    if comm is not None and comm.rank != 0:
        return
    for directory, why in broken:
        target, n = directory.with_name(f"broken-{directory.name}"), 1
        while target.exists():
            n += 1
            target = directory.with_name(f"broken-{directory.name}-{n}")
        try:
            os.replace(directory, target)
            where = f"moved to {target}"
        except OSError as exc:
            where = f"left in place ({exc.strerror})"
        print(f"hpcsgd: warning: checkpoint {directory} is broken: {why}; {where}; resuming from the "
              f"older intact checkpoint {chosen.name}", file=sys.stderr, flush=True)


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
