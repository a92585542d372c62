"""Checkpoints of a dict of stateful parts: ``{"model": model, "optimizer": opt, ...}``.

Every part has ``state_dict()`` and ``load_state_dict()``; this module never reads their
fields. The layout is the CLI's: ``RUN_DIR/checkpoints/step-00000120/rank-K.h5`` (one HDF5
file per rank, written to a temporary name, fsynced and renamed) and ``COMPLETE``, written by
rank 0 after every rank's file is in place; a directory without it is ignored, so a rank
killed while writing costs only that checkpoint. The newest two complete ones are kept.

In a file, each part's tensors and arrays are datasets ``PART/N`` and the rest of its state
dict (numbers, strings, lists, dicts with any keys) is one JSON attribute that says where
each tensor goes back.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import torch

from .errors import CheckpointError
from .metrics import atomic_write_text

KEEP = 2  # complete checkpoints kept


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


def complete_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(d for d in root.glob("step-*") if (d / "COMPLETE").exists())


def _write_rank_file(path: Path, parts: dict, step: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["step"] = step
        for name, part in parts.items():
            arrays: list = []
            skeleton = _encode(part.state_dict(), arrays)
            group = f.create_group(name)
            group.attrs["state"] = json.dumps(skeleton)
            for i, array in enumerate(arrays):
                group[str(i)] = array
        f.flush()
        os.fsync(f.id.get_vfd_handle())
    os.replace(tmp, path)


def save_checkpoint(run_dir, world, parts: dict, step: int) -> Path:
    """Write every rank's ``parts`` after ``step`` steps (collective over ``world.comm``).

    Args:
        run_dir: the run directory; checkpoints go to ``run_dir/checkpoints``.
        world: from :func:`hpcsgd.init` (or a strategy's world after failures: any object
            with ``comm`` and ``rank``).
        parts: ``{name: object with state_dict()}``, the same names on every rank.
        step: steps taken; names the checkpoint.

    Returns:
        The checkpoint directory.
    """
    comm, directory = world.comm, step_dir(run_dir, step)
    try:
        if comm.rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
        comm.Barrier()
        _write_rank_file(directory / f"rank-{world.rank}.h5", parts, step)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {directory}: {exc.strerror or exc}") from None
    comm.Barrier()  # every rank's file is in place before the checkpoint counts
    if comm.rank == 0:
        record = {"step": step, "ranks": comm.size, "parts": sorted(parts)}
        atomic_write_text(directory / "COMPLETE", json.dumps(record) + "\n")
        for old in complete_dirs(run_dir)[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    return directory


def load_checkpoint(run_dir, world, parts: dict) -> int | None:
    """Load every part of this rank from the newest complete checkpoint; returns its step.

    Returns None (and loads nothing) when ``run_dir`` has no complete checkpoint. Tensors
    come back on the CPU; ``load_state_dict`` of models and optimizers copies them where
    they belong.
    """
    complete = complete_dirs(run_dir)
    if not complete:
        return None
    path = complete[-1] / f"rank-{world.rank}.h5"
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


__all__ = ["complete_dirs", "load_checkpoint", "save_checkpoint", "step_dir"]
