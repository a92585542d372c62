"""Checkpoints of a dict of stateful parts, in HDF5, written so that a crash leaves the last one readable.

The CLI and the public :func:`hpcsgd.save_checkpoint` write the same format. Layout:
``RUN_DIR/checkpoints/step-00000120/rank-K.h5`` (one file per live rank: under local SGD
every rank's model, momentum and sampler differ) and ``.../COMPLETE``, a small JSON record
(step, ranks, live ranks, the parts, and what the caller adds: ``hpcsgd train`` adds the
shards' identity and the config fingerprint, and decides what fits a resume, in
:mod:`hpcsgd.train.resume`) written by the first live rank after every rank's file is in place. In a rank
file each part's tensors and arrays are datasets ``PART/N``, and the rest of its state dict
is one JSON attribute that says where each tensor goes back. Each file is written to a
temporary name, fsynced and renamed; a directory without ``COMPLETE`` is ignored, so a rank
killed while writing costs only the checkpoint being written. A write that fails (a full
disk) is agreed on by every rank: the temporary files and the incomplete step are removed,
every rank raises the same CheckpointError naming the file and the space it needed, and the
previous checkpoint stays as it was. A rank file is built in memory and written as one block
of bytes, so libhdf5 never meets a full disk (its teardown then crashed the process).
Each rank file carries SHA-256 digests of every byte a resume reads: per part, its JSON
state attribute and its arrays; per file, its step and record; and COMPLETE carries one of its own.
A checkpoint whose record or files are unreadable, truncated or altered is moved aside
(``checkpoints/broken-step-...``) with a warning naming the file and the part, and the next
older intact one is used. This module reads no part's fields: each
part has ``state_dict()`` and ``load_state_dict()``.
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

from .comm.agree import agree
from .comm.watchdog import WATCHDOG
from .errors import CheckpointError
from .metrics import atomic_write_bytes, atomic_write_text, cannot_write

if TYPE_CHECKING:
    from mpi4py import MPI

KEEP = 2  # complete checkpoints kept; older ones are removed once a newer one is complete
# What the digests of a rank file cover; files without this attribute have one over the arrays only.
SCOPE = "parts+attributes"


class TorchRNG:
    """torch's global CPU random state as a checkpoint part."""

    def state_dict(self) -> dict:
        import torch

        return {"state": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        import torch

        torch.set_rng_state(state["state"])


def _encode(value, arrays: list):
    """``value`` as JSON-able data; tensors and arrays go to ``arrays`` and leave a reference."""
    import torch  # here, not at the top: a resume's checks read checkpoints before torch's import

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
        import torch

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
                atomic_write_text(directory / "COMPLETE", json.dumps({**record, "sha256": _record_digest(record)}) + "\n")
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
    needed = sum(len(skeleton) + sum(np.asarray(a).nbytes for a in found) for skeleton, found in states.values())
    try:
        image = _image(tmp, states, record)
        needed = len(image)
        atomic_write_bytes(tmp, image)  # a temporary of its own, removed if the disk fills
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # h5py reports its failures as OSError or RuntimeError
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise CheckpointError(_cannot_write(path, exc, run_dir, needed)) from None


def _image(name: Path, states: dict, record: dict) -> bytes:
    """The bytes of a rank file, built by libhdf5 in memory (its core driver, no backing file).

    Nothing reaches the disk here: h5py closes the file whatever happens, and the disk is
    written by plain Python I/O, whose errors leave libhdf5 in a clean state.
    """
    with h5py.File(name, "w", driver="core", backing_store=False) as f:
        arrays = {}
        for name_, (skeleton, found) in states.items():
            group = f.create_group(name_)
            group.attrs["state"] = skeleton
            mine = {f"{name_}/{i}": a for i, a in enumerate(found)}
            for key, array in mine.items():
                f[key] = array
            written = {k: np.asarray(f[k]) for k in mine}  # as a reader will see them
            group.attrs["sha256"] = _part_digest(skeleton, written)
            arrays.update(written)
        f.attrs["sha256"] = _digest(arrays)
        f.attrs["step"] = record["step"]
        f.attrs["record"] = json.dumps(record)
        f.attrs["sha256_meta"] = _meta_digest(record["step"], f.attrs["record"])
        f.attrs["checksum_scope"] = SCOPE
        f.flush()
        return f.id.get_file_image()


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


def _part_digest(state: str, arrays: dict) -> str:
    """SHA-256 over one part: its JSON state attribute (sampler positions, lr, ...) and its arrays."""
    h = hashlib.sha256(str(state).encode())
    h.update(_digest(arrays).encode())
    return h.hexdigest()


def _meta_digest(step, record) -> str:
    """SHA-256 over a rank file's step and record attributes."""
    return hashlib.sha256(f"{int(step)}\n{record}".encode()).hexdigest()


def _cannot_write(path: Path, exc: BaseException, run_dir: Path, needed: int | None = None) -> str:
    """Why a checkpoint write failed, the space it needed, what is left, and what to do."""
    previous = complete_dirs(run_dir)
    kept = (f"the previous checkpoint {previous[-1].name} is intact: free space and rerun with --resume"
            if previous else "no earlier checkpoint exists: free space and rerun")
    return f"{cannot_write(path, exc, needed)}; {kept}"


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


def _raw_record(directory: Path) -> dict:
    """COMPLETE as written, its digest included."""
    return json.loads((directory / "COMPLETE").read_text())


def _read_record(directory: Path) -> dict:
    record = _raw_record(directory)
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
        "config": record.get("config"),
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
        problem = _check_record(directory) or next(
            filter(None, (_check_rank_file(directory, r, meta["step"]) for r in mine)), None)
    if comm is None or comm.size == 1:
        return problem
    with WATCHDOG.guard("Allgather [checkpoint integrity]", comm):
        problems = comm.allgather(problem)
    return next(filter(None, problems), None)


def _record_digest(record: dict) -> str:
    """SHA-256 of a COMPLETE record (its keys sorted), stored in it as ``sha256``."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _check_record(directory: Path) -> str | None:
    """Why COMPLETE is not as written (a record of an older trainer has no digest), or None."""
    record = _raw_record(directory)
    digest = record.pop("sha256", None)
    if digest is not None and digest != _record_digest(record):
        return "its COMPLETE record fails its checksum (altered or corrupted)"
    return None


def _check_rank_file(directory: Path, rank: int, step: int) -> str | None:
    """Why one rank file is not intact (missing, unreadable, another step, altered), or None.

    The file is closed before any answer: h5py objects never outlive the check.
    """
    path = directory / f"rank-{rank}.h5"
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            arrays = _arrays(f)
            states = {name: str(f[name].attrs.get("state")) for name in f}
            digests = {name: f[name].attrs.get("sha256") for name in f}
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        return f"{path.name} is unreadable or truncated ({exc})"
    if "step" not in attrs:
        return f"{path.name} is unreadable or truncated (no step attribute)"
    if attrs.get("checksum_scope") == SCOPE:
        problem = _check_scope(path.name, attrs, arrays, states, digests)
        if problem:
            return problem
    if int(attrs["step"]) != step:
        return f"{path.name} holds step {int(attrs['step'])}, its record says {step}"
    expected = attrs.get("sha256")
    if expected is not None and _digest(arrays) != str(expected):
        return f"{path.name} fails its checksum (altered or corrupted)"
    return None


def _check_scope(name: str, attrs: dict, arrays: dict, states: dict, digests: dict) -> str | None:
    """The digests of a file that covers every byte a resume reads: each part, then step and record."""
    for part in sorted(states):
        mine = {k: v for k, v in arrays.items() if k.startswith(part + "/")}
        if digests[part] is None or _part_digest(states[part], mine) != str(digests[part]):
            return f"{name}: part '{part}' fails its checksum (its state attribute or arrays were altered or corrupted)"
    if _meta_digest(attrs["step"], attrs.get("record")) != str(attrs.get("sha256_meta")):
        return f"{name}: its step and record attributes fail their checksum (altered or corrupted)"
    return None


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
