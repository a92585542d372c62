"""RunLog: a user's own training loop writes the run directory ``hpcsgd report`` reads.

The format is DESIGN.md's: ``config.toml``, ``metrics/rank-K.jsonl`` (one JSON object per
logged step) and ``summary.json`` (rank 0, at the end).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .data.assignment import coverage
from .errors import ConfigError
from .metrics import MetricsWriter, atomic_write_text, dumps, toml_text


def _last_wall(path: Path) -> float:
    """``wall_s`` of the last record in ``path`` (0 when there is none)."""
    lines = path.read_text().splitlines() if path.exists() else []
    return float(json.loads(lines[-1]).get("wall_s") or 0.0) if lines else 0.0


def _drop_departed(run_dir: Path, step: int, playing: list[int]) -> None:
    """Drop records past ``step`` from the files of ranks no process plays any more."""
    for path in (run_dir / "metrics").glob("rank-*.jsonl"):
        try:
            rank = int(path.stem.split("-", 1)[1])
        except ValueError:
            continue
        if rank not in playing:
            MetricsWriter(run_dir, rank, step).close()


class RunLog:
    """Writes one run directory from every rank of ``world``.

    Args:
        run_dir: the directory (created by rank 0).
        world: from :func:`hpcsgd.init`; after a resume on fewer ranks ``strategy.world``
            (each process writes the file of the run rank it plays).
        config: what the run was (``algorithm``, ``q``, ``tau``, ``drop_rate``, ``lr``, ...);
            written as ``config.toml``, and its keys start the summary. Scalars and lists only.
        resume_step: continue the run resumed at this step (what :func:`hpcsgd.load_checkpoint`
            returned): records past it, written by the interrupted run, are dropped from every
            rank's file (departed ranks' too), and the wall time goes on from the record at it.
        sampler: the run's :class:`~hpcsgd.RedundantSampler`: records and the summary then
            carry ``coverage`` (the share of chunks the live ranks hold, adopted ones included).

    Example::

        log = hpcsgd.RunLog("runs/mine", world, {"algorithm": "rps", "q": 2, "lr": 0.1})
        for step in range(steps):
            ...  # forward, backward, strategy.step()
            if step % 50 == 0:
                log.log(step + 1, strategy, loss=loss.item())  # steps done
        log.finish(strategy)  # summary.json; then: hpcsgd report runs/mine --out report
    """

    def __init__(self, run_dir, world, config: dict | None = None, resume_step: int | None = None, sampler=None):
        self.run_dir = Path(run_dir)
        self.world = world
        self.config = dict(config or {})
        self.sampler = sampler
        if resume_step is not None and (isinstance(resume_step, bool) or not isinstance(resume_step, int)
                                        or resume_step < 0):
            raise ConfigError(f"resume_step must be an integer >= 0 (the step load_checkpoint returned), "
                              f"got {resume_step!r}")
        error = None
        playing = world.comm.allgather(world.rank) if resume_step is not None else []
        if world.comm.rank == 0:
            try:
                (self.run_dir / "metrics").mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.run_dir / "config.toml", toml_text(self.config, "hpcsgd.RunLog"))
                if resume_step is not None:
                    _drop_departed(self.run_dir, resume_step, playing)
            except OSError as exc:
                error = f"cannot write the run directory {self.run_dir}: {exc.strerror}"
        error = world.comm.bcast(error, root=0)
        if error:
            raise ConfigError(error)
        self.metrics = MetricsWriter(self.run_dir, world.rank, resume_step)
        # The wall time goes on from this rank's last record at or before the resume step.
        self.t_start = time.perf_counter() - (_last_wall(self.metrics.path) if resume_step is not None else 0.0)

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
            if self.sampler is not None:
                record["coverage"] = self.sampler.coverage(strategy.live_ranks)
            record["consensus_distance"] = strategy.consensus_distance()
        self.metrics.write(record)
        return record

    def finish(self, strategy=None, rank_means: dict | None = None, **summary) -> dict | None:
        """Close the metrics and write ``summary.json`` (collective); returns it on rank 0.

        Always ``ranks`` (the run's P) and ``world_size`` (processes). With ``strategy``:
        ``algorithm``, ``rounds``, bytes summed over the live ranks (and the traffic failed
        ranks handed over), ``arrival_realised``, ``live_ranks``, ``consensus_distance`` and
        ``coverage`` (from the sampler given to the RunLog; else from ``config["q"]``, 1 if
        absent, with no adopted chunks). ``rank_means``: per-rank numbers (each rank's own model),
        averaged over the live ranks and written as ``KEY_rank_mean`` (needs ``strategy``).
        ``summary``: any other keys (``test_accuracy`` of the averaged model, ...).
        """
        out = {**self.config, "wall_s": round(time.perf_counter() - self.t_start, 3),
               "ranks": max(self.world.size, self.world.comm.size), "world_size": self.world.comm.size}
        if strategy is not None:
            out.update(self._strategy_summary(strategy))
            out["coverage"] = self._coverage(strategy)
            keys = sorted(rank_means or {})
            if keys:
                sums = strategy.live_sum(np.array([float(rank_means[k]) for k in keys]))
                out.update({f"{k}_rank_mean": float(v) / len(strategy.live_ranks) for k, v in zip(keys, sums)})
        out.update(summary)
        self.metrics.close()
        writer = self.world.comm.rank == 0 if strategy is None else strategy.live_rank == 0  # first live rank
        if not writer:
            return None
        atomic_write_text(self.run_dir / "summary.json", dumps(out) + "\n")
        return out

    def _coverage(self, strategy) -> float:
        if self.sampler is not None:
            return self.sampler.coverage(strategy.live_ranks)
        q = int(self.config.get("q") or 1)
        return coverage(strategy.world.size, min(q, strategy.world.size), strategy.live_ranks)

    @staticmethod
    def _strategy_summary(strategy) -> dict:
        c = strategy.counters
        totals = strategy.live_sum(c.traffic()) + strategy.failed_counters.traffic()
        messages = totals[2] + totals[3]
        return {
            "algorithm": strategy.name,
            "ranks": strategy.world.size,
            "steps": strategy.steps,
            "rounds": c.rounds,
            "bytes_sent": int(totals[0]),
            "bytes_saved": int(totals[1]),
            "arrival_realised": float(totals[2] / messages) if messages else 1.0,
            "bytes_intra_node": int(totals[4]),
            "bytes_inter_node": int(totals[5]),
            "live_ranks": len(strategy.live_ranks),
            "live_rank_ids": list(strategy.live_ranks),
            "consensus_distance": strategy.consensus_distance(),
        }


__all__ = ["RunLog"]
