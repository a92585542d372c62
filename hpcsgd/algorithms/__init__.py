"""The strategies: one module and one class each, the class a user builds (``hpcsgd.RPS``, ...).

:mod:`.base` holds what every strategy shares, :mod:`.periodic` what local SGD and RPS share
(the period, the overlapped round, optimizer state); :mod:`.registry` says which exist.
Names load on first use (PEP 562), so the registry imports without torch: the command line
validates a config before torch's slow import.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Strategy": ".base",
    "PeriodicStrategy": ".periodic",
    "SyncSGD": ".sync",
    "LocalSGD": ".local",
    "RPS": ".rps",
    "LossyAllreduce": ".lossy_allreduce",
    "link_rates": ".links",
    "link_network": ".links",
    "Algorithm": ".registry",
    "build": ".registry",
    "register": ".registry",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
