"""Which config keys change a run's results, read by the checkpoint and by the report.

A key listed in :data:`NOT_TRAJECTORY` says where or how a run is executed or watched, never
what it computes: a run may resume with it changed (the checkpoint's fingerprint leaves it
out), and ``hpcsgd report`` does not tell runs apart by it (runs equal in every other key,
the data and the world size are repeats of one experiment). One list, so that the two can
never disagree about what "the same run" means.
"""

from __future__ import annotations

NOT_TRAJECTORY = frozenset({
    "run_dir", "resume", "overwrite", "progress", "threads", "device", "log_every", "eval_every",
    "eval_train_samples", "grad_diversity", "overlap", "bucket_mb", "checkpoint_every", "data",
    "collective_timeout",
    # The R a run started with is kept in its checkpoint record and a resume uses that one
    # (hpcsgd.train.assembly.resolve_placement), so a resume may name another.
    "ranks_per_node",
})


def trajectory(config: dict) -> dict:
    """The keys of ``config`` (a TrainConfig's fields, or a parsed config.toml) that shape results."""
    return {k: v for k, v in config.items() if k not in NOT_TRAJECTORY}


__all__ = ["NOT_TRAJECTORY", "trajectory"]
