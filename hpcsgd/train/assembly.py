"""Run assembly: a config and a communicator become everything a rank trains with.

:func:`assemble` takes the run's plan (:mod:`hpcsgd.train.preflight`: the shard index, the schedule,
failures, the checkpoint to resume from, the roles), binds the device, loads
this rank's chunks and a fixed evaluation sample, and builds the model, the optimizer and the
strategy through the same public classes a user would (``hpcsgd.SyncSGD``, ...). Every step
that can fail for a reason a user can fix is agreed on by all ranks (``comm.agree``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..comm import LinkRates
from ..faults.netem import LinkNetwork
from ..comm import ulfm
from ..comm.agree import agree
from ..comm.device import apply_threads, select_device
from ..comm.watchdog import WATCHDOG
from ..config import TrainConfig
from ..data import load_chunk_rows
from ..errors import ConfigError
from .models import build_model
from ..optim import ScalingSGD
from ..algorithms.registry import algorithm
from .preflight import (  # noqa: F401 (Job, duplicate_chunks, link_rates, read_matrix: re-exported)
    Job, agree_on_run, duplicate_chunks, link_rates, read_matrix, read_rank_arrays,
)
from .rundir import prepare
from ..algorithms.registry import build as build_strategy
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


def assemble(cfg: TrainConfig, comm, agreed: Job | None = None) -> Job:
    """Every rank's :class:`Job` for ``cfg`` (collective over ``comm``).

    ``agreed``: :func:`~hpcsgd.train.preflight.agree_on_run`'s plan where the caller ran it already.
    """
    if agreed is None:
        run = agree_on_run(cfg, comm)
    else:  # agreed before torch's import (the command line): ranks may arrive seconds apart
        run = agreed
        WATCHDOG.arm(comm, cfg.collective_timeout)  # an untimed rendezvous again
    cfg = run.cfg  # with the run's R resolved: config.toml records it
    run.device = agree(comm, lambda: select_device(comm, cfg.device), "device")
    apply_threads(comm, cfg.threads)
    rates, network = run.rates, run.network  # agreed in agree_on_run, before torch's import
    held = run.membership.held_chunks
    run.data = agree(comm, lambda: load_rank_data(run.index, held, run.device, run.arrays), "shards")
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


def load_rank_data(index, held: list[int], device, arrays: tuple | None = None) -> RankData:
    """Only the chunks this rank holds (plus the test split), checked, on ``device``.

    ``arrays``: :func:`~hpcsgd.train.preflight.read_rank_arrays`'s, where they were read already.
    """
    numpy_chunks, (x_test, y_test) = arrays if arrays is not None else read_rank_arrays(index, held)
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
