"""Checkpoints of a dict of stateful parts: ``{"model": model, "optimizer": opt, ...}``.

Every part has ``state_dict()`` and ``load_state_dict()``; nothing here reads their fields.
The format, atomic writes and integrity checks are the CLI's own (:mod:`hpcsgd.checkpoint`):
``RUN_DIR/checkpoints/step-00000120/rank-K.h5`` per rank plus a ``COMPLETE`` record, SHA-256
per rank file, the newest two complete checkpoints kept, a broken one set aside on load.
"""

from __future__ import annotations

from pathlib import Path

from . import checkpoint as _ckpt
from .checkpoint import complete_dirs, step_dir


def save_checkpoint(run_dir, world, parts: dict, step: int) -> Path:
    """Write every rank's ``parts`` after ``step`` steps (collective over ``world.comm``).

    Args:
        run_dir: the run directory; checkpoints go to ``run_dir/checkpoints``.
        world: from :func:`hpcsgd.init` (or a strategy's world after failures: any object
            with ``comm`` and ``rank``).
        parts: ``{name: object with state_dict()}``, the same names on every rank.
        step: steps taken; names the checkpoint.

    Returns:
        The checkpoint directory. A failed write raises the same CheckpointError on every
        rank and leaves the previous checkpoint as it was.
    """
    comm = world.comm
    ranks = sorted(comm.allgather(world.rank))  # the rank files the record vouches for
    return _ckpt.save(Path(run_dir), comm, world.rank, parts, step, {"ranks": comm.size, "live_world": ranks})


def load_checkpoint(run_dir, world, parts: dict) -> int | None:
    """Load every part of this rank from the newest intact checkpoint; returns its step.

    Collective over ``world.comm`` (the ranks check the rank files' checksums together).
    Returns None (and loads nothing) when ``run_dir`` has no complete checkpoint. Tensors
    come back on the CPU; ``load_state_dict`` of models and optimizers copies them where
    they belong.
    """
    meta = _ckpt.newest_intact(Path(run_dir), world.comm)
    if meta is None:
        return None
    return _ckpt.restore(meta, world.rank, parts)


__all__ = ["complete_dirs", "load_checkpoint", "save_checkpoint", "step_dir"]
