"""The contiguous cut of a flat buffer into one block per rank (RPS, lossy exchange)."""

import numpy as np

from ..errors import ConfigError


def block_offsets(d: int, parts: int, align: int = 1) -> np.ndarray:
    """Offsets of `parts` contiguous blocks covering `d` elements: block j is [o[j], o[j+1]).

    With align=1 the sizes differ by at most one element (the first `d % parts` blocks are one
    longer). With align > 1 every block but the last starts at a multiple of `align`, which
    keeps blocks on cache-line or vector boundaries; sizes then differ by at most `align`.

    Returns:
        int64 array of length parts + 1, o[0] = 0, o[-1] = d, non-decreasing.
    """
    if parts < 1:
        raise ConfigError(f"parts must be >= 1, got {parts}")
    if d < 0:
        raise ConfigError(f"d must be >= 0, got {d}")
    if align < 1:
        raise ConfigError(f"align must be >= 1, got {align}")
    units, rest = divmod(d, align)
    base, extra = divmod(units, parts)
    sizes = np.full(parts, base * align, dtype=np.int64)
    sizes[:extra] += align
    sizes[-1] += rest  # the tail shorter than one alignment unit goes to the last block
    offsets = np.zeros(parts + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return offsets
