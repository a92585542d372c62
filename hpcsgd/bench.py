"""Benchmarks: hpcsgd's collectives against raw mpi4py on the same buffer, in the same run.

Launch under MPI (`mpiexec -n 4 python -m mpi4py -m hpcsgd bench`). Every figure is a ratio of
two medians measured interleaved (A B A B ...) after warm-up, each round timed as the slowest
rank's time between two barriers, so a noisy shared machine moves both sides alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable

import numpy as np

DEFAULT_PARAMS = 5_800_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, under a minute)")
    parser.add_argument("--params", type=int, default=DEFAULT_PARAMS, help="flat model size in parameters (default 5.8M)")
    parser.add_argument("--reps", type=int, default=0, help="timed rounds per measurement (default 30, 6 with --quick)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE (rank 0)")


def time_interleaved(comm, fns: dict[str, Callable[[], object]], reps: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each fn, interleaved, each round the slowest rank's time."""
    from mpi4py import MPI

    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + reps):
        for name, fn in fns.items():
            comm.Barrier()
            t0 = time.perf_counter()
            fn()
            elapsed = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
            if i >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}


def exchange_rows(comm, params: int, reps: int, warmup: int) -> list[dict]:
    """Averaging round and RPS rounds vs raw Allreduce of the same flat buffer."""
    import torch
    from mpi4py import MPI

    from .comm import BlockExchange, Collectives, FlatParams, LinkRates
    from .models import build_model, mlp_hidden_for_params

    from .comm.device import default_threads, local_rank_and_size

    torch.set_num_threads(default_threads(local_rank_and_size(comm)[1]))  # as training does
    hidden = mlp_hidden_for_params(3072, 10, params)
    torch.manual_seed(0)
    flat = FlatParams(build_model("mlp", (3072,), 10, hidden))
    coll = Collectives(comm)
    raw = flat.flat.detach().clone().numpy()
    size = comm.size
    ex0 = BlockExchange(coll, flat.numel, LinkRates.build(size, 0.0), seed=1)
    ex1 = BlockExchange(coll, flat.numel, LinkRates.build(size, 0.1), seed=1)
    step = iter(range(10**9))
    medians = time_interleaved(
        comm,
        {
            "raw": lambda: comm.Allreduce(MPI.IN_PLACE, raw, op=MPI.SUM),
            "avg": lambda: coll.allreduce_mean(flat.flat),
            "rps0": lambda: ex0.average(flat.flat, next(step)),
            "rps1": lambda: ex1.average(flat.flat, next(step)),
            "mask1": lambda: ex1.masks(next(step)),
        },
        reps,
        warmup,
    )
    base = medians["raw"]
    mb = flat.numel * 4 / 1e6
    rows = [
        {"name": "raw mpi4py Allreduce (baseline)", "seconds": base, "ratio": 1.0, "target": None},
        {"name": "averaging round (Allreduce + mean)", "seconds": medians["avg"], "ratio": medians["avg"] / base, "target": 1.10},
        {"name": "RPS round, drop 0", "seconds": medians["rps0"], "ratio": medians["rps0"] / base, "target": 1.20},
        {"name": "RPS round, drop 0.1", "seconds": medians["rps1"], "ratio": medians["rps1"] / base, "target": 1.20},
        {
            "name": "loss layer (drop masks) / RPS round at 0.1",
            "seconds": medians["mask1"],
            "ratio": medians["mask1"] / medians["rps1"],
            "target": 0.02,
        },
    ]
    for row in rows:
        row.update(params=flat.numel, megabytes=round(mb, 1), ranks=size)
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'measurement':<46} {'median ms':>10} {'ratio':>7} {'target':>7}  ok"]
    for r in rows:
        target = f"<={r['target']:.2f}" if r["target"] is not None else ""
        ok = "" if r["target"] is None else ("yes" if r["ratio"] <= r["target"] else "NO")
        lines.append(f"{r['name']:<46} {r['seconds'] * 1e3:>10.2f} {r['ratio']:>7.3f} {target:>7}  {ok}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    reps = args.reps or (6 if args.quick else 30)
    warmup = 2 if args.quick else 5
    rows = exchange_rows(comm, args.params, reps, warmup)
    if comm.rank == 0:
        header = (
            f"hpcsgd bench: {rows[0]['params']:,} parameters ({rows[0]['megabytes']} MB float32), "
            f"{comm.size} ranks, median of {reps} interleaved rounds after {warmup} warm-up"
        )
        print(header)
        print(format_rows(rows))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(rows, fh, indent=1)
        sys.stdout.flush()
    return 0
