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

from ..argtypes import integer, nonempty, number
from ..errors import ConfigError
from ..limits import FLOAT32_MAX, MAX_SECONDS, check_bytes
from .comm import SCALING_SIZES, exchange_rows, scaling_rows, watchdog_rows
from .costmodel import TABLE, fit_cost_model, print_projection, project
from .jobs import run_env
from .links import NodeLayout, keyed_by_placement
from .timing import DEFAULT_PARAMS, check_writable, count_link_bytes, format_rows, time_interleaved, write_json
from .overlap import overlap_rows
from .training import accuracy_rows, api_rows, data_rows, ddp_rows, local_rows

SECTIONS = ("exchange", "ddp", "local", "api", "overlap", "data", "accuracy")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and smaller workloads (under 2 minutes)")
    parser.add_argument("--params", type=integer(1), default=DEFAULT_PARAMS,
                        help="flat model size for the exchange rows (default 5.8M)")
    parser.add_argument("--reps", type=integer(1), default=None,
                        help="timed rounds per measurement, >= 1 (default 20, 5 with --quick; --env: 3, 1 with --quick)")
    parser.add_argument("--only", choices=SECTIONS, action="append",
                        help="run only these sections (repeatable; default: all)")
    parser.add_argument("--scaling", action="store_true", help="only the exchange-time vs model-size table for this rank count")
    parser.add_argument("--project", action="store_true", help="fit the cost model to a scaling table and project to 16-1024 ranks")
    parser.add_argument("--table", type=Path, default=None, help=f"scaling table for --project (default {TABLE})")
    parser.add_argument("--fabric-gbps", type=number(1e-6, FLOAT32_MAX, unit="Gb/s"), default=None,
                        help="--project: link bandwidth in Gb/s, at least 1e-6 (default 100)")
    parser.add_argument("--fabric-latency-us", type=number(0, MAX_SECONDS * 1e6, unit="us"), default=None,
                        help="--project: per-message latency in us, >= 0 (default 2)")
    parser.add_argument("--env", action="store_true",
                        help="run without mpiexec: the demo on 4 ranks with the default environment vs "
                             "OMP_NUM_THREADS=1, and its time from launch to the first step line")
    parser.add_argument("--json", metavar="FILE", type=nonempty,
                        help="also write the rows as JSON (rank 0; its directory must exist)")


def run(args: argparse.Namespace) -> int:
    """The benchmark ``args`` asks for, after :func:`check_arguments` (the command line calls it first)."""
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
    placement = NodeLayout(comm)
    count_link_bytes(placement)  # across nodes: the bytes over the links beside each row
    rows = _suite(comm, args, reps, warmup, placement)
    count_link_bytes(None)
    if comm.rank == 0:
        write_json(args.json, rows)
    return 0


def _suite(comm, args: argparse.Namespace, reps: int, warmup: int, placement: NodeLayout) -> list[dict]:
    """The sections ``args`` asks for, printed as they finish; rows keyed by where they ran."""
    sections = args.only or list(SECTIONS)
    rows: list[dict] = []
    start = time.perf_counter()
    where = f" on {placement.nodes} nodes (rows keyed {placement.prefix}*)" if placement.nodes > 1 else ""
    if comm.rank == 0:
        print(f"hpcsgd bench: {comm.size} ranks{where}, median of {reps} interleaved rounds after {warmup} warm-up"
              f"{' (quick)' if args.quick else ''}", flush=True)
    for section in sections:
        if section == "exchange":
            params = 1_000_000 if args.quick and args.params == DEFAULT_PARAMS else args.params
            new = exchange_rows(comm, params, reps, warmup, placement.nodes) + watchdog_rows(comm, params, reps, warmup)
        elif section == "ddp":
            new = ddp_rows(comm, reps, warmup, args.quick)
        elif section == "local":
            new = local_rows(comm, reps, warmup, args.quick)
        elif section == "api":
            new = api_rows(comm, reps, warmup, args.quick)
        elif section == "overlap":
            new = overlap_rows(comm, reps, warmup, args.quick, nodes=placement.nodes)
        elif section == "data":
            new = data_rows(comm, reps, args.quick)
        else:
            new = accuracy_rows(comm, args.quick)
        new = keyed_by_placement(new, placement)
        rows += new
        if comm.rank == 0:
            print(format_rows(new).split("\n", 1)[1] if rows != new else format_rows(new), flush=True)
    if comm.rank == 0:
        print(f"({time.perf_counter() - start:.0f}s)", file=sys.stderr)
    return rows


def check_arguments(args: argparse.Namespace) -> list[str]:
    """Refuse flags that cannot work together or cannot be written to, before anything is measured.

    Fills in the defaults of --table and the fabric; returns the warnings for flags that do
    nothing in this mode.
    """
    modes = [flag for flag, on in (("--project", args.project), ("--env", args.env), ("--scaling", args.scaling)) if on]
    if len(modes) > 1:
        raise ConfigError(f"{' and '.join(modes)} are different runs: give one of them")
    if args.json is not None:
        check_writable("--json", Path(args.json))
    unused = []
    if not args.project:
        unused += [flag for flag, value in (("--table", args.table), ("--fabric-gbps", args.fabric_gbps),
                                            ("--fabric-latency-us", args.fabric_latency_us)) if value is not None]
    if modes and args.only:
        unused.append("--only")
    if args.project:
        unused += [flag for flag, given in (("--reps", args.reps is not None), ("--quick", args.quick)) if given]
    if (modes or (args.only and "exchange" not in args.only)) and args.params != DEFAULT_PARAMS:
        unused.append("--params")
    if not modes and (not args.only or "exchange" in args.only):
        _check_params(args.params)
    args.table = TABLE if args.table is None else args.table
    args.fabric_gbps = 100.0 if args.fabric_gbps is None else args.fabric_gbps
    args.fabric_latency_us = 2.0 if args.fabric_latency_us is None else args.fabric_latency_us
    mode = modes[0] if modes else "the benchmark suite"
    return [f"{flag} does nothing with {mode}" for flag in unused]


def _check_params(params: int) -> None:
    """The exchange rows' MLP (3072 inputs, 10 classes, two equal hidden layers) can have ``params`` and fits."""
    from ..train.models import mlp_param_count

    smallest = mlp_param_count(3072, 10, (1, 1))
    if params < smallest:
        raise ConfigError(f"--params must be at least {smallest} (the exchange rows' MLP with hidden widths 1), "
                          f"got {params}")
    # 4 bytes per parameter with its gradient, the optimizer's momentum and the exchange
    # buffers: about 8 copies on each rank.
    check_bytes(f"--params {params} (the exchange rows' model and its buffers, per rank)", 32 * params)


__all__ = ["add_arguments", "check_arguments", "run", "fit_cost_model", "project", "time_interleaved"]
