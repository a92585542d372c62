"""The MPI layer: flat parameter buffer, averaging collectives, the lossy block exchange.

It never imports models or data code; strategies reach MPI only through it. Names load on
first use (PEP 562), so ``hpcsgd.comm.agree`` and ``hpcsgd.comm.watchdog`` import without
torch: the command line claims the run directory before torch's slow import.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BlockExchange": ".exchange",
    "Collectives": ".collectives",
    "CommCounters": ".collectives",
    "FlatParams": ".flat",
    "LinkRates": "..faults.lossy",
    "arrival_mask": "..faults.lossy",
    "block_offsets": ".blocks",
    "uniforms": "..faults.lossy",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
