"""What every rank of ``hpcsgd train`` agrees on before anything heavy: the run's plan.

:func:`agree_on_run` reads the shard index, checks the config's fit to it, agrees on the
schedule, the failures, the checkpoint to resume from, the roles and the links' drop rates and
emulated network (a rule naming a node needs the roles), each check collective
(``comm.agree``). It imports no torch: ``hpcsgd train`` runs it before torch's import (seconds
per rank), so a refused launch ends fast; :func:`~hpcsgd.train.assembly.assemble` builds the
rest (device, data, model, strategy) on its :class:`Job`.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..comm.agree import agree
from ..comm.watchdog import WATCHDOG
from ..config import TrainConfig, validate_for_world
from ..data import load_chunk, load_test, read_index
from ..data.fractional import Redundancy, check_placement_fits, per_rank_redundancy
from ..errors import ConfigError
from ..faults.lossy import LinkRates
from ..faults.netem import LinkNetwork
from ..faults.schedule import fault_schedule
from .membership import Membership
from .recovery import check_launch
from .resume import find_latest
from .rundir import claim, resolve_resume
from .schedule import Schedule, pointless_settings
from .topology import detect_ranks_per_node, resolve_placement, warn_if_not_blocks

if TYPE_CHECKING:
    import torch

    from ..algorithms.base import Strategy


@dataclass
class Job:
    """What one rank of ``hpcsgd train`` trains with: agreed here (:func:`agree_on_run`), the rest
    built by :func:`~hpcsgd.train.assembly.assemble`."""

    cfg: TrainConfig
    comm: object  # the job's communicator (all processes, before any failure)
    index: object  # the shards' ShardIndex
    schedule: Schedule
    membership: Membership
    resume: dict | None  # the checkpoint record resumed from
    finished: bool = False  # resumed at the end of a run whose summary.json exists: nothing to do
    arrays: tuple | None = None  # read_rank_arrays: this rank's chunks and the test split, checked
    rates: LinkRates | None = None  # the links' drop rates (link_rates)
    network: LinkNetwork | None = None  # the emulated network, None without one
    device: torch.device = None
    data: object = None  # hpcsgd.train.assembly.RankData: tensors, made after torch's import
    model: torch.nn.Module = None
    optimizer: torch.optim.Optimizer = None
    strategy: Strategy = None

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def start_step(self) -> int:
        return self.resume["step"] if self.resume else 0


def agree_on_run(cfg: TrainConfig, comm) -> Job:
    """The shards, the config's fit, the schedule, the failures, the resume point and the roles.

    Collective; imports no torch, so the command line runs it first and bad input is refused
    before each rank spends seconds importing torch.
    """
    WATCHDOG.arm(comm, cfg.collective_timeout)  # an untimed rendezvous; collectives from here on are timed
    claim(cfg, comm)  # this job's lock; refuses a run directory that holds a run
    index = agree(comm, lambda: read_index(cfg.data), "shards")
    P = index.parts
    agree(comm, lambda: validate_for_world(cfg, P, index.chunk_sizes), "config")
    agree(comm, lambda: check_launch(cfg), "config")  # fail_mode kill needs ULFM
    schedule = Schedule.from_config(cfg, index.train_size, P)
    resume, finished = _resume(cfg, comm, P, index, schedule.total_steps) if cfg.resume else (None, False)
    detected, blocks = detect_ranks_per_node(comm)
    placement = agree(comm, lambda: resolve_placement(cfg.placement, cfg.ranks_per_node, detected, resume, P, cfg.q),
                      "config")
    warn_if_not_blocks(comm, placement, cfg.ranks_per_node, blocks)
    R = placement.ranks_per_node
    cfg = dataclasses.replace(cfg, ranks_per_node=R)
    agree(comm, lambda: validate_for_world(cfg, P, ranks_per_node=R), "config")  # node:N entries need R
    faults = fault_schedule(cfg, P, schedule.steps_per_epoch, schedule.total_steps, R)
    # A failure scheduled at or after the last step never happens (warned about here).
    faults = {r: s for r, s in faults.items() if s < schedule.total_steps}
    if comm.rank == 0:
        for message in pointless_settings(cfg, schedule.total_steps) + duplicate_chunks(index):
            print(f"hpcsgd: warning: {message}", file=sys.stderr, flush=True)
    redundancy = agree(comm, lambda: redundancy_of(cfg, P, index.chunk_sizes, placement), "config")
    membership = agree(comm, lambda: Membership.assign(P, cfg.q, comm.size, comm.rank, faults, resume, cfg.data,
                                                       index.chunk_sizes, placement, redundancy), "shards")
    job = Job(cfg, comm, index, schedule, membership, resume, finished)
    # Link rules may name nodes (R is known from here on): refused before torch's import too.
    nodes = membership.nodes
    job.rates = agree(comm, lambda: link_rates(cfg, membership.P, nodes), "link drop rates")
    job.network = agree(comm, lambda: LinkNetwork.build(membership.P, cfg.link_latency_ms, cfg.link_gbps,
                                                        cfg.link_latency, cfg.link_bandwidth, nodes),
                        "emulated network")
    job.arrays = agree(comm, lambda: read_rank_arrays(index, membership.held_chunks), "shards")
    return job


def link_rates(cfg: TrainConfig, P: int, nodes: list[int] | None = None) -> LinkRates:
    """Drop rates per link from the config (one rate, per phase, a matrix file, link rules);
    ``nodes[r]`` is rank r's node, for the rules that name nodes."""
    matrix = read_matrix(cfg.link_drop_file) if cfg.link_drop_file else None
    return LinkRates.build(P, cfg.drop_rate, cfg.drop_rate_phase1, cfg.drop_rate_phase2, cfg.link_drop, matrix, nodes)


def read_matrix(path: str) -> np.ndarray:
    """A P x P drop-rate matrix from .npy or text (comma or whitespace separated)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"link_drop_file {path} does not exist")
    if not p.is_file():
        raise ConfigError(f"link_drop_file {path} is not a file")
    try:
        if p.suffix == ".npy":
            return np.load(p)
        return np.loadtxt(p, delimiter="," if p.suffix == ".csv" else None, ndmin=2)
    except (ValueError, UnicodeDecodeError, EOFError) as exc:
        raise ConfigError(f"link_drop_file {path} is not a numeric matrix: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"link_drop_file {path}: cannot read it: {exc.strerror or exc}") from None


def read_rank_arrays(index, held: list[int]) -> tuple[dict, tuple]:
    """Only the chunks this rank holds (by chunk) and the test split, read and checked as numpy arrays."""
    return {c: load_chunk(index, c) for c in held}, load_test(index)


def _resume(cfg: TrainConfig, comm, P: int, index, total_steps: int) -> tuple[dict | None, bool]:
    """The checkpoint ``--resume`` continues from, and whether the run had finished; one line says which."""
    run_dir = Path(cfg.run_dir)
    resume = agree(comm, lambda: find_latest(run_dir, cfg, P, index, comm), "resume")
    plan = agree(comm, lambda: resolve_resume(run_dir, resume, total_steps) if comm.rank == 0 else None, "resume")
    with WATCHDOG.guard("Bcast [resume]", comm):
        line, finished = comm.bcast(plan, root=0)
    if comm.rank == 0:
        print(f"hpcsgd: {line}", file=sys.stderr, flush=True)
    return resume, finished


def redundancy_of(cfg: TrainConfig, P: int, chunk_sizes, placement) -> Redundancy | None:
    """The per-rank redundancies of a fractional or per-rank run (None: the integer q of every rank)."""
    if not cfg.fractional:
        return None
    mu = cfg.redundancy if cfg.redundancy is not None else float(cfg.q - 1)
    per_rank = per_rank_redundancy(P, mu, cfg.redundancy_spread, cfg.redundancy_per_rank, cfg.seed)
    check_placement_fits(per_rank, placement)  # spread: the partial chunk on another node too
    found = Redundancy(per_rank, tuple(chunk_sizes), cfg.seed, placement)
    return None if found.integer and len(set(cfg.batch_sizes(P))) == 1 else found


def duplicate_chunks(index) -> list[str]:
    """A warning for each group of identical chunks (see ShardIndex.duplicate_chunks)."""
    return [f"chunks {', '.join(map(str, group))} of {index.path} hold the same samples in the same order "
            f"(one SHA-256): was a chunk file copied over another and the index re-signed? Each still counts "
            f"as its own chunk; re-run `hpcsgd shard` to restore the partition" for group in index.duplicate_chunks()]


__all__ = ["Job", "agree_on_run", "duplicate_chunks", "link_rates", "read_matrix", "read_rank_arrays", "redundancy_of"]
