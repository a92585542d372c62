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
from .comm.agree import agree


def _run_view(world, parts: dict) -> tuple:
    """(communicator, run rank, record) of the ranks that save: a strategy among ``parts`` knows
    the run (its P, its live ranks, after failures and resizes); else ``world`` is the run."""
    from .redundant import RedundantSampler
    from .algorithms.base import Strategy

    strategy = next((p for p in parts.values() if isinstance(p, Strategy)), None)
    sampler = next((p for p in parts.values() if isinstance(p, RedundantSampler)), None)
    adopted = {str(c): r for c, r in sampler.adopted.items()} if sampler is not None else {}
    if strategy is not None:
        record = {"ranks": strategy.world.size, "live_world": list(strategy.live_ranks), "adopted": adopted}
        return strategy.comm, strategy.world.rank, record
    comm = world.comm
    ranks = sorted(comm.allgather(world.rank))  # the rank files the record vouches for
    return comm, world.rank, {"ranks": max(world.size, comm.size), "live_world": ranks, "adopted": adopted}


def save_checkpoint(run_dir, world, parts: dict, step: int) -> Path:
    """Write every rank's ``parts`` after ``step`` steps (collective over ``world.comm``).

    Args:
        run_dir: the run directory; checkpoints go to ``run_dir/checkpoints``.
        world: from :func:`hpcsgd.init`. With a strategy among ``parts`` the strategy's
            live ranks save (after failures, or a resume on fewer ranks, as the run's ranks).
        parts: ``{name: object with state_dict()}``, the same names on every rank.
        step: steps taken; names the checkpoint.

    Returns:
        The checkpoint directory. A failed write raises the same CheckpointError on every
        rank and leaves the previous checkpoint as it was.
    """
    comm, rank, record = _run_view(world, parts)
    return _ckpt.save(Path(run_dir), comm, rank, parts, step, record)


def load_checkpoint(run_dir, world, parts: dict) -> int | None:
    """Load every part of this rank from the newest intact checkpoint; returns its step.

    Collective over ``world.comm`` (the ranks check the rank files' checksums together).
    Returns None (and loads nothing) when ``run_dir`` has no complete checkpoint. Tensors
    come back on the CPU; ``load_state_dict`` of models and optimizers copies them where
    they belong.

    On fewer processes than the run had (a requeued job with a node gone), as ``hpcsgd
    train --resume``: the processes play the first live ranks of the run, the chunks only
    departed ranks held are adopted by live ones, the sampler and the strategy in ``parts``
    are re-formed for the run (``len(sampler)`` is the run's again), and the first process
    prints the plan and the coverage. Every process then loads the file of the run rank it
    plays (``strategy.world.rank``). More processes than the checkpoint's live ranks: a
    CheckpointError on every rank.
    """
    from .train import resize

    meta = _ckpt.newest_intact(Path(run_dir), world.comm)
    if meta is None:
        return None
    membership = agree(world.comm, lambda: resize.plan(meta, world, parts), "resume")
    rank = world.rank
    if membership is not None:
        rank = agree(world.comm, lambda: resize.apply(membership, world, parts), "resume")
    return agree(world.comm, lambda: _ckpt.restore(meta, rank, parts), "resume")


__all__ = ["complete_dirs", "load_checkpoint", "save_checkpoint", "step_dir"]
