"""Offline analysis of run directories: load runs, compare them in tables and figures.

Reads only what `hpcsgd train` writes (config.toml, metrics/rank-K.jsonl, summary.json); needs
numpy, and matplotlib for figures. Never imports torch or mpi4py.
"""

from .runs import Run, load_run, load_runs

__all__ = ["Run", "load_run", "load_runs"]
