"""RunLog: a user's own training loop writes the run directory ``hpcsgd report`` reads.

The format is DESIGN.md's: ``config.toml``, ``metrics/rank-K.jsonl`` (one JSON object per
logged step) and ``summary.json`` (rank 0, at the end).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .metrics import MetricsWriter, atomic_write_text, dumps


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string is a JSON string


class RunLog:
    """Writes one run directory from every rank of ``world``.

    Args:
        run_dir: the directory (created by rank 0).
        world: from :func:`hpcsgd.init`.
        config: what the run was (``algorithm``, ``q``, ``tau``, ``drop_rate``, ``lr``, ...);
            written as ``config.toml``, and its keys start the summary. Scalars and lists only.
    """

    def __init__(self, run_dir, world, config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.world = world
        self.config = dict(config or {})
        self.t_start = time.perf_counter()
        error = None
        if world.comm.rank == 0:
            try:
                (self.run_dir / "metrics").mkdir(parents=True, exist_ok=True)
                lines = [f"{k} = {_toml_value(v)}" for k, v in self.config.items() if v is not None]
                atomic_write_text(self.run_dir / "config.toml", "\n".join(["# hpcsgd.RunLog", *lines]) + "\n")
            except OSError as exc:
                error = f"cannot write the run directory {self.run_dir}: {exc.strerror}"
        error = world.comm.bcast(error, root=0)
        if error:
            raise ConfigError(error)
        self.metrics = MetricsWriter(self.run_dir, world.rank)

    def log(self, step: int, strategy=None, **fields) -> dict:
        """Write one record for ``step`` (steps done) on this rank and return it.

        With ``strategy`` the record also gets its traffic counters, live ranks and the
        consensus distance (a collective: every live rank must log the same steps).
        ``fields``: anything else (``loss``, ``epoch``, ``lr``, eval metrics, ...).
        """
        record = {"step": int(step), **fields, "wall_s": round(time.perf_counter() - self.t_start, 6)}
        if strategy is not None:
            record.update(strategy.counters.as_dict())
            record["arrival"] = strategy.counters.arrival
            record["live_ranks"] = len(strategy.live_ranks)
            record["consensus_distance"] = strategy.consensus_distance()
        self.metrics.write(record)
        return record

    def finish(self, strategy=None, rank_means: dict | None = None, **summary) -> dict | None:
        """Close the metrics and write ``summary.json`` (collective); returns it on rank 0.

        With ``strategy``: ``algorithm``, ``ranks``, ``rounds``, bytes summed over the live
        ranks (and the traffic failed ranks handed over), ``arrival_realised``, ``live_ranks``
        and ``consensus_distance``. ``rank_means``: per-rank numbers (each rank's own model),
        averaged over the live ranks and written as ``KEY_rank_mean`` (needs ``strategy``).
        ``summary``: any other keys (``test_accuracy`` of the averaged model, ...).
        """
        out = {**self.config, "wall_s": round(time.perf_counter() - self.t_start, 3)}
        if strategy is not None:
            out.update(self._strategy_summary(strategy))
            keys = sorted(rank_means or {})
            if keys:
                sums = strategy.coll.sum_float64(np.array([float(rank_means[k]) for k in keys]))
                out.update({f"{k}_rank_mean": float(v) / strategy.coll.size for k, v in zip(keys, sums)})
        out.update(summary)
        self.metrics.close()
        writer = self.world.comm.rank == 0 if strategy is None else strategy.coll.rank == 0  # first live rank
        if not writer:
            return None
        atomic_write_text(self.run_dir / "summary.json", dumps(out) + "\n")
        return out

    @staticmethod
    def _strategy_summary(strategy) -> dict:
        c = strategy.counters
        mine = np.array([c.bytes_sent, c.bytes_saved, c.messages_sent, c.messages_dropped], dtype=np.float64)
        totals = strategy.coll.sum_float64(mine) + strategy.failed_counters
        messages = totals[2] + totals[3]
        return {
            "algorithm": strategy.name,
            "ranks": strategy.world.size,
            "steps": strategy.steps,
            "rounds": c.rounds,
            "bytes_sent": int(totals[0]),
            "bytes_saved": int(totals[1]),
            "arrival_realised": float(totals[2] / messages) if messages else 1.0,
            "live_ranks": len(strategy.live_ranks),
            "live_rank_ids": list(strategy.live_ranks),
            "consensus_distance": strategy.consensus_distance(),
        }


__all__ = ["RunLog"]
