"""Benchmarks against the physical floor and the tools users would pick instead.

Launch under MPI: ``mpiexec -n 4 python -m mpi4py -m hpcsgd bench [--quick]``. Every figure
is a ratio of medians measured interleaved in the same run (A B A B ...) after warm-up, each
round timed as the slowest rank's time between two barriers, so a noisy shared machine moves
both sides alike. ``--scaling`` measures exchange time against model size for this job's rank
count (tools/bench --scaling repeats it for 1..16 ranks); ``--project`` fits a
latency-bandwidth model to such a table and projects rounds to 16-1024 ranks on a cluster
fabric (no MPI needed). ``--env`` (no mpiexec either) launches the demo's 4-rank training as
whole jobs, alternately with the default environment and with ``OMP_NUM_THREADS=1``, and
compares their training loops: the threads hpcsgd picks by default must cost nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .comm import SCALING_SIZES, exchange_rows, scaling_rows, watchdog_rows
from .costmodel import TABLE, fit_cost_model, print_projection, project
from .jobs import run_env
from .timing import DEFAULT_PARAMS, format_rows, time_interleaved, write_json
from .overlap import overlap_rows
from .training import accuracy_rows, api_rows, data_rows, ddp_rows, local_rows

SECTIONS = ("exchange", "ddp", "local", "api", "overlap", "data", "accuracy")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and smaller workloads (under 2 minutes)")
    parser.add_argument("--params", type=int, default=DEFAULT_PARAMS, help="flat model size for the exchange rows (default 5.8M)")
    parser.add_argument("--reps", type=int, default=0, help="timed rounds per measurement (default 20, 5 with --quick)")
    parser.add_argument("--only", choices=SECTIONS, action="append",
                        help="run only these sections (repeatable; default: all)")
    parser.add_argument("--scaling", action="store_true", help="only the exchange-time vs model-size table for this rank count")
    parser.add_argument("--project", action="store_true", help="fit the cost model to a scaling table and project to 16-1024 ranks")
    parser.add_argument("--table", type=Path, default=TABLE, help=f"scaling table for --project (default {TABLE})")
    parser.add_argument("--fabric-gbps", type=float, default=100.0, help="--project: link bandwidth in Gb/s (default 100)")
    parser.add_argument("--fabric-latency-us", type=float, default=2.0, help="--project: per-message latency in us (default 2)")
    parser.add_argument("--env", action="store_true",
                        help="run without mpiexec: the demo on 4 ranks with the default environment vs "
                             "OMP_NUM_THREADS=1, and its time from launch to the first step line")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON (rank 0)")


def run(args: argparse.Namespace) -> int:
    if args.project:
        return print_projection(args)
    if args.env:
        return run_env(args)
    from mpi4py import MPI

    from ..comm.device import apply_threads

    comm = MPI.COMM_WORLD
    apply_threads(comm)  # as training does
    reps = args.reps or (5 if args.quick else 20)
    warmup = 2 if args.quick else 4
    if args.scaling:
        sizes = SCALING_SIZES[:3] if args.quick else SCALING_SIZES
        rows = scaling_rows(comm, reps, warmup, sizes)
        if comm.rank == 0:
            for r in rows:
                print(f"ranks {r['ranks']:>3} params {r['params']:>11,} allreduce {r['allreduce_s'] * 1e3:9.3f} ms "
                      f"alltoall {r['alltoall_s'] * 1e3:9.3f} ms", flush=True)
            write_json(args.json, rows)
        return 0
    sections = args.only or list(SECTIONS)
    rows: list[dict] = []
    start = time.perf_counter()
    if comm.rank == 0:
        print(f"hpcsgd bench: {comm.size} ranks, median of {reps} interleaved rounds after {warmup} warm-up"
              f"{' (quick)' if args.quick else ''}", flush=True)
    for section in sections:
        if section == "exchange":
            params = 1_000_000 if args.quick and args.params == DEFAULT_PARAMS else args.params
            new = exchange_rows(comm, params, reps, warmup) + watchdog_rows(comm, params, reps, warmup)
        elif section == "ddp":
            new = ddp_rows(comm, reps, warmup, args.quick)
        elif section == "local":
            new = local_rows(comm, reps, warmup, args.quick)
        elif section == "api":
            new = api_rows(comm, reps, warmup, args.quick)
        elif section == "overlap":
            new = overlap_rows(comm, reps, warmup, args.quick)
        elif section == "data":
            new = data_rows(comm, reps, args.quick)
        else:
            new = accuracy_rows(comm, args.quick)
        rows += new
        if comm.rank == 0:
            print(format_rows(new).split("\n", 1)[1] if rows != new else format_rows(new), flush=True)
    if comm.rank == 0:
        print(f"({time.perf_counter() - start:.0f}s)", file=sys.stderr)
        write_json(args.json, rows)
    return 0


__all__ = ["add_arguments", "run", "fit_cost_model", "project", "time_interleaved"]
