"""`hpcsgd shard | train | report | bench` (also `python -m hpcsgd`).

Exit codes: 0 done; 2 a problem with the input, reported on stderr (on every rank together
for collective checks); 3 stopped by SIGTERM/SIGUSR1/SIGINT after writing a checkpoint (resume
with `--resume`); 4 a collective did not complete within collective_timeout (the job is
aborted; see hpcsgd/comm/watchdog.py); 1 an unexpected error, after which the whole MPI job is
aborted.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
import types
import typing

from . import __version__
from .train import startup  # startup's clock starts at this import
from .errors import HpcsgdError
from .algorithms.registry import REGISTRY  # no torch, no MPI: cheap before the slow imports

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

TRAIN_EPILOG = """\
Every flag is also a TOML key in CONFIG (dashes become underscores); a flag overrides the file.
Launch under MPI, one rank per GPU (or CPU process):
  mpiexec -n 4 python -m mpi4py -m hpcsgd train run.toml --data shards --run-dir runs/a
Exit codes: 0 done, 2 bad input (message on stderr), 3 stopped by SIGTERM/SIGUSR1/SIGINT after
a checkpoint (rerun with --resume), 4 a collective timed out (a rank stopped or hung; the job is
aborted), 1 unexpected error (the job is aborted).
"""


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from .config import FIELDS, HINTS, field_help

    parser.add_argument("config", nargs="?", help="TOML file with any of the keys below")
    parser.add_argument("--arrival", type=float, default=argparse.SUPPRESS, metavar="RATE",
                        help="arrival rate of block messages, another way to give --drop-rate (1 - RATE)")
    for name in FIELDS:
        flag = "--" + name.replace("_", "-")
        kind = HINTS[name]
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
            args = [a for a in typing.get_args(kind) if a is not type(None)]  # Optional[X] -> X
            kind = next((a for a in args if typing.get_origin(a) is list), args[0])  # X | list[X]: one or more
        kwargs: dict = {"default": argparse.SUPPRESS, "help": field_help(name), "dest": name}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            kwargs.update(nargs="+", type=item, action="extend", metavar=name.upper())
        else:
            kwargs.update(type=kind, metavar=name.split("_")[-1].upper())
        parser.add_argument(flag, **kwargs)


def train_overrides(args: argparse.Namespace) -> dict:
    """The config keys the command line gave (flags not given are absent, not defaults)."""
    from .config import FIELDS

    return {k: v for k, v in vars(args).items() if k in FIELDS or k == "arrival"}


def config_from_args(args: argparse.Namespace):
    """The TrainConfig of ``hpcsgd train``'s file and flags, every value checked (no MPI, no torch)."""
    from .config import build_config, load_toml

    try:
        # Found before torch is imported: a typo costs a second, not ten.
        return build_config(load_toml(args.config) if args.config is not None else {}, train_overrides(args),
                            source=args.config or "config")
    except HpcsgdError as exc:
        exc.collective = True  # every rank read the same file and flags: one message, no abort
        raise


def run_train(args: argparse.Namespace) -> int:
    from .train.stop import install_stop_handlers

    install_stop_handlers()  # before torch's slow import, so an early SIGUSR1 still checkpoints
    cfg = config_from_args(args)
    startup.mark("config")
    _banner(args.config, cfg)  # at once: the imports below take seconds per rank
    from mpi4py import MPI  # MPI_Init

    startup.mark("MPI")
    from .train.preflight import agree_on_run

    # Before torch's import, so that bad input costs a second, not ten (collective): the run
    # directory's lock (a second job on it fails at once), the shards and the config's fit to
    # them, failures, the resume point.
    agreed = agree_on_run(cfg, MPI.COMM_WORLD)
    startup.mark("checks")
    from .train.resume import EXIT_PREEMPTED, Preempted
    from .train.loop import train

    startup.mark("imports")
    try:
        summary = train(cfg, agreed=agreed)
    except Preempted as stop:
        if MPI.COMM_WORLD.rank == 0:
            print(f"hpcsgd: {stop}; rerun with --resume to continue", file=sys.stderr)
        return EXIT_PREEMPTED
    if summary is not None:
        print(done_line(summary, cfg.run_dir), file=sys.stderr)
    return EXIT_OK


def done_line(summary: dict, run_dir) -> str:
    """The last line of a run: the averaged model evaluated on the whole train and test splits.

    Not the progress lines' loss (rank 0's batches, last window) nor the report's batch-loss
    columns (rank means of those): it says which model and which data it is.
    """
    return (
        f"done: {summary['steps']} steps, {summary['rounds']} rounds, {summary['wall_s']:.1f}s; "
        f"averaged model: train loss {summary['train_loss']:.4f} (full train set), "
        f"test accuracy {summary['test_accuracy']:.4f} -> {run_dir}/summary.json"
    )


def _banner(config: str | None, cfg) -> None:
    """One line on rank 0 before the slow imports: what runs, on what, where."""
    rank, size = _world()
    if rank != 0 or cfg.progress == "none":
        return
    what = f"{cfg.algorithm} " + (f"redundancy={cfg.redundancy_per_rank or cfg.redundancy or cfg.q - 1}" if cfg.fractional else f"q={cfg.q}") + (f" tau={cfg.tau}" if REGISTRY[cfg.algorithm].uses_tau else "")
    _say(f"hpcsgd train: {what}, config {config or '(flags only)'}, shards {cfg.data}, {size} ranks, "
         f"run dir {cfg.run_dir}{' (resume)' if cfg.resume else ''}; starting")


def run_report(args: argparse.Namespace) -> int:
    from .analysis import report

    return report.run(args)


def run_bench(args: argparse.Namespace) -> int:
    from . import bench

    try:
        warnings = bench.check_arguments(args)  # before MPI and the first measurement
    except HpcsgdError as exc:
        exc.collective = True  # every rank checked the same flags: one message, no abort
        raise
    if _world()[0] == 0:
        for message in warnings:
            _say(f"hpcsgd bench: warning: {message}")
    return bench.run(args)


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose usage error (exit 2) is printed by one rank of a launched job, not by each."""

    def error(self, message: str) -> typing.NoReturn:
        if _world()[0] != 0:
            self.exit(EXIT_USAGE)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hpcsgd",
        description="MPI-native data-parallel training: RI-SGD, RPS and their baselines.",
    )
    parser.add_argument("--version", action="version", version=f"hpcsgd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{shard,train,report,bench}")

    from .data import shard_cli

    p = sub.add_parser("shard", help="cut a data set into P HDF5 chunks", description=shard_cli.__doc__)
    shard_cli.add_arguments(p)
    p.set_defaults(func=shard_cli.run)

    p = sub.add_parser(
        "train",
        help="train under MPI (one rank per GPU/CPU process)",
        description="Train a model data-parallel over the MPI ranks of this job.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_train_arguments(p)
    # `--fail -1@5` is a (bad) value, not an unknown option: let the config check name it.
    p._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-\d+@")
    p.set_defaults(func=run_train)

    try:
        from .analysis import report

        p = sub.add_parser("report", help="tables and plots from run directories", description=report.__doc__)
        report.add_arguments(p)
        p.set_defaults(func=run_report)
    except ImportError:  # the analysis extra is optional
        pass
    try:
        from . import bench

        p = sub.add_parser("bench", help="benchmarks against raw MPI and PyTorch DDP", description=bench.__doc__)
        bench.add_arguments(p)
        p.set_defaults(func=run_bench)
    except ImportError:
        pass
    return parser


def main(argv: list[str] | None = None) -> int:
    from .comm.threads import limit_before_import

    limit_before_import()  # before numpy and torch start their thread pools
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except HpcsgdError as exc:
        return _report_error(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `hpcsgd report ... | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return EXIT_OK
    except Exception:  # a bug: say where, then take every rank down rather than hang them
        rank, size = _world()
        sys.stderr.write(f"hpcsgd: unexpected error on rank {rank}:\n{traceback.format_exc()}")
        sys.stderr.flush()
        if size > 1:
            _abort(EXIT_ERROR)
        return EXIT_ERROR


_RANK_VARIABLES = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID")
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS")


def _world() -> tuple[int, int]:
    """(rank, size) of COMM_WORLD; before MPI is initialised, what the launcher exported."""
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            return MPI.COMM_WORLD.rank, MPI.COMM_WORLD.size
    rank = next((int(os.environ[v]) for v in _RANK_VARIABLES if os.environ.get(v, "").isdigit()), 0)
    size = next((int(os.environ[v]) for v in _SIZE_VARIABLES if os.environ.get(v, "").isdigit()), 1)
    # A rank without a world that holds it (SLURM_PROCID=2 left in the environment of a plain
    # `python -m hpcsgd`) is this process alone: it must print its own errors.
    return (rank, size) if rank < size else (0, size)


def _say(message: str) -> None:
    """One write per message, so lines from several ranks do not interleave mid-line."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def _report_error(exc: HpcsgdError) -> int:
    rank, size = _world()
    if getattr(exc, "collective", False) or size == 1:
        # Every rank raised the same error: one copy of the message, a clean exit everywhere.
        if rank == 0:
            _say(f"hpcsgd: error: {exc}")
        return EXIT_USAGE
    # Only this rank saw it (a NaN loss, say): the others are inside collectives, so abort.
    _say(f"hpcsgd: error on rank {rank}: {exc}")
    _abort(EXIT_USAGE)
    return EXIT_USAGE


def _abort(code: int) -> None:
    from .comm.watchdog import abort_job  # imports MPI: only on this path

    abort_job(code)


def entry() -> typing.NoReturn:
    """The ``hpcsgd`` console script: :func:`main`, then :func:`leave`."""
    leave(main())


# Outcomes every rank reaches together: done, bad input found collectively, stopped by a signal.
AGREED_EXITS = (EXIT_OK, EXIT_USAGE, 3)  # 3: checkpoint.EXIT_PREEMPTED (that module imports torch)


def leave(code: int) -> typing.NoReturn:
    """End the process with ``code``: MPI finalized, no MPI_Abort, no slow interpreter teardown.

    Under ``python -m mpi4py`` a non-zero SystemExit makes mpi4py call
    ``MPI_Abort(COMM_WORLD, code)`` at exit. mpiexec reports that as ``code``, but srun kills
    the other tasks and reports 137: a job checkpointed by a signal (exit 3) looked crashed
    and was not requeued. The codes in AGREED_EXITS are reached by every rank together, so
    MPI is finalized normally and the process exits with the plain code; any other code
    (Ctrl-C, a bug) keeps the abort, which takes down ranks that may sit in a collective.
    The C library's ``exit`` skips tearing down torch's modules (seconds per rank) after the streams are flushed.
    """
    if code not in AGREED_EXITS:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or the reader went away
            pass
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        ulfm = sys.modules.get("hpcsgd.comm.ulfm")
        if ulfm is not None and ulfm.deaths_survived:
            # After a survived death: the watchdog must not probe the dead while MPI finalizes,
            # and Open MPI's finalize may never return (bounded there).
            sys.modules["hpcsgd.comm.watchdog"].WATCHDOG.shutdown()
            ulfm.finalize_bounded(code)
        else:
            # Not joining the watchdog's thread first: with that join, 3 of 65 MPICH jobs here
            # had a rank SIGKILLed in MPI_Finalize (exit 9); 0 of 60 without it. Its thread
            # checks MPI.Is_finalized() before every MPI call.
            mpi.Finalize()
    _exit_without_python_teardown(code)


def _exit_without_python_teardown(code: int) -> typing.NoReturn:
    """The C library's ``exit``: C atexit handlers (MPICH's among them) and stdio, no Python teardown.

    ``os._exit`` skips the C atexit handlers too, and MPICH's hydra then SIGKILLed a rank that
    was still inside MPI_Finalize (exit 9); with this, no rank was (nor with a full interpreter
    exit, which costs torch's module teardown; the figures: README, "Threads and start-up").
    """
    try:
        import ctypes

        ctypes.CDLL(None).exit(code)
    except (OSError, AttributeError):
        pass
    os._exit(code)


if __name__ == "__main__":
    leave(main())
