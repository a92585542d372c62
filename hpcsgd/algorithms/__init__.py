"""The per-step algorithms behind one small interface (:class:`Strategy`).

Users and ``hpcsgd train`` build them through :mod:`hpcsgd.strategies`; which ones exist is
stated once, in :mod:`hpcsgd.registry`.
"""

from __future__ import annotations

from .base import Strategy
from .local import LocalSGD
from .lossy_allreduce import LossyAllreduce
from .rps import RPS
from .sync import SyncSGD

__all__ = ["LocalSGD", "LossyAllreduce", "RPS", "Strategy", "SyncSGD"]
