"""The step counts every rank shares (epochs, log, eval and checkpoint points, learning rate)
and the settings that are legal but do nothing in a run."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import TrainConfig
from ..algorithms.registry import REGISTRY


@dataclass
class Schedule:
    """Step counts shared by every rank, derived from the shard index and the config."""

    steps_per_epoch: int
    total_steps: int
    log_every: int
    eval_every: int  # 0: only at the end
    checkpoint_every: int  # 0: only at the end

    @classmethod
    def from_config(cls, cfg: TrainConfig, train_size: int, parts: int) -> "Schedule":
        # One epoch is one pass over a rank's own chunk, the same for every q (ALGORITHMS.md);
        # it is computed from the mean chunk size so that every rank runs the same steps. With
        # per-rank batches, from their mean: ceil(N / sum_i b_i) (= ceil(N / P / b) for one b).
        spe = max(1, -(-train_size // sum(cfg.batch_sizes(parts))))
        total = cfg.steps if cfg.steps > 0 else max(1, round(cfg.epochs * spe))
        log_every = cfg.log_every or max(1, spe // 10)
        eval_every = round(cfg.eval_every * spe) if cfg.eval_every > 0 else 0
        return cls(spe, total, log_every, max(eval_every, 0), cfg.checkpoint_every)

    def logs_at(self, step: int) -> bool:
        """Whether step ``step`` (0-based) ends with a metrics line."""
        done = step + 1
        return done % self.log_every == 0 or self.evaluates_at(step) or done == self.total_steps

    def evaluates_at(self, step: int) -> bool:
        """Whether the metrics line after step ``step`` carries an evaluation."""
        return self.eval_every > 0 and (step + 1) % self.eval_every == 0

    def checkpoints_after(self, done: int) -> bool:
        """Whether a periodic checkpoint is due after ``done`` steps (the last one is always written)."""
        return bool(self.checkpoint_every) and done % self.checkpoint_every == 0 and done < self.total_steps

    def lr_at(self, cfg: TrainConfig, step: int) -> float:
        """Learning rate of ``step``: warm-up, then constant, step decay or cosine.

        The cosine runs over the steps after the warm-up, so it starts at ``lr`` where the
        warm-up ends (no jump) and reaches 0 at the end of the run.
        """
        epoch = step / self.steps_per_epoch
        warmup_steps = cfg.warmup_epochs * self.steps_per_epoch
        if warmup_steps > 0 and step < warmup_steps:
            return cfg.lr * (0.1 + 0.9 * step / warmup_steps)
        if cfg.lr_schedule == "step":
            return cfg.lr * cfg.lr_gamma ** sum(epoch >= m for m in cfg.lr_milestones)
        if cfg.lr_schedule == "cosine":
            span = self.total_steps - warmup_steps
            # pi * steps / span in this order: without warm-up, exactly the old arithmetic.
            angle = math.pi * (step - warmup_steps) / span if span > 0 else math.pi
            return cfg.lr * 0.5 * (1 + math.cos(angle))
        return cfg.lr


def pointless_settings(cfg: TrainConfig, total_steps: int) -> list[str]:
    """Settings that are legal but do nothing in this run, each as a one-line warning.

    The summary records the effective values (drop rate 0, no such failure).
    """
    found = []
    lossy = cfg.drop_rate or cfg.drop_rate_phase1 or cfg.drop_rate_phase2 or cfg.link_drop or cfg.link_drop_file
    if lossy and not REGISTRY[cfg.algorithm].lossy:
        found.append(
            f"drop rates apply to rps and lossy-allreduce only; {cfg.algorithm} sends no block messages "
            f"(recorded as drop_rate 0)"
        )
    if REGISTRY[cfg.algorithm].every_step:
        if cfg.tau != 1:
            found.append(f"tau={cfg.tau} is ignored: {cfg.algorithm} communicates every step")
        if cfg.average_optimizer_state:
            found.append(f"average_optimizer_state does nothing under {cfg.algorithm} (replicas share every step)")
        if cfg.average_weights != "equal":
            found.append(f"average_weights applies to local and rps only; {cfg.algorithm} averages gradients")
        if cfg.overlap_rounds:
            found.append(f"overlap_rounds applies to local and rps only; {cfg.algorithm} averages gradients every step "
                         f"(sync overlaps its buckets with backward: see overlap)")
    elif cfg.tau > total_steps:
        found.append(f"tau={cfg.tau} exceeds the run's {total_steps} steps: no averaging round will happen")
    found += _pointless_options(cfg)
    for rank, step in sorted(cfg.faults.items()):
        if step >= total_steps:
            found.append(f"fail {rank}@{step} is at or after the run's last step ({total_steps - 1}): it never happens")
    for node, step in sorted(cfg.node_faults.items()):
        if step >= total_steps:
            found.append(f"fail node:{node}@{step} is at or after the run's last step ({total_steps - 1}): it never happens")
    return found


def _pointless_options(cfg: TrainConfig) -> list[str]:
    """Options whose effect another setting cancels (momentum, the schedule, the diagonal of the links)."""
    found = []
    if cfg.average_optimizer_state and REGISTRY[cfg.algorithm].uses_tau and cfg.momentum == 0:
        found.append("average_optimizer_state does nothing with momentum 0: plain SGD keeps no state to average")
    if cfg.lr_milestones and cfg.lr_schedule != "step":
        found.append(f"lr_milestones apply to lr_schedule 'step' only; under {cfg.lr_schedule!r} they do nothing")
    for name in ("link_drop", "link_latency", "link_bandwidth"):
        for rule in getattr(cfg, name):
            src, arrow, dst = rule.split("=")[0].strip().partition("->")
            if arrow and src.strip().isdigit() and dst.strip().isdigit() and int(src) == int(dst):
                found.append(f"{name} rule {rule!r} names the link from rank {int(src)} to itself: "
                             f"no message takes it (a rank keeps its own block), so it does nothing")
    return found


__all__ = ["Schedule", "pointless_settings"]
