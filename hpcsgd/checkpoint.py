"""Checkpoints of a dict of stateful parts, in HDF5, written so that a crash leaves the last one readable.

The CLI and the public :func:`hpcsgd.save_checkpoint` write the same format. Layout:
``RUN_DIR/checkpoints/step-00000120/rank-K.h5`` (one file per live rank: under local SGD
every rank's model, momentum and sampler differ) and ``.../COMPLETE``, a small JSON record
(step, ranks, live ranks, the parts; for the CLI also the shards' identity and the config
fingerprint) written by the first live rank after every rank's file is in place. In a rank
file each part's tensors and arrays are datasets ``PART/N``, and the rest of its state dict
is one JSON attribute that says where each tensor goes back. Each file is written to a
temporary name, fsynced and renamed; a directory without ``COMPLETE`` is ignored, so a rank
killed while writing costs only the checkpoint being written. A write that fails (a full
disk) is agreed on by every rank: the temporary files and the incomplete step are removed,
every rank raises the same CheckpointError, and the previous checkpoint stays as it was.
Each rank file carries a SHA-256 of its arrays; a checkpoint whose record or files are
unreadable, truncated or altered is moved aside (``checkpoints/broken-step-...``) with a
warning, and the next older intact one is used. This module reads no part's fields: each
part has ``state_dict()`` and ``load_state_dict()``. The stop signals are in :mod:`hpcsgd.stop`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
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

EXIT_PREEMPTED = 3  # checkpoint written after SIGTERM/SIGUSR1/SIGINT; `--resume` continues the run
KEEP = 2  # complete checkpoints kept; older ones are removed once a newer one is complete
# Fields that do not change the trajectory: a run may resume with them changed.
# ranks_per_node is not here for another reason: the R a run started with is kept in its record
# and a resume uses that one (see hpcsgd.assembly.resolve_placement).
_NOT_TRAJECTORY = {"run_dir", "resume", "progress", "threads", "device", "log_every", "eval_every", "eval_train_samples", "grad_diversity", "overlap", "bucket_mb", "checkpoint_every", "data", "overwrite", "collective_timeout", "ranks_per_node"}


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
    if values.get("placement") == "cyclic":
        del values["placement"]  # the default: checkpoints written before the key existed still fit
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



class TorchRNG:
    """torch's global CPU random state as a checkpoint part."""

    def state_dict(self) -> dict:
        return {"state": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["state"])


def _encode(value, arrays: list):
    """``value`` as JSON-able data; tensors and arrays go to ``arrays`` and leave a reference."""
    if isinstance(value, torch.Tensor):
        arrays.append(value.detach().cpu().numpy())
        return {"__tensor__": len(arrays) - 1, "device": str(value.device)}
    if isinstance(value, np.ndarray):
        arrays.append(value)
        return {"__array__": len(arrays) - 1}
    if isinstance(value, dict):
        return {"__dict__": [[_encode(k, arrays), _encode(v, arrays)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, arrays) for v in value]}
    if isinstance(value, list):
        return [_encode(v, arrays) for v in value]
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(f"cannot checkpoint a value of type {type(value).__name__} in a state_dict")


def _decode(value, arrays):
    if isinstance(value, list):
        return [_decode(v, arrays) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return torch.from_numpy(np.asarray(arrays[str(value["__tensor__"])]))
    if "__array__" in value:
        return np.asarray(arrays[str(value["__array__"])])
    if "__tuple__" in value:
        return tuple(_decode(v, arrays) for v in value["__tuple__"])
    return {_decode(k, arrays): _decode(v, arrays) for k, v in value["__dict__"]}


def step_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint after ``step`` steps lives."""
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def save(run_dir: Path, comm, rank: int, parts: dict, step: int, record: dict,
         on_error: Callable[[], None] | None = None) -> Path:
    """Write every live rank's ``parts`` after ``step`` steps (collective over ``comm``).

    ``rank`` names this rank's file; ``record`` (``ranks``, ``live_world`` and what the
    caller checks on resume) goes to ``COMPLETE``. Three agreements (rank 0 makes the folder;
    every rank writes its file; rank 0 writes COMPLETE), so a failure anywhere ends every
    rank with the same CheckpointError, after the incomplete step is removed and
    ``on_error`` ran. A step already complete (a resumed run saving the step it resumed
    from) is left as it is.
    """
    run_dir = Path(run_dir)
    directory = step_dir(run_dir, step)
    if (directory / "COMPLETE").exists():
        return directory
    what = f"checkpoint at step {step}"
    record = {"step": step, **record, "parts": sorted(parts)}

    def make() -> None:
        if comm.rank == 0:
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CheckpointError(_cannot_write(directory, exc, run_dir)) from None

    def complete() -> None:
        if comm.rank == 0:
            try:
                atomic_write_text(directory / "COMPLETE", json.dumps(record) + "\n")
            except OSError as exc:
                raise CheckpointError(_cannot_write(directory / "COMPLETE", exc, run_dir)) from None
            _prune(run_dir)

    agree(comm, make, what)
    try:
        agree(comm, lambda: _write_rank_file(run_dir, directory, rank, parts, record), what)
        agree(comm, complete, what)
    except CheckpointError:
        if comm.rank == 0:
            shutil.rmtree(directory, ignore_errors=True)  # incomplete: no COMPLETE, so never resumed from
        if on_error is not None:
            on_error()
        raise
    return directory


def _write_rank_file(run_dir: Path, directory: Path, rank: int, parts: dict, record: dict) -> None:
    """This rank's parts to ``rank-K.h5`` through a temporary name; on failure nothing is left."""
    path = directory / f"rank-{rank}.h5"
    tmp = directory / f".rank-{rank}.h5.tmp"
    states = {}
    for name, part in parts.items():
        found: list = []
        states[name] = (json.dumps(_encode(part.state_dict(), found)), found)
    arrays = {f"{name}/{i}": a for name, (_, found) in states.items() for i, a in enumerate(found)}
    try:
        with h5py.File(tmp, "w") as f:
            for name, (skeleton, _) in states.items():
                f.create_group(name).attrs["state"] = skeleton
            for name, array in arrays.items():
                f[name] = array
            f.attrs["sha256"] = _digest(arrays)
            f.attrs["step"] = record["step"]
            f.attrs["record"] = json.dumps(record)
            f.flush()
            os.fsync(f.id.get_vfd_handle())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # h5py reports a full disk as OSError or RuntimeError
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise CheckpointError(_cannot_write(path, exc, run_dir)) from None


def _arrays(f: "h5py.File") -> dict:
    """Every dataset of a rank file by its path (``PART/N``)."""
    found = {}
    f.visititems(lambda name, obj: found.__setitem__(name, np.asarray(obj)) if isinstance(obj, h5py.Dataset) else None)
    return found


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
    previous = complete_dirs(run_dir)
    kept = (f"the previous checkpoint {previous[-1].name} is intact: free space and rerun with --resume"
            if previous else "no earlier checkpoint exists: free space and rerun")
    return f"cannot write {path}: {reason}{free}; {kept}"


def _prune(run_dir: Path) -> None:
    complete = complete_dirs(run_dir)
    for old in complete[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)


def complete_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(d for d in root.glob("step-*") if (d / "COMPLETE").exists())


def find_latest(
    run_dir: Path, cfg: "TrainConfig", ranks: int, shards: "ShardIndex | None" = None, comm: "MPI.Comm | None" = None
) -> dict | None:
    """The newest intact checkpoint's record for ``hpcsgd train --resume``, or None (start fresh).

    As :func:`newest_intact`, and the checkpoint must fit: ``ranks`` is the run's rank count
    P (its number of chunks; the job resuming it may have fewer, see
    :class:`~hpcsgd.membership.Membership`), the same shards (``shards`` defaults to the index
    in ``cfg.data``) and a config with the same trajectory.
    """
    if shards is None:
        from .data import read_index

        shards = read_index(cfg.data)
    return newest_intact(run_dir, comm, lambda meta, directory: _check_fits(meta, directory, cfg, ranks,
                                                                             shard_identity(shards)))


def newest_intact(run_dir: Path, comm: "MPI.Comm | None" = None,
                  check: Callable[[dict, Path], None] | None = None) -> dict | None:
    """The newest intact checkpoint's record (``dir``, ``step``, ...), or None when there is none.

    A complete checkpoint whose record or rank files are unreadable, truncated or fail their
    checksum is broken: it is moved aside to ``checkpoints/broken-step-...`` with a warning
    naming it, and the next older one is tried (after ``check`` accepted the one found). With
    ``comm``, this is collective: each rank checks a share of the rank files and all agree.
    """
    run_dir = Path(run_dir)
    broken: list[tuple[Path, str]] = []
    for directory in reversed(complete_dirs(run_dir)):
        problem = _check_intact(directory, comm)
        if problem is None:
            meta = _read_record(directory)
            if check is not None:
                check(meta, directory)
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
        "fingerprint": record.get("fingerprint"),
        "ranks": int(record["ranks"]),
        "live_world": [int(r) for r in record.get("live_world", range(int(record["ranks"])))],
        "adopted": {int(c): int(r) for c, r in record.get("adopted", {}).items()},
        "placement": record.get("placement", "cyclic"),
        "ranks_per_node": record.get("ranks_per_node"),
        "wall_s": float(record.get("wall_s", 0.0)),
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
            arrays = _arrays(f)
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


def read_part(path: Path, name: str):
    """The state dict of part ``name`` in the rank file ``path`` (e.g. a run's ``model``), tensors on the CPU."""
    with h5py.File(path, "r") as f:
        return _decode(json.loads(f[name].attrs["state"]), f[name])


def restore(meta: dict, rank: int, parts: dict) -> int:
    """Load this rank's ``parts`` from the checkpoint ``meta`` names; returns its step."""
    path = Path(meta["dir"]) / f"rank-{rank}.h5"
    try:
        with h5py.File(path, "r") as f:
            missing = sorted(set(parts) - set(f))
            if missing:
                raise CheckpointError(f"checkpoint {path} has no part(s) {', '.join(missing)} (it has {', '.join(f)})")
            for name, part in parts.items():
                group = f[name]
                part.load_state_dict(_decode(json.loads(group.attrs["state"]), group))
            return int(f.attrs["step"])
    except (OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from None
    except RuntimeError as exc:  # torch's load_state_dict: another model or optimizer
        raise CheckpointError(f"checkpoint {path} does not fit: {exc}") from None
