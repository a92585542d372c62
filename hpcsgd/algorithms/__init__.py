"""Training strategies behind one small interface; :func:`make_strategy` picks one by name."""

from __future__ import annotations

import torch

from ..comm import Collectives, FlatParams, LinkRates
from .base import Strategy
from .local import LocalSGD
from .lossy_allreduce import LossyAllreduce
from .rps import RPS
from .sync import SyncSGD

STRATEGIES = {cls.name: cls for cls in (SyncSGD, LocalSGD, RPS, LossyAllreduce)}


def make_strategy(
    name: str,
    coll: Collectives,
    flat: FlatParams,
    optimizer: torch.optim.Optimizer,
    *,
    tau: int = 1,
    rates: LinkRates | None = None,
    seed: int = 0,
    average_optimizer_state: bool = False,
    overlap: bool = True,
    bucket_mb: float = 25.0,
) -> Strategy:
    """Build the strategy ``name`` (sync, local, rps, lossy-allreduce)."""
    if name == "sync":
        return SyncSGD(coll, flat, optimizer, tau=1, overlap=overlap, bucket_mb=bucket_mb)
    if name == "local":
        return LocalSGD(coll, flat, optimizer, tau=tau, average_optimizer_state=average_optimizer_state)
    rates = rates if rates is not None else LinkRates.build(coll.size)
    if name == "rps":
        return RPS(coll, flat, optimizer, tau=tau, rates=rates, seed=seed, average_optimizer_state=average_optimizer_state)
    if name == "lossy-allreduce":
        return LossyAllreduce(coll, flat, optimizer, tau=1, rates=rates, seed=seed)
    raise ValueError(f"algorithm must be one of {', '.join(STRATEGIES)}, got {name!r}")


__all__ = ["STRATEGIES", "Strategy", "make_strategy"]
