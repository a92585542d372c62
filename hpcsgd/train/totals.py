"""A rank's running totals (phase times, skipped steps, diversity sums, the loss window) and
the run's summary: per-rank figures packed into one vector and summed by one Allreduce, then
written to summary.json before the final checkpoint, so a run that trained to its end keeps
its figures even when the disk is full."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.fractional import summary_of
from ..errors import CheckpointError, TrainingError
from ..algorithms.registry import REGISTRY


@dataclass
class Timers:
    """Cumulative seconds per phase of a step (the report's time breakdown)."""

    compute_s: float = 0.0
    comm_s: float = 0.0
    data_s: float = 0.0
    straggle_s: float = 0.0

    def as_dict(self) -> dict:
        return {k: round(v, 6) for k, v in vars(self).items()}


class RunTotals:
    """What a rank accumulates over a run besides the model, checkpointed with it.

    Attributes:
        timers: :class:`Timers`.
        skipped_steps: steps whose loss was not finite (nan_policy = skip).
        diversity_sums: inter, intra, count: the summary's means over log steps.
        loss_window: training losses since the last metrics line.
    """

    def __init__(self):
        self.timers = Timers()
        self.skipped_steps = 0
        self.diversity_sums = np.zeros(3)
        self.loss_window: list[float] = []

    def add_diversity(self, inter: float, intra: float) -> None:
        self.diversity_sums += np.array([inter, intra, 1.0])

    def take_loss_window(self) -> float | None:
        """The mean training loss since the last call (None if none), and a fresh window."""
        mean = float(np.mean(self.loss_window)) if self.loss_window else None
        self.loss_window = []
        return mean

    def state_dict(self) -> dict:
        return {
            "timers": dict(vars(self.timers)),
            "skipped_steps": self.skipped_steps,
            "diversity_sums": self.diversity_sums.tolist(),
            "loss_window": list(self.loss_window),
        }

    def load_state_dict(self, state: dict) -> None:
        for key, value in state["timers"].items():
            setattr(self.timers, key, value)
        self.skipped_steps = int(state["skipped_steps"])
        self.diversity_sums = np.asarray(state["diversity_sums"], dtype=np.float64)
        self.loss_window = [float(v) for v in state["loss_window"]]

    def summed(self, strategy, own_train: dict, own_test: dict) -> np.ndarray:
        """This rank's figures packed in one vector, summed over the live ranks by one Allreduce."""
        c, t = strategy.counters, self.timers
        per_rank = np.array(
            [
                own_train["loss"], own_test["accuracy"], own_train["accuracy"], own_test["loss"],
                *c.traffic(),
                t.compute_s, t.comm_s, t.data_s, self.skipped_steps, *self.diversity_sums,
            ]
        )
        totals = strategy.live_sum(per_rank)
        # Ranks that failed left their traffic with the survivors (each survivor holds the same sum).
        totals[4:10] += strategy.failed_counters.traffic()
        return totals


def _membership_summary(m) -> dict:
    """Who trained, who holds which chunks, and the share of samples still held."""
    return {
        "live_rank_ids": list(m.live),
        "coverage": m.coverage(),
        "placement": m.placement.kind,
        "ranks_per_node": m.placement.ranks_per_node,
        "failures": {str(r): s for r, s in sorted(m.faults.items())},
        "chunk_holders": {str(k): v for k, v in m.chunk_holders().items()},
        "departed": m.departed,
        "adopted_chunks": {str(c): r for c, r in m.adopted.items()},
    }


def summary(run, totals: np.ndarray, avg_train: dict, avg_test: dict, distance: float, wall: float) -> dict:
    """summary.json's content (DESIGN.md, "Run directory") from the summed per-rank figures.

    ``run`` is the assembled :class:`~hpcsgd.train.preflight.Job`.
    """
    from .resume import shard_identity

    cfg, sched, m = run.cfg, run.schedule, run.membership
    L = len(run.strategy.live_ranks)
    messages = totals[6] + totals[7]
    return {
        "algorithm": cfg.algorithm,
        "ranks": m.P,
        "q": cfg.q,
        "tau": cfg.tau if REGISTRY[cfg.algorithm].uses_tau else 1,
        "drop_rate": cfg.drop_rate if REGISTRY[cfg.algorithm].lossy else 0.0,
        "steps": sched.total_steps,
        "epochs": round(sched.total_steps / sched.steps_per_epoch, 6),
        "rounds": run.strategy.counters.rounds,
        "wall_s": round(wall, 3),
        "bytes_sent": int(totals[4]),
        "bytes_saved": int(totals[5]),
        "arrival_realised": float(totals[6] / messages) if messages else 1.0,
        # bytes_sent split by where they went, where the path knows it (0 and 0 when it does not).
        "bytes_intra_node": int(totals[8]),
        "bytes_inter_node": int(totals[9]),
        # How the rounds travelled: the block exchange's path (shared-memory, alltoallv,
        # allreduce when lossless), or allreduce for sync and local.
        "exchange": run.strategy.exchange_path,
        **{key: round(value, 3) for key, value in run.strategy.network_stats().items()},
        "skipped_steps": int(totals[13]),
        "live_ranks": L,
        **_membership_summary(m),
        "reweight": cfg.reweight,
        "world_size": run.comm.size,
        "train_loss": avg_train["loss"],
        "train_accuracy": avg_train["accuracy"],
        "test_loss": avg_test["loss"],
        "test_accuracy": avg_test["accuracy"],
        "per_class_accuracy": avg_test["per_class_accuracy"],
        "train_loss_rank_mean": totals[0] / L,
        "test_accuracy_rank_mean": totals[1] / L,
        "train_accuracy_rank_mean": totals[2] / L,
        "test_loss_rank_mean": totals[3] / L,
        "consensus_distance": distance,
        **_diversity_summary(cfg, totals[14:17]),
        "compute_s_mean": totals[10] / L,
        "comm_s_mean": totals[11] / L,
        "data_s_mean": totals[12] / L,
        "model": cfg.model,
        "partition": run.index.partition,
        "shards": shard_identity(run.index),  # the data's content digest: `hpcsgd report` groups by it
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        **_data_summary(run),
        "lr": cfg.lr,
        "steps_per_epoch": sched.steps_per_epoch,
    }


def _data_summary(run) -> dict:
    """Redundancy (mean and per rank), batch per rank and the objective the loss ran (ALGORITHMS.md,
    "Fractional and per-rank redundancy"); ``batch_per_rank`` as configured (balancing may update it)."""
    cfg, m = run.cfg, run.membership
    per_rank = m.redundancy.per_rank if m.redundancy is not None else (float(cfg.q - 1),) * m.P
    weighted = m.redundancy is None and (cfg.reweight or len(set(m.chunk_sizes or [0])) > 1)
    return {**summary_of(per_rank, cfg.batch_sizes(m.P)),
            "objective": f"chunk_weighting {cfg.chunk_weighting}" if weighted else "batch mean"}


def write_summary(comm, run_dir: Path, result: dict | None) -> dict | None:
    """summary.json from ``result`` (rank 0's; None elsewhere), agreed on by the ranks of ``comm``.

    When it cannot be written (a full disk), rank 0 prints it on stdout first, so the figures of
    a run that trained to its end are never lost, and every rank ends with the same message.
    """
    from ..comm.agree import agree
    from ..metrics import atomic_write_text, cannot_write, dumps

    path = Path(run_dir) / "summary.json"

    def write() -> None:
        if result is None:
            return
        text = dumps(result) + "\n"
        try:
            atomic_write_text(path, text)
        except OSError as exc:
            sys.stdout.write(text)
            sys.stdout.flush()
            raise TrainingError(f"{cannot_write(path, exc, len(text.encode()))}; the run trained to its end: its "
                                f"summary is printed on stdout; free space and rerun with --resume to write it") from None

    agree(comm, write, "summary")
    return result


def ending_checkpoint(run_dir: Path, save: Callable[[], None]) -> None:
    """The final checkpoint, written after summary.json: its failure says the figures are safe."""
    try:
        save()
    except CheckpointError as exc:
        error = CheckpointError(f"{exc}; the run trained to its end: its figures are in {Path(run_dir) / 'summary.json'}")
        error.collective = getattr(exc, "collective", False)
        raise error from None


def _diversity_summary(cfg, sums: np.ndarray) -> dict:
    """Mean diversities over log steps (inter: every rank logs the same value; intra: over ranks too)."""
    if not cfg.grad_diversity or sums[2] == 0:
        return {}
    return {"grad_diversity_inter": float(sums[0] / sums[2]), "grad_diversity_intra": float(sums[1] / sums[2])}


__all__ = ["RunTotals", "Timers", "ending_checkpoint", "summary", "write_summary"]
