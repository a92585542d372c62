"""Cut a training set into exactly ``P`` disjoint chunks (ALGORITHMS.md, "Data").

Partitions:

- ``iid``: a seeded random permutation cut into ``P`` pieces of equal size (±1);
- ``label``: samples sorted by label (stable) and cut contiguously, the strongly
  non-i.i.d. case RI-SGD targets;
- ``dirichlet:ALPHA``: per class, proportions over the ``P`` chunks drawn from
  Dirichlet(ALPHA); small ALPHA gives strong label skew (the usual federated benchmark).
"""

from __future__ import annotations

import math

import numpy as np

from hpcsgd.errors import ConfigError

PARTITIONS = ("iid", "label", "dirichlet:ALPHA")
_DIRICHLET_TRIES = 100


def parse_partition(spec: str) -> tuple[str, float | None]:
    """Parse ``"iid"``, ``"label"`` or ``"dirichlet:ALPHA"`` into ``(kind, alpha)``."""
    if not isinstance(spec, str):
        raise ConfigError(f"partition must be one of {', '.join(PARTITIONS)}, got {spec!r}")
    text = spec.strip().lower()
    if text in ("iid", "label"):
        return text, None
    kind, sep, value = text.partition(":")
    if kind == "dirichlet" and sep:
        try:
            alpha = float(value)
        except ValueError:
            alpha = math.nan
        if not (math.isfinite(alpha) and alpha > 0):
            raise ConfigError(
                f"partition {spec!r}: ALPHA in dirichlet:ALPHA must be a finite number > 0, "
                f"got {value!r}"
            )
        return "dirichlet", alpha
    raise ConfigError(
        f"partition must be one of {', '.join(PARTITIONS)} (ALPHA > 0), got {spec!r}"
    )


def partition_indices(labels: np.ndarray, P: int, spec: str, seed: int) -> list[np.ndarray]:
    """Split sample indices ``0..N-1`` into ``P`` disjoint, complete chunks.

    Args:
        labels: integer class labels, shape ``(N,)``.
        P: number of chunks (one per rank), ``1 <= P <= N``.
        spec: partition spec, see :func:`parse_partition`.
        seed: seed for ``np.random.default_rng``; the result depends only on the inputs.

    Returns:
        ``P`` int64 arrays, each sorted ascending.
    """
    kind, alpha = parse_partition(spec)
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ConfigError(f"labels must be one-dimensional, got shape {labels.shape}")
    n = labels.shape[0]
    if isinstance(P, bool) or not isinstance(P, (int, np.integer)) or not 1 <= P <= n:
        raise ConfigError(f"parts P must be in 1..N={n} (the number of samples), got {P!r}")
    P = int(P)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"partition seed must be an integer >= 0, got {seed!r}")
    rng = np.random.default_rng(seed)

    if kind == "iid":
        pieces = np.array_split(rng.permutation(n), P)
    elif kind == "label":
        pieces = np.array_split(np.argsort(labels, kind="stable"), P)
    else:
        pieces = _dirichlet(labels, P, alpha, rng, spec)
    return [np.sort(p).astype(np.int64, copy=False) for p in pieces]


def _dirichlet(
    labels: np.ndarray, P: int, alpha: float, rng: np.random.Generator, spec: str
) -> list[np.ndarray]:
    """Per class, split its shuffled indices over ``P`` chunks by Dirichlet proportions."""
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == k) for k in classes]
    for _ in range(_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(P)]
        for idx in by_class:
            idx = rng.permutation(idx)
            props = rng.dirichlet(np.full(P, alpha))
            # Cumulative cut points; rounding keeps every sample, the last cut is len(idx).
            cuts = np.round(np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
            for c, piece in enumerate(np.split(idx, cuts)):
                parts[c].append(piece)
        chunks = [np.concatenate(p) for p in parts]
        if all(len(c) > 0 for c in chunks):
            return chunks
    raise ConfigError(
        f"partition {spec!r} left a chunk empty in {_DIRICHLET_TRIES} tries "
        f"(N={len(labels)} samples, P={P} parts): use a larger ALPHA or fewer parts"
    )
