"""A library resume on fewer processes than the run had: the CLI's plan, applied to a user's parts.

``hpcsgd train --resume`` on W < P processes keeps the first W ranks that were live at the
checkpoint and hands the chunks only departed ranks held to live ones
(:meth:`~hpcsgd.train.membership.Membership.assign`). :func:`hpcsgd.load_checkpoint` does the same
through this module: the same ``Membership.assign`` gives the roles and the adoption plan,
the user's sampler and strategy are re-formed for the run's world (their ``resize``), and the
first process says what moved and the coverage, in the CLI's words. More processes than the
checkpoint's live ranks are refused: the library does not grow a run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import CheckpointError
from .membership import Membership
from ..redundant import RedundantSampler
from ..algorithms.base import Strategy
from ..world import world_for_run


def plan(meta: dict, world, parts: dict) -> Membership | None:
    """Who plays which run rank when ``world`` resumes the checkpoint ``meta`` (None: as saved).

    Raises the same CheckpointError on every rank (it depends on ``meta`` and the job's size
    only) when the job has more processes than the checkpoint has live ranks, or when the
    parts cannot be re-formed (no RedundantSampler or no strategy among them).
    """
    P, live, W = meta["ranks"], meta["live_world"], world.comm.size
    if W == P and live == list(range(P)):
        return None
    where = Path(meta["dir"])
    if W > len(live):
        raise CheckpointError(
            f"checkpoint {where} has {len(live)} live ranks of a run of {P}; this job has {W} processes: "
            f"resume on at most {len(live)} (a run does not grow)"
        )
    samplers = [p for p in parts.values() if isinstance(p, RedundantSampler)]
    strategies = [p for p in parts.values() if isinstance(p, Strategy)]
    if len(samplers) != 1 or len(strategies) != 1:
        raise CheckpointError(
            f"checkpoint {where} was written by {P} ranks ({len(live)} live) and this job has {W}: resuming on fewer "
            f"ranks re-forms the data and the strategy, so parts must hold one hpcsgd.RedundantSampler and one "
            f"strategy (found {len(samplers)} and {len(strategies)})"
        )
    q, chunk_sizes, redundancy = samplers[0].for_run(P)
    return Membership.assign(P, q, W, world.comm.rank, {}, meta, str(where), chunk_sizes,
                             placement=samplers[0].placement, redundancy=redundancy)


def apply(membership: Membership, world, parts: dict) -> int:
    """Re-form the sampler and the strategy for the run's world; returns this process's run rank."""
    run_world = world_for_run(world.comm, membership.roles, membership.P, world.device)
    for part in parts.values():
        if isinstance(part, RedundantSampler):
            part.resize(run_world, membership.adopted)
        elif isinstance(part, Strategy):
            part.resize(run_world)
    if world.comm.rank == 0:
        print(membership.resized_message(world.comm.size), file=sys.stderr, flush=True)
    return membership.rank


__all__ = ["apply", "plan"]
