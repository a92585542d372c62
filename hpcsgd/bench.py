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
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

DEFAULT_PARAMS = 5_800_000
SCALING_SIZES = (100_000, 1_000_000, 10_000_000, 50_000_000)
SECTIONS = ("exchange", "ddp", "local", "api", "overlap", "data", "accuracy")
TABLE = Path(__file__).resolve().parents[1] / "tools" / "scaling.json"


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


# -- timing ----------------------------------------------------------------------------------
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


def ratio_paired(comm, a: Callable[[], object], b: Callable[[], object], reps: int, warmup: int) -> tuple[float, float]:
    """(median seconds of ``a``, median of the per-round ratios a/b), timed as above.

    Each round times ``a`` and ``b`` back to back, in alternating order, and takes their
    ratio: a difference far below the machine's noise (a watchdog's two attribute writes)
    shows in the median of paired ratios long before it shows in a ratio of two medians.
    """
    from mpi4py import MPI

    ratios, times = [], []
    for i in range(warmup + reps):
        pair = {}
        for name, fn in ((("a", a), ("b", b)) if i % 2 == 0 else (("b", b), ("a", a))):
            comm.Barrier()
            t0 = time.perf_counter()
            fn()
            pair[name] = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
        if i >= warmup:
            ratios.append(pair["a"] / pair["b"])
            times.append(pair["a"])
    return statistics.median(times), statistics.median(ratios)


def _row(name: str, seconds: float, ratio: float | None, target: float | None, higher_is_better: bool = False, *,
         key: str, **extra) -> dict:
    """One result; ``key`` is stable across runs and versions (``name`` is for people and may change)."""
    return {"key": key, "name": name, "seconds": seconds, "ratio": ratio, "target": target,
            "higher_is_better": higher_is_better, **extra}


def _mlp(params: int):
    import torch

    from .comm import FlatParams
    from .models import build_model, mlp_hidden_for_params

    torch.manual_seed(0)
    model = build_model("mlp", (3072,), 10, mlp_hidden_for_params(3072, 10, params))
    return model, FlatParams(model)


# -- sections --------------------------------------------------------------------------------
def exchange_rows(comm, params: int, reps: int, warmup: int) -> list[dict]:
    """Local SGD's averaging round and RPS rounds vs raw Allreduce of the same flat buffer.

    The averaging round is measured as training runs it: the round step's optimizer step
    multiplies the model by 1/L in its update pass (ScalingSGD), so the round is a bare
    Allreduce. Since that moves work into the optimizer, the rows also time a round step's
    optimizer step against a plain one, and the whole round step against optimizer + raw.
    The raw Allreduce runs where the average does, on the model buffer right after an
    optimizer step: an Allreduce after the optimizer has streamed ~100 MB through memory
    measured 3-6% slower than the same call after a light operation, for raw mpi4py too.
    """
    import torch
    from mpi4py import MPI

    from .algorithms import RPS, LocalSGD
    from .comm import BlockExchange, Collectives, LinkRates
    from .optim import ScalingSGD

    model, flat = _mlp(params)
    coll = Collectives(comm)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    optimizer = ScalingSGD(model.parameters(), lr=1e-3, momentum=0.9)
    local = LocalSGD(coll, flat, optimizer, tau=1)
    # RPS at drop 0 as training runs it: a lossless round is one Allreduce whose 1/L rides in
    # the optimizer step, as local SGD's (the optimizer step is timed by opt_round's row).
    rps0 = RPS(coll, flat, optimizer, tau=1, rates=LinkRates.build(comm.size, 0.0), seed=1)
    model_buffer = flat.flat.detach().numpy()
    ex1 = BlockExchange(coll, flat.numel, LinkRates.build(comm.size, 0.1), seed=1)  # auto: shared memory on one node
    ex1_msg = BlockExchange(coll, flat.numel, LinkRates.build(comm.size, 0.1), seed=1, path="alltoallv")
    step = iter(range(10**9))
    m = time_interleaved(
        comm,
        {
            "opt": lambda: optimizer.step(),
            "raw": lambda: comm.Allreduce(MPI.IN_PLACE, model_buffer, op=MPI.SUM),
            "unscale": lambda: flat.flat.mul_(1.0 / comm.size),  # keeps the values bounded; not reported
            "opt_round": lambda: local.optimizer_step(0),  # tau 1: every step is a round step
            "avg": lambda: local.after_step(0),
            "rps0_opt": lambda: rps0.optimizer_step(0),  # not reported: the same step as opt_round
            "rps0": lambda: rps0.after_step(0),
            "rps1": lambda: ex1.average(flat.flat, next(step)),
            "rps1_msg": lambda: ex1_msg.average(flat.flat, next(step)),
            "mask1": lambda: ex1.masks(next(step)),
        },
        reps,
        warmup,
    )
    mb = f"{flat.numel / 1e6:.1f}M params"
    whole = (m["opt_round"] + m["avg"]) / (m["opt"] + m["raw"])
    return [
        _row(f"raw mpi4py Allreduce, {mb} (the floor)", m["raw"], 1.0, None, key="allreduce_raw"),
        _row("averaging round / raw Allreduce", m["avg"], m["avg"] / m["raw"], 1.03, key="avg_vs_allreduce"),
        _row("round step's optimizer step (1/L folded in) / plain step", m["opt_round"], m["opt_round"] / m["opt"], 1.05,
             key="round_opt_vs_plain_opt"),
        _row("round step (optimizer + average) / (optimizer + raw)", m["opt_round"] + m["avg"], whole, 1.10,
             key="round_step_vs_opt_allreduce"),
        _row("RPS round, drop 0 (1/L in the optimizer step) / raw Allreduce", m["rps0"], m["rps0"] / m["raw"], 1.03, key="rps0_vs_allreduce"),
        _row(f"RPS round, drop 0.1 ({ex1.path}) / raw Allreduce", m["rps1"], m["rps1"] / m["raw"], 1.0,
             key="rps01_vs_allreduce"),
        _row("RPS round, drop 0.1, two Ialltoallv (the multi-node path) / raw Allreduce", m["rps1_msg"],
             m["rps1_msg"] / m["raw"], None, key="rps01_alltoallv_vs_allreduce"),
        _row("drop masks / RPS round at 0.1 (loss-layer cost)", m["mask1"], m["mask1"] / m["rps1"], 0.02,
             key="drop_masks_vs_rps01"),
    ]


def watchdog_rows(comm, params: int, reps: int, warmup: int) -> list[dict]:
    """What the collective watchdog costs when nothing is wrong, and what the alternative would.

    ``watchdog_overhead``: local SGD's averaging round (``allreduce_sum`` of the flat model, a
    blocking Allreduce under the guard, the monitor thread running) with the watchdog on / off. ``watchdog_polling_alternative``:
    the same Allreduce started nonblocking and polled with ``Test`` against a deadline (a
    watchdog without a thread) / the blocking Allreduce.
    """
    from mpi4py import MPI

    from .comm import Collectives
    from .comm.watchdog import WATCHDOG

    _, flat = _mlp(params)
    flat.flat.detach().zero_()  # sums of zeros stay zero: no rescaling pass between rounds
    coll = Collectives(comm)
    buffer = flat.flat.detach().numpy()
    timeout = 600.0
    WATCHDOG.arm(comm, timeout)

    def round_with(seconds: float):
        WATCHDOG.timeout = seconds
        coll.allreduce_sum(flat.flat)  # what LocalSGD.after_step runs on a round step

    def polled():
        request = comm.Iallreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
        deadline = time.monotonic() + timeout
        while not request.Test():
            if time.monotonic() > deadline:
                comm.Abort(4)

    def blocking():
        comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)

    # Paired, and three times the rounds of the other rows: the difference sought is far below the noise.
    on, on_ratio = ratio_paired(comm, lambda: round_with(timeout), lambda: round_with(0.0), 3 * reps, warmup)
    poll, poll_ratio = ratio_paired(comm, polled, blocking, reps, warmup)
    t0, calls = time.perf_counter(), 20_000
    for _ in range(calls):
        with WATCHDOG.guard("Allreduce [avg]", comm):
            pass
    guard_us = (time.perf_counter() - t0) / calls * 1e6  # what the watchdog adds to every collective
    WATCHDOG.disarm()
    return [
        _row("averaging round, collective watchdog on / off", on, on_ratio, 1.01, key="watchdog_overhead",
             guard_us=guard_us),
        _row("Iallreduce + Test polling / blocking Allreduce (the watchdog not chosen)", poll, poll_ratio, None,
             key="watchdog_polling_alternative"),
    ]


def _gloo_group(comm):
    """A torch.distributed gloo group over the same ranks, rendezvous through MPI."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    host = socket.gethostname()
    hosts = comm.allgather(host)
    addr = "127.0.0.1" if len(set(hosts)) == 1 else hosts[0]
    port = None
    if comm.rank == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
    port = comm.bcast(port)
    dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=comm.rank, world_size=comm.size)


def _models(kind: str, quick: bool):
    """(name, builder, input batch, labels) for the DDP and averager comparisons."""
    import torch

    from .models import build_model, mlp_hidden_for_params

    g = torch.Generator().manual_seed(0)
    if kind == "mlp":
        hidden = mlp_hidden_for_params(3072, 10, 1_000_000 if quick else DEFAULT_PARAMS)
        builder = lambda: build_model("mlp", (3072,), 10, hidden)  # noqa: E731
        x = torch.randn(32, 3072, generator=g)
        name = f"MLP {sum(p.numel() for p in builder().parameters()) / 1e6:.1f}M"
    else:
        builder = lambda: build_model("resnet20", (3, 32, 32), 10)  # noqa: E731
        x = torch.randn(16 if quick else 32, 3, 32, 32, generator=g)
        name = "ResNet-20"
    y = torch.randint(0, 10, (len(x),), generator=g)
    return name, builder, x, y


def ddp_rows(comm, reps: int, warmup: int, quick: bool) -> list[dict]:
    """hpcsgd sync-SGD step vs PyTorch DDP (gloo) step: same model, batch and ranks."""
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from .strategies import SyncSGD
    from .world import init

    _gloo_group(comm)
    world = init(comm, device="cpu")
    rows = []
    for kind in ("mlp", "resnet20"):
        name, builder, x, y = _models(kind, quick)
        torch.manual_seed(0)
        model_h = builder()
        opt_h = torch.optim.SGD(model_h.parameters(), lr=0.01, momentum=0.9)
        strategy = SyncSGD(model_h, opt_h, world)
        torch.manual_seed(0)
        model_d = DistributedDataParallel(builder())
        opt_d = torch.optim.SGD(model_d.parameters(), lr=0.01, momentum=0.9)

        def step_h():
            strategy.zero_grad()  # keeps the gradients in the flat buffer (opt.zero_grad() costs a copy)
            F.cross_entropy(model_h(x), y).backward()
            strategy.step()

        def step_d():
            opt_d.zero_grad()
            F.cross_entropy(model_d(x), y).backward()
            opt_d.step()

        m = time_interleaved(comm, {"h": step_h, "d": step_d}, reps, warmup)
        strategy.close()
        rows.append(_row(f"sync-SGD step / DDP step, {name}, batch {len(x)}", m["h"], m["h"] / m["d"], 1.0,
                         ddp_ms=m["d"] * 1e3, key=f"sync_vs_ddp_{kind}"))
    return rows


def local_rows(comm, reps: int, warmup: int, quick: bool, tau: int = 8) -> list[dict]:
    """Local SGD (tau 8) through the public API vs torch's PeriodicModelAverager: mean step.

    Both sides are a user's loop over a plain ``torch.optim.SGD``: ``zero_grad``, backward,
    then ``strategy.step()`` or ``opt.step()`` + ``average_parameters``.
    """
    import torch
    import torch.nn.functional as F
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

    from .strategies import LocalSGD
    from .world import init

    _gloo_group(comm)
    world = init(comm, device="cpu")
    rows = []
    for kind in ("mlp", "resnet20"):
        name, builder, x, y = _models(kind, quick)
        torch.manual_seed(0)
        model_h = builder()
        opt_h = torch.optim.SGD(model_h.parameters(), lr=0.01)
        strategy = LocalSGD(model_h, opt_h, world, tau=tau)
        torch.manual_seed(0)
        model_d = builder()
        opt_d = torch.optim.SGD(model_d.parameters(), lr=0.01)
        averager = PeriodicModelAverager(period=tau, warmup_steps=0)

        def block_h():
            for _ in range(tau):
                opt_h.zero_grad()
                F.cross_entropy(model_h(x), y).backward()
                strategy.step()

        def block_d():
            for _ in range(tau):
                opt_d.zero_grad()
                F.cross_entropy(model_d(x), y).backward()
                opt_d.step()
                averager.average_parameters(model_d.parameters())

        m = time_interleaved(comm, {"h": block_h, "d": block_d}, max(3, reps // 2), max(1, warmup // 2))
        rows.append(_row(f"local-SGD tau {tau} step (hpcsgd.LocalSGD) / PeriodicModelAverager, {name}",
                         m["h"] / tau, m["h"] / m["d"], 1.0, key=f"local{tau}_api_vs_pma_{kind}"))
    return rows


def overlap_rows(comm, reps: int, warmup: int, quick: bool, block: int = 4) -> list[dict]:
    """How much of an emulated round an overlapped round hides, and what emulation costs when off.

    Local SGD and RPS (drop 0.1) at tau 1 through the public API, on the MLP 5.8M (the rows
    issue 14 names) and on ResNet-20. The emulated bandwidth is set so that one averaging
    round (an Allreduce charged as a ring) takes as long as one compute step (forward,
    backward, optimizer, measured first). Blocks of ``block`` consecutive steps and a flush
    are timed, blocking and overlapped alternately (a round in flight must not run into the
    other side's timing). Row value, the steady state: (blocking block - overlapped block) /
    ((block - 1) x emulated round time); the overlapped block's last round, completed by the
    flush, has no next step to hide behind, and the blocking block's last round is no better.

    What it can show depends on the cores: the round's real transfer is CPU and memory work
    too, which hides behind the computation only where the computation leaves room for it.
    """
    from .strategies import link_network
    from .world import init

    world = init(comm, device="cpu")
    rows = []
    for kind in ("mlp",) if quick else ("mlp", "resnet20"):  # ResNet-20's rows take minutes
        name, builder, x, y = _models(kind, quick)
        rounds = max(3, reps // 2) if kind == "mlp" else max(2, reps // 8)
        compute_s, net = _round_as_long_as_a_step(comm, world, builder, x, y, link_network)
        for label, kw in (("local", {}), ("rps", {"drop_rate": 0.1, "seed": 1})):
            sides = {side: _timed_steps(world, builder, x, y, label, overlap, net, block, kw)
                     for side, overlap in (("blocking", False), ("overlapped", True))}
            m = time_interleaved(comm, sides, rounds, 1)
            hidden = (m["blocking"] - m["overlapped"]) / (block - 1) / compute_s if net is not None else None
            suffix = "" if kind == "mlp" else f"_{kind}"
            rows.append(_row(f"{label} tau 1 ({name}), emulated round = one compute step ({compute_s * 1e3:.0f} ms): "
                             f"hidden share of the round", m["overlapped"] / block, hidden, 0.80,
                             higher_is_better=True, key=f"overlap_hidden_{label}{suffix}",
                             blocking_step_s=m["blocking"] / block))
    name, builder, x, y = _models("mlp", quick)
    off = _timed_steps(world, builder, x, y, "local", False, None, block, {})  # emulation compiled in, off
    absent = _timed_steps(world, builder, x, y, "local", False, None, block, {}, before_emulation=True)
    seconds, ratio = ratio_paired(comm, off, absent, max(5, reps), warmup)
    rows.append(_row(f"local tau 1 ({name}) step, network emulation off / absent (paired)", seconds / block,
                     ratio, 1.01, key="netem_off_overhead"))
    return rows


def _round_as_long_as_a_step(comm, world, builder, x, y, link_network):
    """(one compute step's seconds, an emulated network whose ring Allreduce of the model takes as long)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = builder()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    compute_s = time_interleaved(comm, {"c": step}, 3, 1)["c"]
    L, numel = comm.size, sum(p.numel() for p in model.parameters())
    if L < 2:
        return compute_s, None
    bytes_per_s = 2 * (L - 1) / L * numel * 4 / compute_s
    return compute_s, link_network(world, gbps=bytes_per_s * 8 / 1e9)


def _timed_steps(world, builder, x, y, label, overlap, network, block, kw, before_emulation=False):
    """``block`` training steps of a fresh model under ``label``'s strategy, then a flush."""
    import torch
    import torch.nn.functional as F

    from .strategies import RPS, LocalSGD

    torch.manual_seed(0)
    model = builder()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cls = LocalSGD if label == "local" else RPS
    strategy = cls(model, opt, world, tau=1, overlap_rounds=overlap, network=network, **kw)
    if before_emulation:
        strategy.coll.__class__ = _collectives_before_emulation()  # the same object, the round as before

    def run():
        for _ in range(block):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            strategy.step()
        strategy.flush()

    return run


def _collectives_before_emulation():
    """Collectives whose averaging round is the code before network emulation existed."""
    from mpi4py import MPI

    from .comm import Collectives
    from .comm.watchdog import WATCHDOG

    class CollectivesBeforeEmulation(Collectives):
        def allreduce_sum(self, tensor, tag: str = "avg", count_round: bool = True):
            buf, host = self.mpi_view(tensor, tag)
            with WATCHDOG.guard(f"Allreduce [{tag}]", self.comm):
                self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            self._count_allreduce(tensor, count_round)
            if host is not None:
                tensor.copy_(host.view_as(tensor))
            return tensor

    return CollectivesBeforeEmulation


def api_rows(comm, reps: int, warmup: int, quick: bool, tau: int = 8) -> list[dict]:
    """A user's loop step (RedundantSampler, plain SGD, ``hpcsgd.LocalSGD.step()``) vs ``hpcsgd train``'s step.

    The same MLP, data, q, batch and tau on both sides; the CLI side is ``Trainer.train_step``
    over shards of the same samples, the user side indexes a tensor data set with the
    sampler's indices. Timed over blocks of ``tau`` steps (one averaging round each).
    """
    import torch
    import torch.nn.functional as F

    from .config import build_config
    from .data import load_source, write_shards
    from .models import build_model
    from .redundant import RedundantSampler
    from .strategies import LocalSGD
    from .train import Trainer
    from .world import init

    q, b = min(2, comm.size), 32
    data = load_source("synthetic", seed=0, n_train=2048 if quick else 8192, n_test=64, num_classes=10, input_shape=(3, 32, 32))
    tmp = comm.bcast(tempfile.mkdtemp(prefix="hpcsgd-bench-") if comm.rank == 0 else None)
    if comm.rank == 0:
        write_shards(data, comm.size, "iid", Path(tmp) / "s", seed=0)
    comm.Barrier()
    cfg = build_config({"data": f"{tmp}/s", "run_dir": f"{tmp}/run", "algorithm": "local", "q": q, "tau": tau,
                        "batch_size": b, "lr": 0.01, "steps": 10**6, "progress": "none", "model": "mlp"})
    trainer = Trainer(cfg, comm)
    trainer.setup()
    trainer.loss_window = []  # run() starts it; the bench calls train_step alone
    world = init(comm, device="cpu")
    X, Y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    sampler = RedundantSampler(torch.utils.data.TensorDataset(X, Y), world, q=q, batch_size=b, seed=0)
    torch.manual_seed(0)
    model = build_model("mlp", (3, 32, 32), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    strategy = LocalSGD(model, opt, world, tau=tau)
    cli_steps = iter(range(10**9))

    def user_block():
        for _ in range(tau):
            idx = sampler.next_indices()
            x, y = X[idx], Y[idx]
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            strategy.step()

    def cli_block():
        for _ in range(tau):
            trainer.train_step(next(cli_steps))

    m = time_interleaved(comm, {"api": user_block, "cli": cli_block}, max(3, reps // 2), max(1, warmup // 2))
    trainer.api.close()
    trainer.metrics.close()
    comm.Barrier()
    if comm.rank == 0:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return [_row(f"user-loop step (hpcsgd.LocalSGD tau {tau}) / hpcsgd train step, MLP, batch {q * b}",
                 m["api"] / tau, m["api"] / m["cli"], 1.02, key="api_step_vs_cli_step")]


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def data_rows(comm, reps: int, quick: bool) -> list[dict]:
    """HDF5 sampler batches/s vs the model's steps/s; resident memory vs q/P of the data."""
    import torch
    from mpi4py import MPI
    import torch.nn.functional as F

    from .data import StratifiedSampler, chunks_for_rank, load_chunk, load_source, read_index, write_shards
    from .models import build_model
    from .train import gather_on_device

    P, q, b = comm.size, min(2, comm.size), 32
    tmp = comm.bcast(tempfile.mkdtemp(prefix="hpcsgd-bench-") if comm.rank == 0 else None)
    n_train = 4096 if quick else 16384
    if comm.rank == 0:
        data = load_source("synthetic", seed=0, n_train=n_train, n_test=64, num_classes=10, input_shape=(3, 32, 32))
        write_shards(data, P, "iid", Path(tmp) / "s", seed=0)
        del data
    comm.Barrier()
    index = read_index(Path(tmp) / "s")
    before = _rss_mb()
    mine = chunks_for_rank(P, q, comm.rank)
    chunks = {c: tuple(torch.from_numpy(a) for a in load_chunk(index, c)) for c in mine}
    grown = _rss_mb() - before
    share_mb = sum(index.chunk_sizes[c] for c in mine) * (3 * 32 * 32 * 4 + 8) / 2**20
    sampler = StratifiedSampler({c: index.chunk_sizes[c] for c in mine}, b, 0, comm.rank)

    def batch():
        return gather_on_device(sampler.next_batch(), chunks)  # exactly what training does

    torch.manual_seed(0)
    model = build_model("resnet20", (3, 32, 32), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = batch()

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    m = time_interleaved(comm, {"data": lambda: [batch() for _ in range(10)], "step": step}, reps, 2)
    per_batch = m["data"] / 10
    grown_max = comm.allreduce(grown, op=MPI.MAX)
    comm.Barrier()
    if comm.rank == 0:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    total_mb = index.train_size * (3 * 32 * 32 * 4 + 8) / 2**20
    return [
        _row(f"HDF5 sampler batches/s / ResNet-20 steps/s (batch {q * b})", per_batch, m["step"] / per_batch, 10.0,
             higher_is_better=True, key="sampler_vs_step_rate"),
        _row(f"resident MB per rank for its data / q/P share ({share_mb:.0f} of {total_mb:.0f} MB)", grown_max,
             grown_max / share_mb if share_mb else None, 1.25, key="resident_vs_share"),
    ]


def accuracy_rows(comm, quick: bool) -> list[dict]:
    """Wall time to a target test accuracy on digits: RI-SGD (q=2, tau 8) vs sync SGD."""
    from .config import build_config
    from .data import load_source, write_shards
    from .train import Trainer

    tmp = comm.bcast(tempfile.mkdtemp(prefix="hpcsgd-bench-") if comm.rank == 0 else None)
    if comm.rank == 0:
        write_shards(load_source("digits"), comm.size, "label", Path(tmp) / "s", seed=0)
    comm.Barrier()
    target = 0.85
    times = {}
    for name, extra in (("sync", {"algorithm": "sync"}), ("risgd", {"algorithm": "local", "q": min(2, comm.size), "tau": 8})):
        cfg = build_config({"data": f"{tmp}/s", "run_dir": f"{tmp}/{name}", "epochs": 10 if quick else 20, "batch_size": 16,
                            "lr": 0.1, "eval_every": 0.5, "progress": "none", "eval_train_samples": 256, **extra})
        trainer = Trainer(cfg, comm)
        trainer.run()
        hit = None
        for line in trainer.metrics.path.read_text().splitlines():
            record = json.loads(line)
            if (record.get("avg_test_accuracy") or 0) >= target:
                hit = record["wall_s"]
                break
        times[name] = comm.bcast(hit)
    comm.Barrier()
    if comm.rank == 0:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    s, r = times["sync"], times["risgd"]
    return [_row(f"time to {target:.0%} test accuracy on digits: RI-SGD / sync", r if r else float("nan"),
                 (r / s) if (r and s) else None, None, sync_s=s, risgd_s=r, key="time_to_accuracy_risgd_vs_sync")]


def scaling_rows(comm, reps: int, warmup: int, sizes=SCALING_SIZES) -> list[dict]:
    """Raw Allreduce and Alltoallv (one RPS phase) time for each model size at this rank count."""
    from mpi4py import MPI

    rows = []
    P = comm.size
    for d in sizes:
        x = np.ones(d, dtype=np.float32)
        block = -(-d // P)
        send = np.ones(block * P, dtype=np.float32)
        recv = np.empty(block * P, dtype=np.float32)
        m = time_interleaved(
            comm,
            {"allreduce": lambda: comm.Allreduce(MPI.IN_PLACE, x), "alltoall": lambda: comm.Alltoall(send, recv)},
            reps,
            warmup,
        )
        rows.append({"ranks": P, "params": d, "bytes": 4 * d, "cores": _node_cores(comm),
                     "allreduce_s": m["allreduce"], "alltoall_s": m["alltoall"]})
    return rows


def _node_cores(comm) -> int:
    """Cores the ranks of this node share (for the oversubscription factor of the model)."""
    import os

    from .comm.device import local_rank_and_size

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = local_rank_and_size(comm)[1]
    # Under mpiexec each rank may be bound to one core: count the node's cores, not the mask.
    return max(cores, os.cpu_count() or 1) if local > 1 else cores


# -- the cost model ----------------------------------------------------------------------------
def _features(kind: str, P: np.ndarray, nbytes: np.ndarray, cores: np.ndarray | None = None) -> np.ndarray:
    """Columns of the latency-bandwidth model: time = (alpha * f(P) + beta * bytes * g(P)) * s.

    ``s = max(1, P / cores)`` is the oversubscription of the measuring node (ranks sharing a
    core each get a share of it); on a cluster with a core or more per rank it is 1.
    """
    if kind == "allreduce":  # reduce-scatter + allgather (ring/Rabenseifner)
        f, g = 2 * np.log2(np.maximum(P, 1)), 2 * (P - 1) / P
    else:  # alltoall of d/P blocks: P-1 messages, (P-1)/P of the bytes
        f, g = P - 1, (P - 1) / P
    share = np.ones_like(P) if cores is None else np.maximum(1.0, P / cores)
    return np.stack([f * share, nbytes * g * share], axis=1)


def fit_cost_model(rows: list[dict]) -> dict:
    """Least-squares alpha, beta per collective; relative error on the measurements."""
    fitted = {}
    multi = [r for r in rows if r["ranks"] > 1]
    P = np.array([r["ranks"] for r in multi], dtype=float)
    nbytes = np.array([r["bytes"] for r in multi], dtype=float)
    cores = np.array([r.get("cores", 10**6) for r in multi], dtype=float)
    for kind in ("allreduce", "alltoall"):
        t = np.array([r[f"{kind}_s"] for r in multi])
        A = _features(kind, P, nbytes, cores)
        w = 1 / t  # relative least squares: small and large messages count alike
        coef, *_ = np.linalg.lstsq(A * w[:, None], t * w, rcond=None)
        coef = np.maximum(coef, 0)
        pred = A @ coef
        err = np.abs(pred - t) / t
        fitted[kind] = {"alpha_s": float(coef[0]), "beta_s_per_byte": float(coef[1]),
                        "median_rel_error": float(np.median(err)), "max_rel_error": float(err.max())}
    return fitted


def project(fabric_gbps: float, latency_us: float) -> list[dict]:
    """Per-round times at 16-1024 ranks on the stated fabric, with the fitted model's form."""
    alpha, beta = latency_us * 1e-6, 8 / (fabric_gbps * 1e9)
    models = {"ResNet-110 (1.7M)": 1_727_962, "100M-parameter model": 100_000_000}
    out = []
    for label, params in models.items():
        nbytes = 4.0 * params
        for P in (16, 64, 256, 1024):
            Pa, nb = np.array([P], float), np.array([nbytes])
            allreduce = (_features("allreduce", Pa, nb) @ np.array([alpha, beta])).item()
            alltoall = (_features("alltoall", Pa, nb) @ np.array([alpha, beta])).item()
            out.append({"model": label, "ranks": P, "averaging_round_s": allreduce,
                        "rps_round_s": 2 * alltoall,  # scatter, then gather of the averages
                        "ddp_step_comm_s": allreduce})  # one gradient Allreduce per step, before overlap
    return out


def print_projection(args) -> int:
    rows = json.loads(Path(args.table).read_text()) if Path(args.table).exists() else []
    if rows:
        fitted = fit_cost_model(rows)
        print(f"cost model fitted to {len(rows)} measurements in {args.table} (time = (alpha*f(P) + beta*bytes*g(P)) * max(1, P/cores)):")
        for kind, f in fitted.items():
            print(f"  {kind:<9} alpha {f['alpha_s'] * 1e6:8.2f} us  beta {f['beta_s_per_byte'] * 1e9:7.3f} ns/byte  "
                  f"error median {f['median_rel_error']:.0%}, max {f['max_rel_error']:.0%}")
    else:
        print(f"no scaling table at {args.table}: run tools/bench --scaling first; projecting with the model form only")
    print(f"\nprojection on a {args.fabric_gbps:g} Gb/s, {args.fabric_latency_us:g} us fabric (per round, before overlap):")
    print(f"{'model':<22} {'ranks':>6} {'averaging ms':>13} {'RPS round ms':>13} {'DDP step comm ms':>17}")
    for r in project(args.fabric_gbps, args.fabric_latency_us):
        print(f"{r['model']:<22} {r['ranks']:>6} {r['averaging_round_s'] * 1e3:>13.2f} {r['rps_round_s'] * 1e3:>13.2f} "
              f"{r['ddp_step_comm_s'] * 1e3:>17.2f}")
    print("\nlocal SGD / RI-SGD pay the averaging round once per tau steps; RPS pays its round once per tau steps;\n"
          "sync SGD and DDP pay the gradient Allreduce every step (hidden only as far as backward overlaps it).")
    return 0


# -- whole jobs: the environment a user launches with -------------------------------------------
ENV_RANKS = 4
_LAUNCHER_VARIABLES = ("PMI_", "PMIX_", "MPI_LOCAL", "OMPI_", "HYDRA_")


def _clean_env(**extra: str) -> dict:
    """This environment without thread settings or a launcher's variables, plus ``extra``."""
    from .threads import THREAD_VARIABLES

    env = {k: v for k, v in os.environ.items()
           if k not in THREAD_VARIABLES and not k.endswith("_NUM_THREADS") and not k.startswith(_LAUNCHER_VARIABLES)}
    env.update(extra)
    return env


def _launch_demo(shards: Path, run_dir: Path, env: dict, epochs: float) -> dict:
    """One 4-rank demo run: seconds to the first step line, training loop (summary wall_s), process."""
    import shutil
    import subprocess

    shutil.rmtree(run_dir, ignore_errors=True)
    mpiexec = Path(sys.executable).parent / "mpiexec"
    config = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "digits-risgd.toml"
    cmd = [str(mpiexec if mpiexec.exists() else "mpiexec"), "-n", str(ENV_RANKS), sys.executable, "-m", "mpi4py",
           "-m", "hpcsgd", "train", str(config), "--data", str(shards), "--run-dir", str(run_dir), "--q", "2",
           "--epochs", str(epochs), "--progress", "lines"]
    t0 = time.perf_counter()
    first_step = float("nan")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if first_step != first_step and line.startswith("step "):
            first_step = time.perf_counter() - t0
    proc.wait()
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"demo run failed (exit {proc.returncode}):\n{''.join(lines[-20:])}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"first_step_s": first_step, "loop_s": summary["wall_s"], "process_s": total,
            "train_loss": summary["train_loss"]}


def env_rows(reps: int, quick: bool) -> list[dict]:
    """The demo with the default environment vs OMP_NUM_THREADS=1, alternating; best run of each side."""
    import shutil

    from .data import load_source, write_shards

    tmp = Path(tempfile.mkdtemp(prefix="hpcsgd-bench-env-"))
    try:
        write_shards(load_source("digits"), ENV_RANKS, "label", tmp / "s", seed=0)
        epochs = 5 if quick else 20  # the demo runs 20
        sides = {"default": _clean_env(), "omp1": _clean_env(OMP_NUM_THREADS="1")}
        runs: dict[str, list[dict]] = {name: [] for name in sides}
        for i in range(reps):
            for name, env in (sides.items() if i % 2 == 0 else reversed(list(sides.items()))):
                runs[name].append(_launch_demo(tmp / "s", tmp / f"run-{name}", env, epochs))
                print(f"  {name:<8} loop {runs[name][-1]['loop_s']:6.2f}s  first step {runs[name][-1]['first_step_s']:6.2f}s"
                      f"  process {runs[name][-1]['process_s']:6.2f}s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if len({r["train_loss"] for rs in runs.values() for r in rs}) != 1:
        raise RuntimeError("the demo's result depends on the environment: " + repr(runs))
    # Best of N: the other jobs of a shared machine only ever add time to a whole 4-rank job
    # (here from 3 s to 9 s within one session), so each side's fastest run is the closest to
    # its own cost; every run is printed above to show the spread.
    best = {name: {k: min(r[k] for r in rs) for k in ("loop_s", "first_step_s", "process_s")}
            for name, rs in runs.items()}
    print(f"demo: digits, label shards, q=2, tau 8, {ENV_RANKS} ranks, {epochs:g} epochs; best of {reps} runs per side",
          flush=True)
    return [
        _row("demo training loop, default environment / OMP_NUM_THREADS=1", best["default"]["loop_s"],
             best["default"]["loop_s"] / best["omp1"]["loop_s"], 1.05, key="demo_default_vs_omp1"),
        _row("demo whole process, default environment / OMP_NUM_THREADS=1", best["default"]["process_s"],
             best["default"]["process_s"] / best["omp1"]["process_s"], None, key="demo_process_default_vs_omp1"),
        _row("demo launch to first step line, default environment", best["default"]["first_step_s"], None, None,
             key="demo_launch_to_first_step_s"),
    ]


def run_env(args: argparse.Namespace) -> int:
    """``hpcsgd bench --env``: launches mpiexec itself, so it must not run under one."""
    if any(k.startswith(("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")) for k in os.environ):
        from .errors import ConfigError

        raise ConfigError("hpcsgd bench --env launches its own mpiexec jobs: run it without mpiexec")
    reps = args.reps or (1 if args.quick else 3)
    print(f"hpcsgd bench --env: {reps} run(s) per side, alternated", flush=True)
    rows = env_rows(reps, args.quick)
    print(format_rows(rows), flush=True)
    _write_json(args.json, rows)
    return 0


# -- output ------------------------------------------------------------------------------------
def format_rows(rows: list[dict]) -> str:
    lines = [f"{'measurement':<72} {'median ms':>10} {'ratio':>8} {'target':>8}  met"]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        if r["target"] is None:
            target, ok = "", ""
        else:
            target = (">=" if r["higher_is_better"] else "<=") + f"{r['target']:g}"
            ok = "" if r["ratio"] is None else (
                "yes" if (r["ratio"] >= r["target"] if r["higher_is_better"] else r["ratio"] <= r["target"]) else "NO")
        seconds = r["seconds"]
        ms = f"{seconds * 1e3:.2f}" if seconds == seconds and r["name"].find("resident") < 0 else f"{seconds:.1f}MB"
        lines.append(f"{r['name']:<72} {ms:>10} {ratio:>8} {target:>8}  {ok}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.project:
        return print_projection(args)
    if args.env:
        return run_env(args)
    from mpi4py import MPI

    from .comm.device import apply_threads

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
            _write_json(args.json, rows)
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
        _write_json(args.json, rows)
    return 0


def _write_json(path, rows) -> None:
    if path:
        with open(path, "w") as fh:
            json.dump(rows, fh, indent=1)


__all__ = ["add_arguments", "run", "fit_cost_model", "project", "time_interleaved"]
