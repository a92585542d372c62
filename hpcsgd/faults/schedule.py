"""Failure and straggler schedules: which ranks leave at which step, which rank sleeps when.

Read from the config's ``fail``, ``fail_rate`` and ``straggle`` entries; the random part is
seeded, so every rank derives the same schedule and no rank has to tell another.
"""

from __future__ import annotations

import math
import re
import time

import numpy as np

FAIL_RULE = re.compile(r"^(node:)?(\d+)@(\d+)$")  # RANK@STEP, or node:N@STEP (every rank of node N)
STRAGGLE_RULE = re.compile(r"^(\d+)@(\d+)(?:-(\d+))?:([0-9.]+)$")  # RANK@STEP[-END]:SECONDS


def rank_faults(cfg, ranks: int, ranks_per_node: int = 1) -> dict[int, int]:
    """The explicit faults per world rank, a node's entry standing for each rank of the node."""
    R = ranks_per_node  # node n is ranks n*R .. (n+1)*R - 1 (hpcsgd/data/placement.py)
    found = {r: s for n, s in cfg.node_faults.items() for r in range(n * R, min((n + 1) * R, ranks))}
    for rank, step in cfg.faults.items():
        found[rank] = min(step, found.get(rank, step))
    return found


def fault_schedule(cfg, ranks: int, steps_per_epoch: int, total_steps: int,
                   ranks_per_node: int = 1) -> dict[int, int]:
    """Explicit faults plus, with ``fail_rate``, a seeded random schedule every rank derives alike.

    Each rank fails in each epoch with probability ``fail_rate`` (at a uniform step of that
    epoch); rank 0 never fails at random, so at least one rank always survives.
    """
    schedule = rank_faults(cfg, ranks, ranks_per_node)
    if cfg.fail_rate > 0:
        rng = np.random.default_rng([cfg.seed, 104729])
        epochs = math.ceil(total_steps / steps_per_epoch)
        for rank in range(1, ranks):
            fails = rng.random(epochs) < cfg.fail_rate
            offsets = rng.integers(0, steps_per_epoch, epochs)
            if rank not in schedule and fails.any():
                epoch = int(np.argmax(fails))
                step = epoch * steps_per_epoch + int(offsets[epoch])
                if step < total_steps:
                    schedule[rank] = step
    return schedule


def stragglers(rules: list[str]) -> list[tuple[int, int, int, float]]:
    """(rank, first step, last step, seconds) of each ``straggle`` rule (checked by the config)."""
    out = []
    for rule in rules:
        m = STRAGGLE_RULE.match(rule)
        first = int(m[2])
        out.append((int(m[1]), first, int(m[3]) if m[3] else first, float(m[4])))
    return out


def straggle(rules: list[tuple[int, int, int, float]], rank: int, step: int) -> float:
    """Sleep where ``rules`` (from :func:`stragglers`) make ``rank`` a straggler at ``step``.

    Returns the seconds it took (0.0 where ``rank`` is no straggler at ``step``)."""
    slept = 0.0
    for who, first, last, seconds in rules:
        if who == rank and first <= step <= last:
            t = time.perf_counter()
            time.sleep(seconds)
            slept += time.perf_counter() - t
    return slept


__all__ = ["FAIL_RULE", "STRAGGLE_RULE", "fault_schedule", "rank_faults", "straggle", "stragglers"]
