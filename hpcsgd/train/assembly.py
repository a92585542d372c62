"""Run assembly: a config and a communicator become everything a rank trains with.

:func:`assemble` reads the shard index, agrees on the schedule, failures and the checkpoint
to resume from, plays roles (:class:`~hpcsgd.train.membership.Membership`), binds the device, loads
this rank's chunks and a fixed evaluation sample, and builds the model, the optimizer and the
strategy through the same public classes a user would (``hpcsgd.SyncSGD``, ...). Every step
that can fail for a reason a user can fix is agreed on by all ranks (``comm.agree``).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..comm import LinkRates
from ..faults.netem import LinkNetwork
from ..faults.schedule import fault_schedule
from ..comm import ulfm
from ..comm.agree import agree
from ..comm.device import apply_threads, select_device
from ..comm.watchdog import WATCHDOG
from ..config import TrainConfig, validate_for_world
from ..data import load_chunk, load_chunk_rows, load_test, read_index
from ..data.fractional import Redundancy, check_placement_fits, per_rank_redundancy
from ..errors import ConfigError
from .membership import Membership
from .models import build_model
from ..optim import ScalingSGD
from .recovery import check_launch
from .resume import find_latest
from ..algorithms.registry import algorithm
from .rundir import claim, prepare, resolve_resume
from .schedule import Schedule, pointless_settings
from ..algorithms.base import Strategy
from ..algorithms.registry import build as build_strategy
from .topology import detect_ranks_per_node, resolve_placement, warn_if_not_blocks
from .user_model import build_user_model, is_factory_spec
from ..world import world_for_run


@dataclass
class RankData:
    """The chunks this rank holds, as tensors on its device, plus the test split."""

    chunks: dict[int, tuple[torch.Tensor, torch.Tensor]]
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_train_eval: torch.Tensor | None = None  # a fixed sample of the whole training set
    y_train_eval: torch.Tensor | None = None
    numpy_chunks: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


@dataclass
class Job:
    """What one rank of ``hpcsgd train`` trains with (built by :func:`assemble`)."""

    cfg: TrainConfig
    comm: object  # the job's communicator (all processes, before any failure)
    index: object  # the shards' ShardIndex
    schedule: Schedule
    membership: Membership
    resume: dict | None  # the checkpoint record resumed from
    finished: bool = False  # resumed at the end of a run whose summary.json exists: nothing to do
    device: torch.device = None
    data: RankData = None
    model: torch.nn.Module = None
    optimizer: torch.optim.Optimizer = None
    strategy: Strategy = None

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def start_step(self) -> int:
        return self.resume["step"] if self.resume else 0


def assemble(cfg: TrainConfig, comm) -> Job:
    """Every rank's :class:`Job` for ``cfg`` (collective over ``comm``)."""
    run = _agree_on_run(cfg, comm)
    cfg = run.cfg  # with the run's R resolved: config.toml records it
    run.device = agree(comm, lambda: select_device(comm, cfg.device), "device")
    apply_threads(comm, cfg.threads)
    nodes = run.membership.nodes
    rates = agree(comm, lambda: link_rates(cfg, run.membership.P, nodes), "link drop rates")
    network = agree(comm, lambda: LinkNetwork.build(run.membership.P, cfg.link_latency_ms, cfg.link_gbps,
                                                    cfg.link_latency, cfg.link_bandwidth, nodes), "emulated network")
    run.data = agree(comm, lambda: load_rank_data(run.index, run.membership.held_chunks, run.device), "shards")
    agree(comm, lambda: load_train_eval_sample(cfg, run.index, run.data, run.device), "shards")
    prepare(comm, run.run_dir, cfg, run.membership.rank)  # --overwrite, folders, config.toml
    torch.manual_seed(cfg.seed)
    run.model = agree(comm, lambda: model_for(cfg, run.index), "model").to(run.device)
    run.optimizer = ScalingSGD(run.model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    # The strategy a user would build (hpcsgd.SyncSGD, ...): it moves the model into a
    # flat buffer, broadcasts rank 0's copy and takes every step.
    m = run.membership
    # Under ULFM training runs on a duplicate that returns errors (see hpcsgd.train.recovery).
    run_world = world_for_run(ulfm.training_comm(comm), m.roles, m.P, run.device)
    run.strategy = build_strategy(cfg.algorithm, run.model, run.optimizer, run_world, **strategy_options(cfg, rates, network))
    m.attach(run.strategy)
    return run


def _agree_on_run(cfg: TrainConfig, comm) -> Job:
    """The shards, the config's fit, the schedule, the failures, the resume point and the roles."""
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
    return Job(cfg, comm, index, schedule, membership, resume, finished)


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


def strategy_options(cfg: TrainConfig, rates: LinkRates, network: LinkNetwork | None = None) -> dict:
    """The options of ``cfg.algorithm``'s strategy, from the config (what the registry says it takes)."""
    spec, options = algorithm(cfg.algorithm), {"network": network}
    if spec.overlaps:
        # Diversity needs each rank's own gradient, which an overlapped average
        # overwrites during backward.
        options.update(overlap=cfg.overlap and not cfg.grad_diversity, bucket_mb=cfg.bucket_mb)
    if spec.uses_tau:
        options.update(tau=cfg.tau, average_optimizer_state=cfg.average_optimizer_state,
                       overlap_rounds=cfg.overlap_rounds, average_weights=cfg.effective_average_weights)
    if spec.lossy:
        options.update(rates=rates, seed=cfg.seed)
    if cfg.algorithm == "rps":  # the nodes as the run counts them (R may simulate nodes on one machine)
        options.update(exchange=cfg.exchange, ranks_per_node=cfg.ranks_per_node)
    if cfg.algorithm in ("local", "sync"):
        options.update(allreduce=cfg.allreduce, ranks_per_node=cfg.ranks_per_node)
    return options


def model_for(cfg: TrainConfig, index) -> torch.nn.Module:
    """``cfg.model`` (a built-in name or ``pkg.module:factory``) for the shards' shape and classes."""
    shape = tuple(index.input_shape)
    if is_factory_spec(cfg.model):
        return build_user_model(cfg.model, shape, index.num_classes)
    try:
        return build_model(cfg.model, shape, index.num_classes, tuple(cfg.mlp_hidden))
    except ConfigError as exc:
        raise ConfigError(f"model {cfg.model!r} does not fit the shards (input shape {shape}): {exc}") from None


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


def load_rank_data(index, held: list[int], device) -> RankData:
    """Read only the chunks this rank holds (plus the test split), checked."""
    numpy_chunks = {c: load_chunk(index, c) for c in held}
    x_test, y_test = load_test(index)
    chunks = {
        c: (torch.from_numpy(np.ascontiguousarray(x)).to(device), torch.from_numpy(y).to(device))
        for c, (x, y) in numpy_chunks.items()
    }
    return RankData(chunks, torch.from_numpy(x_test).to(device), torch.from_numpy(y_test).to(device), numpy_chunks)


def load_train_eval_sample(cfg: TrainConfig, index, data: RankData, device) -> None:
    """A fixed sample of every chunk, so eval-time train loss covers the whole data set.

    Each rank's own model is judged on all the data, not just its chunks: on a
    label-skewed partition that is what shows replicas drifting apart.
    """
    wanted = cfg.eval_train_samples
    per_chunk = math.ceil(wanted / index.parts) if wanted else None
    xs, ys = [], []
    for c, n in enumerate(index.chunk_sizes):
        k = n if per_chunk is None else min(n, per_chunk)
        rows = np.sort(np.random.default_rng([cfg.seed, 7919, c]).choice(n, k, replace=False))
        if c in data.numpy_chunks:
            x, y = data.numpy_chunks[c]
            x, y = x[rows], y[rows]
        else:
            x, y = load_chunk_rows(index, c, rows)
        xs.append(x)
        ys.append(y)
    data.x_train_eval = torch.from_numpy(np.concatenate(xs)).to(device)
    data.y_train_eval = torch.from_numpy(np.concatenate(ys)).to(device)


__all__ = ["Job", "RankData", "assemble", "duplicate_chunks", "link_rates", "load_rank_data", "model_for", "read_matrix",
           "strategy_options"]
