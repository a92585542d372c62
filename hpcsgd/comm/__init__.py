"""The MPI layer: flat parameter buffer, averaging collectives, the lossy block exchange.

It never imports models or data code; strategies reach MPI only through it.
"""

from .blocks import block_offsets
from .collectives import Collectives, CommCounters
from .exchange import BlockExchange
from .flat import FlatParams
from .lossy import LinkRates, arrival_mask, uniforms

__all__ = [
    "BlockExchange",
    "Collectives",
    "CommCounters",
    "FlatParams",
    "LinkRates",
    "arrival_mask",
    "block_offsets",
    "uniforms",
]
