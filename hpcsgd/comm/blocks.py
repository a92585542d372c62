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


# The order a block's average adds its rows in (ALGORITHMS.md, RPS step 3). Every path of the
# exchange adds rows ``i in N_j`` by one fixed binary tree over the live ranks ``0..P-1``: a range
# ``[lo, hi)`` is the sum of ``[lo, mid)`` and ``[mid, hi)``, ``mid - lo`` the largest power of two
# below ``hi - lo``, and a range none of whose rows arrived is left out. The tree depends on P
# alone, so a node whose ranks fill a subtree (R = 2^m consecutive ranks, as nodes of R ranks are)
# can add its own rows before they cross the network and send one message where it sent R, with
# the same bits as adding them at the block's owner.

def tree_split(lo: int, hi: int) -> int:
    """The split point of range ``[lo, hi)`` (``hi - lo >= 2``) in the summation tree."""
    return lo + (1 << ((hi - lo - 1).bit_length() - 1))


def maximal_subtrees(members: np.ndarray, lo: int = 0, hi: int | None = None) -> list[tuple[int, int]]:
    """The largest tree ranges ``[a, b)`` inside ``[lo, hi)`` whose ranks are all ``members``
    (a bool per rank), in rank order: they cover the members exactly once."""
    hi = len(members) if hi is None else hi
    if hi <= lo:
        return []
    if members[lo:hi].all():
        return [(lo, hi)]
    if hi - lo == 1 or not members[lo:hi].any():
        return []
    mid = tree_split(lo, hi)
    return maximal_subtrees(members, lo, mid) + maximal_subtrees(members, mid, hi)


class TreeSum:
    """Adds pieces of a block in the tree order, reusing scratch buffers between calls.

    ``pieces`` maps a tree range ``(lo, hi)`` to its sum (a row: ``(i, i + 1)``; a partial sum
    a node added: a wider range); a range with no piece and no pieces below it is left out.
    """

    def __init__(self):
        self._scratch: dict[tuple[int, int], np.ndarray] = {}

    def into(self, out: np.ndarray, pieces: dict, lo: int, hi: int) -> bool:
        """``out`` <- the sum of the pieces inside ``[lo, hi)``; False (``out`` untouched) if none."""
        total = self._sum(pieces, lo, hi, len(out))
        if total is None:
            return False
        if total is not out:
            np.copyto(out, total)
        return True

    def _sum(self, pieces: dict, lo: int, hi: int, n: int) -> np.ndarray | None:
        piece = pieces.get((lo, hi))
        if piece is not None or hi - lo < 2:
            return piece
        mid = tree_split(lo, hi)
        left = self._sum(pieces, lo, mid, n)
        right = self._sum(pieces, mid, hi, n)
        if left is None or right is None:
            return right if left is None else left
        # Each range adds into a buffer of its own, so no sum is overwritten before its parent
        # has used it (the buffers together hold at most P - 1 blocks).
        out = self._scratch.get((lo, hi))
        if out is None or out.size < n:
            out = self._scratch[(lo, hi)] = np.empty(n, dtype=left.dtype)
        out = out[:n]
        np.add(left, right, out=out)
        return out
