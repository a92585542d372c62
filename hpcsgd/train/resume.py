"""``hpcsgd train --resume``'s policy over the public checkpoint format (:mod:`hpcsgd.checkpoint`).

A checkpoint the CLI resumes from must be intact (the format checks that) and must fit: the
same rank count P, the same shards (their content digest) and a config with the same
trajectory (:mod:`hpcsgd.trajectory`: the one list of keys that do not change results). The
record the trainer writes (:func:`identity`) carries what a refused resume names. A stop
signal ends a run with a checkpoint and :class:`Preempted` (exit code 3).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError
from ..trajectory import trajectory

if TYPE_CHECKING:
    from mpi4py import MPI

    from ..config import TrainConfig
    from ..data.shards import ShardIndex

EXIT_PREEMPTED = 3  # checkpoint written after SIGTERM/SIGUSR1/SIGINT; `--resume` continues the run


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
    values = trajectory(vars(cfg))
    if values.get("placement") == "cyclic":
        del values["placement"]  # the default: checkpoints written before the key existed still fit
    for key, default in (("redundancy", None), ("redundancy_spread", 0.0), ("redundancy_per_rank", [])):
        if key in values and values[key] == default:
            del values[key]  # likewise (issue 21's keys): an integer-q run keeps its fingerprint
    if shards is not None:
        values["shards"] = shards["digest"]
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def identity(cfg: "TrainConfig", shards: dict) -> dict:
    """What a checkpoint's record says about the run: fingerprint, shards and the trajectory keys.

    The keys themselves (not only their hash) let a refused resume name what differs.
    """
    return {"fingerprint": fingerprint(cfg, shards), "shards": shards,
            "config": json.loads(json.dumps(trajectory(vars(cfg)), default=str))}


def shard_identity(index: "ShardIndex") -> dict:
    """What names a shard set in messages, and a digest of its chunk and test checksums."""
    digest = hashlib.sha256(json.dumps([list(index.chunk_checksums), index.test_checksum]).encode()).hexdigest()
    return {"path": str(index.path), "source": index.source, "partition": index.partition, "seed": index.seed,
            "parts": index.parts, "digest": digest[:16]}


def _describe_shards(shards: dict) -> str:
    return (f"{shards.get('path')} ({shards.get('source')}, {shards.get('partition')}, seed {shards.get('seed')}, "
            f"P={shards.get('parts')}, content {shards.get('digest')})")


def find_latest(
    run_dir: Path, cfg: "TrainConfig", ranks: int, shards: "ShardIndex | None" = None, comm: "MPI.Comm | None" = None
) -> dict | None:
    """The newest intact checkpoint's record for ``hpcsgd train --resume``, or None (start fresh).

    As :func:`newest_intact`, and the checkpoint must fit: ``ranks`` is the run's rank count
    P (its number of chunks; the job resuming it may have fewer, see
    :class:`~hpcsgd.train.membership.Membership`), the same shards (``shards`` defaults to the index
    in ``cfg.data``) and a config with the same trajectory.
    """
    from ..checkpoint import newest_intact  # torch and h5py: only where a resume reads a checkpoint

    if shards is None:
        from ..data import read_index

        shards = read_index(cfg.data)
    return newest_intact(run_dir, comm, lambda meta, directory: _check_fits(meta, directory, cfg, ranks,
                                                                             shard_identity(shards)))


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
        differ = _differences(meta.get("config") or _config_toml(Path(directory).parent.parent), cfg)
        raise CheckpointError(
            f"checkpoint {directory} was written by a run with another config"
            + (f" ({differ})" if differ else "") + "; use a new run directory or the original config"
        )


def _differences(old: dict | None, cfg: "TrainConfig") -> str:
    """The trajectory keys whose values differ, as ``key: OLD in the checkpoint, NEW now``."""
    if not old:
        return ""
    new = json.loads(json.dumps(trajectory(vars(cfg)), default=str))
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "; ".join(f"{k}: {old.get(k, '(unset)')!r} in the checkpoint, {new.get(k, '(unset)')!r} now" for k in keys)


def _config_toml(run_dir: Path) -> dict | None:
    """The trajectory keys of the run's config.toml: what a checkpoint of an older trainer
    (whose record has no config) was written with; None when it cannot be read."""
    import tomllib

    try:
        with open(run_dir / "config.toml", "rb") as fh:
            return trajectory(tomllib.load(fh))
    except (OSError, ValueError):
        return None


__all__ = ["EXIT_PREEMPTED", "Preempted", "find_latest", "fingerprint", "identity", "shard_identity"]
