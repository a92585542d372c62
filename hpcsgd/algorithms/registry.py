"""Which strategies exist: one line each, naming the class and what the config needs to know.

No torch, no MPI at import: the config and the command line validate names against it before
anything heavy is imported, so a line names its class by import path and the class is
imported on first use. Adding a strategy is one module and one line here (or one call to
:func:`register` from anywhere, as the tests do for a strategy of their own).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Algorithm:
    """One training algorithm (ALGORITHMS.md).

    Attributes:
        name: the ``--algorithm`` value.
        strategy: its class, or the class's import path ``"package.module:Class"``.
        uses_tau: averages every ``tau`` steps (else ``tau`` is ignored: it communicates every step).
        lossy: its messages go through the loss layer (drop rates apply).
        overlaps: averages gradient buckets while backward runs (``overlap``, ``bucket_mb``).
    """

    name: str
    strategy: object
    uses_tau: bool
    lossy: bool
    overlaps: bool = False

    @property
    def every_step(self) -> bool:
        """Whether it communicates at every step."""
        return not self.uses_tau

    @property
    def cls(self) -> type:
        """The strategy class (imported here the first time: torch and MPI come with it)."""
        if not isinstance(self.strategy, str):
            return self.strategy
        module, _, name = self.strategy.partition(":")
        return getattr(importlib.import_module(module), name)


REGISTRY: dict[str, Algorithm] = {}


def register(spec: Algorithm) -> Algorithm:
    """Add ``spec`` (a name taken already is refused, so no strategy is replaced by accident)."""
    if spec.name in REGISTRY:
        raise ConfigError(f"algorithm {spec.name!r} is registered already")
    REGISTRY[spec.name] = spec
    return spec


register(Algorithm("sync", "hpcsgd.algorithms.sync:SyncSGD", uses_tau=False, lossy=False, overlaps=True))
register(Algorithm("local", "hpcsgd.algorithms.local:LocalSGD", uses_tau=True, lossy=False))
register(Algorithm("rps", "hpcsgd.algorithms.rps:RPS", uses_tau=True, lossy=True))
register(Algorithm("lossy-allreduce", "hpcsgd.algorithms.lossy_allreduce:LossyAllreduce", uses_tau=False, lossy=True))
ALGORITHMS = tuple(REGISTRY)  # the built-in choices of --algorithm


def algorithm(name: str) -> Algorithm:
    """The algorithm called ``name``; a ConfigError naming the choices otherwise."""
    if name not in REGISTRY:
        raise ConfigError(f"algorithm must be one of {', '.join(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


def build(name: str, model, optimizer, world, **options):
    """The strategy ``name`` (``sync``, ``local``, ``rps``, ``lossy-allreduce``, or one registered) with its options."""
    return algorithm(name).cls(model, optimizer, world, **options)


__all__ = ["ALGORITHMS", "Algorithm", "REGISTRY", "algorithm", "build", "register"]
