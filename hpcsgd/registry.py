"""What each algorithm is, stated once; the config, the trainer, the strategies and the bench read it.

No torch, no MPI: the config validates names against it before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Algorithm:
    """One training algorithm (ALGORITHMS.md).

    Attributes:
        name: the ``--algorithm`` value.
        strategy: the class in :mod:`hpcsgd.strategies` a user builds (``hpcsgd.<strategy>``).
        uses_tau: averages every ``tau`` steps (else ``tau`` is ignored: it communicates every step).
        flat_grad: exchanges gradients, so keeps them in one flat buffer.
        lossy: its messages go through the loss layer (drop rates apply).
        overlaps: averages gradient buckets while backward runs (``overlap``, ``bucket_mb``).
    """

    name: str
    strategy: str
    uses_tau: bool
    flat_grad: bool
    lossy: bool
    overlaps: bool = False

    @property
    def every_step(self) -> bool:
        """Whether it communicates at every step."""
        return not self.uses_tau


REGISTRY: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("sync", "SyncSGD", uses_tau=False, flat_grad=True, lossy=False, overlaps=True),
        Algorithm("local", "LocalSGD", uses_tau=True, flat_grad=False, lossy=False),
        Algorithm("rps", "RPS", uses_tau=True, flat_grad=False, lossy=True),
        Algorithm("lossy-allreduce", "LossyAllreduce", uses_tau=False, flat_grad=True, lossy=True),
    )
}
ALGORITHMS = tuple(REGISTRY)


def algorithm(name: str) -> Algorithm:
    """The algorithm called ``name``; a ConfigError naming the choices otherwise."""
    if name not in REGISTRY:
        raise ConfigError(f"algorithm must be one of {', '.join(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


__all__ = ["ALGORITHMS", "Algorithm", "REGISTRY", "algorithm"]
