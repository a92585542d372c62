"""Who trains: the run's live ranks, departed ranks and adopted chunks, coverage, failures.

A run has P ranks (one per shard chunk). A process plays one of them (``rank``); after a
resume on fewer processes some ranks have *departed* and their orphaned chunks are *adopted*
by live ranks; scheduled (simulated) crash-stop failures remove ranks at given steps.
:meth:`Membership.fail` is the one way ranks leave: it tells the strategy, shrinks
``live`` and calls the ``on_change`` hooks (the batch plan re-weights there).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from ..data import adopt_orphans, chunk_holders, coverage, held_chunks
from ..data.fractional import Redundancy
from ..data.placement import CYCLIC, Placement, node_of, node_ranks
from ..errors import ShardError


class Membership:
    """One process's view of which run ranks train and who holds which chunk.

    Attributes:
        P, q: ranks of the run (chunks) and chunks per rank.
        chunk_sizes: samples per chunk (the shard index's; None: equal), which coverage counts.
        rank: the run rank this process plays; ``roles``: the run rank of each process.
        faults: ``{run rank: step}`` of the scheduled failures that happen in this run.
        departed: run ranks that left at a resume on fewer processes (at ``start_step``).
        adopted: ``{chunk: run rank}`` taken over from departed ranks.
        live: the run ranks still training; ``alive``: whether this process still trains.
        placement: which chunks a rank holds (cyclic, or spread over nodes of R ranks).
        redundancy: per-rank (fractional) redundancy, or None for the integer ``q`` of every rank.
    """

    def __init__(self, P: int, q: int, roles: list[int], rank: int, faults: dict[int, int],
                 departed: list[int], adopted: dict[int, int], start_step: int = 0,
                 chunk_sizes: list[int] | None = None, placement: Placement = CYCLIC,
                 redundancy: Redundancy | None = None):
        self.P, self.q, self.roles, self.rank = P, q, list(roles), rank
        self.redundancy = redundancy
        self.chunk_sizes = None if chunk_sizes is None else list(chunk_sizes)
        self.placement = placement
        self.faults, self.departed, self.adopted = dict(faults), list(departed), dict(adopted)
        self.start_step = start_step
        self.live = list(roles)
        self.alive = True
        self.strategy = None  # set by attach(): the strategy told about every failure
        self.before_change: list[Callable[[], None]] = []  # e.g. finish a pending stop-flag exchange
        self.on_change: list[Callable[["Membership"], None]] = []  # e.g. re-plan the batches

    @classmethod
    def assign(cls, P: int, q: int, comm_size: int, comm_rank: int, faults: dict[int, int],
               resume: dict | None, data: str = "", chunk_sizes: list[int] | None = None,
               placement: Placement = CYCLIC, redundancy: Redundancy | None = None) -> "Membership":
        """Which of the run's P ranks each process plays, and who takes over whose chunks.

        Normally process r plays rank r of P. A run resumed from its checkpoint on W < P
        processes (a requeued job with a node gone) keeps the first W ranks that were live
        at the checkpoint (those not scheduled to fail at the resume step first); the others
        depart there. Their chunks that no live rank holds are
        re-assigned round-robin and read from the same shards (unlike a simulated failure,
        whose data is lost by design).
        """
        W = comm_size
        if W > P or (W < P and resume is None):
            hint = " (a run resumes on fewer ranks only from its checkpoint: add --resume)" if W < P else ""
            raise ShardError(
                f"shard directory {data} has P={P} chunks but the job has {W} ranks: launch "
                f"{P} ranks, or re-shard with `hpcsgd shard --parts {W} ...`{hint}"
            )
        start = resume["step"] if resume else 0
        live = resume["live_world"] if resume else list(range(P))
        if W < P and W > len(live):
            raise ShardError(
                f"checkpoint {resume['dir']} has {len(live)} live ranks of {P}: launch at most {len(live)} ranks, or {P}"
            )
        failed = {r for r, s in faults.items() if s <= start}
        # Fewer processes than live ranks: ranks due to fail at the resume step go last, so a
        # process never plays a rank that leaves at once while a healthy one departs.
        roles = list(range(P)) if W == P else sorted(sorted(live, key=lambda r: r in failed)[:W])
        training = set(roles) & set(live)
        departed = sorted(set(range(P)) - training - failed)
        previous = resume["adopted"] if resume else {}
        adopted = adopt_orphans(P, q, training - failed, departed, previous, placement, redundancy) if departed else {}
        return cls(P, q, roles, roles[comm_rank], faults, departed, adopted, start, chunk_sizes, placement, redundancy)

    @property
    def nodes(self) -> list[int]:
        """The node of each run rank (blocks of R ranks, see hpcsgd.train.topology)."""
        return [node_of(r, self.placement.ranks_per_node) for r in range(self.P)]

    def attach(self, strategy) -> None:
        """The strategy whose :meth:`~hpcsgd.Strategy.fail` every failure goes through."""
        self.strategy = strategy

    @property
    def held_chunks(self) -> list[int]:
        """The chunks this rank draws from: its own q and those it adopted (and its partial chunk)."""
        whole = held_chunks(self.P, self.q, self.rank, self.adopted, self.placement, self.redundancy)
        partial = self.redundancy.holding(self.rank).partial if self.redundancy is not None else None
        return list(whole) + ([partial] if partial is not None and partial not in whole else [])

    def alive_at(self, run_rank: int, step: int) -> bool:
        """Whether ``run_rank`` still trains at ``step`` (not departed, not failed by then)."""
        fail_step = self.faults.get(run_rank)
        return run_rank not in self.departed and (fail_step is None or step < fail_step)

    def coverage(self, live=None) -> float:
        """The share of training samples some live rank (of ``live``, default :attr:`live`) still holds."""
        return coverage(self.P, self.q, self.live if live is None else live, self.adopted, self.chunk_sizes,
                        self.placement, self.redundancy)

    def chunk_holders(self) -> dict[int, list[int]]:
        return chunk_holders(self.P, self.q, self.live, self.adopted, self.placement, self.redundancy)

    def share(self) -> tuple[int, int]:
        """This rank's place among the live ranks and their count (splits evaluation work)."""
        return self.live.index(self.rank), len(self.live)

    def due(self, step: int) -> list[int]:
        """Live ranks that leave at ``step``: scheduled failures, and departed ranks at the start."""
        leaving = {**self.faults, **dict.fromkeys(self.departed, self.start_step)}
        return [r for r, s in leaving.items() if s <= step and r in self.live]

    def fail(self, run_ranks, step: int, survivors=None) -> bool:
        """Ranks ``run_ranks`` stop for good at ``step``; the others go on (collective over the live ranks).

        The one path by which ranks leave (simulated crash-stop, departed ranks, and real
        deaths under ULFM, where ``survivors`` is the repaired communicator of the live ranks).
        Returns whether this process still trains.
        """
        failing = [r for r in run_ranks if r in self.live]
        if not failing:
            return self.alive
        for hook in self.before_change:
            hook()
        still_alive = self.strategy.fail(failing, survivors)
        self.live = [r for r in self.live if r not in failing]
        if not still_alive:
            self.alive = False
            return False
        for hook in self.on_change:
            hook(self)
        if self.rank == min(self.live) and set(failing) - set(self.departed):
            print(
                f"hpcsgd: rank(s) {', '.join(map(str, failing))}{self._whole_nodes(failing)} failed at step {step}; "
                f"{len(self.live)} live ranks, coverage {self.coverage():.0%}",
                file=sys.stderr,
                flush=True,
            )
        return True

    def _whole_nodes(self, ranks) -> str:
        """`` (node 1)`` when ``ranks`` are every rank of some nodes (R > 1), for the failure message."""
        R = self.placement.ranks_per_node
        nodes = sorted({node_of(r, R) for r in ranks})
        if R == 1 or sorted(ranks) != [r for n in nodes for r in node_ranks(n, R, self.P)]:
            return ""
        return f" (node {', '.join(map(str, nodes))})"

    def resized_message(self, world_size: int) -> str:
        """What a resume on fewer processes did, for the first process to say."""
        moved = ", ".join(f"chunk {c} -> rank {r}" for c, r in self.adopted.items()) or "none needed"
        extra = f"; {len(self.departed)} spare process(es) exit" if world_size == self.P else ""
        staying = [r for r in self.live if self.alive_at(r, self.start_step)]
        return (
            f"hpcsgd: resuming a run of {self.P} ranks on {world_size} processes at step {self.start_step}: "
            f"rank(s) {', '.join(map(str, self.departed))} of the run departed; their chunks are re-assigned "
            f"from the same shards ({moved}); coverage {self.coverage(staying):.0%}{extra}"
        )

    def state_dict(self) -> dict:
        """What a checkpoint's record keeps: the live ranks, the adopted chunks and the placement
        (with R, so that a resume on other nodes keeps the chunks where they were)."""
        return {"live_world": list(self.live), "adopted": {str(c): r for c, r in self.adopted.items()},
                "placement": self.placement.kind, "ranks_per_node": self.placement.ranks_per_node}


__all__ = ["Membership"]
