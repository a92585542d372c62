"""hpcsgd: MPI-native data-parallel PyTorch training with RI-SGD and RPS.

A library first; ``hpcsgd train`` is one client of it. Under ``mpiexec -n P``::

    world = hpcsgd.init()
    sampler = hpcsgd.RedundantSampler(dataset, world, q=2, batch_size=16, partition="label")
    strategy = hpcsgd.RPS(model, opt, world, tau=1, drop_rate=0.1)
    ...  opt.zero_grad(); loss.backward(); strategy.step()

Importing the package has no side effects: no communicator is created, no RNG is seeded,
not even torch or mpi4py is imported until a name below is first used.
"""

from __future__ import annotations

import importlib

# Bound now, not lazily: the submodule hpcsgd.progress (stdlib imports only) would otherwise
# take the name when the CLI first imports it, and hpcsgd.progress(loader, world) would break.
from .progress import progress

__version__ = "0.1.0"

# name -> module that defines it; imported on first use (PEP 562).
_LAZY = {
    "World": "world",
    "init": "world",
    "RedundantSampler": "redundant",
    "Strategy": "algorithms.base",
    "SyncSGD": "algorithms.sync",
    "LocalSGD": "algorithms.local",
    "RPS": "algorithms.rps",
    "LossyAllreduce": "algorithms.lossy_allreduce",
    "link_rates": "algorithms.links",
    "link_network": "algorithms.links",
    "save_checkpoint": "state",
    "load_checkpoint": "state",
    "RunLog": "runlog",
    "HpcsgdError": "errors",
    "ConfigError": "errors",
    "CheckpointError": "errors",
}

__all__ = [
    "CheckpointError",
    "ConfigError",
    "HpcsgdError",
    "LocalSGD",
    "LossyAllreduce",
    "RPS",
    "RedundantSampler",
    "RunLog",
    "Strategy",
    "SyncSGD",
    "World",
    "init",
    "link_network",
    "link_rates",
    "load_checkpoint",
    "progress",
    "save_checkpoint",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hpcsgd' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
