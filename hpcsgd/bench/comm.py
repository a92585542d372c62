"""Bench sections of the communication layer: exchanges vs raw MPI, the watchdog's cost, and
the exchange-time vs model-size table the cost model is fitted to."""

from __future__ import annotations

import time

import numpy as np

from .links import probe_rows
from .timing import flat_mlp, link_fields, node_cores, ratio_paired, row, time_interleaved

SCALING_SIZES = (100_000, 1_000_000, 10_000_000, 50_000_000)


def exchange_rows(comm, params: int, reps: int, warmup: int, nodes: int = 1) -> list[dict]:
    """Local SGD's averaging round and RPS rounds vs raw Allreduce of the same flat buffer.

    The averaging round is measured as training runs it: the round step's optimizer step
    multiplies the model by 1/L in its update pass (ScalingSGD), so the round is a bare
    Allreduce. Since that moves work into the optimizer, the rows also time a round step's
    optimizer step against a plain one, and the whole round step against optimizer + raw.
    The raw Allreduce runs where the average does, on the model buffer right after an
    optimizer step: an Allreduce after the optimizer has streamed the model through memory
    is slower than the same call after a light operation, for raw mpi4py too (README, "Benchmarks").
    ``avg_nonblocking``: the same round with ``allreduce = "nonblocking"`` (the library's
    Iallreduce; opt-in, since it may round differently from the blocking call).
    Across ``nodes`` > 1, more rows: rank 0 and rank P/2 (another node) swap the buffer, the
    links' floor for a node-aware Allreduce's bytes, and the link probe the cost model is
    calibrated on (hpcsgd/bench/links.py, :func:`~hpcsgd.bench.links.probe_rows`), measured
    first, at smaller sizes than the rows it predicts.
    """
    import torch
    from mpi4py import MPI

    from ..comm import BlockExchange, Collectives, LinkRates
    from ..optim import ScalingSGD

    model, flat = flat_mlp(params)
    coll = Collectives(comm)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    optimizer = ScalingSGD(model.parameters(), lr=1e-3, momentum=0.9)
    local, local_nb, rps0 = _rounds(comm, coll, model, optimizer)
    model_buffer = flat.flat.detach().numpy()
    ex1 = BlockExchange(coll, flat.numel, LinkRates.build(comm.size, 0.1), seed=1)  # auto: shared memory on one node
    ex1_msg = BlockExchange(coll, flat.numel, LinkRates.build(comm.size, 0.1), seed=1, path="alltoallv")
    step = iter(range(10**9))
    probe = probe_rows(comm, 4 * flat.numel, reps, warmup) if nodes > 1 else []
    pair = _pair_swap(comm, model_buffer) if nodes > 1 else {}
    m = time_interleaved(
        comm,
        {
            **pair,
            "opt": lambda: optimizer.step(),
            "raw": lambda: comm.Allreduce(MPI.IN_PLACE, model_buffer, op=MPI.SUM),
            "unscale": lambda: flat.flat.mul_(1.0 / comm.size),  # keeps the values bounded; not reported
            "opt_round": lambda: local.optimizer_step(0),  # tau 1: every step is a round step
            "avg": lambda: local.after_step(0),
            # As a round step runs it: the 1/L rode in the optimizer step (here: in the next unscale).
            "avg_nb": lambda: (setattr(local_nb, "_prescaled", True), local_nb.after_step(0)),
            "unscale_nb": lambda: flat.flat.mul_(1.0 / comm.size),  # not reported
            "rps0_opt": lambda: rps0.optimizer_step(0),  # not reported: the same step as opt_round
            "rps0": lambda: rps0.after_step(0),
            "rps1": lambda: ex1.average(flat.flat, next(step)),
            "rps1_msg": lambda: ex1_msg.average(flat.flat, next(step)),
            "mask1": lambda: ex1.masks(next(step)),
        },
        reps,
        warmup,
    )
    return probe + _exchange_report(m, f"{flat.numel / 1e6:.1f}M params", ex1.path, 4 * flat.numel)


def _rounds(comm, coll, model, optimizer) -> tuple:
    """The strategies whose rounds the exchange rows time: local SGD, the same with the
    nonblocking Allreduce, and RPS at drop 0, all on ``model`` (tau 1: every step a round)."""
    import torch

    from ..algorithms import RPS, LocalSGD
    from ..comm import Collectives, LinkRates
    from ..world import World

    world = World(comm, comm.rank, comm.size, 0, 1, torch.device("cpu"), tuple(range(comm.size)))
    local = LocalSGD(model, optimizer, world, tau=1, collectives=coll)
    # Its own comm layer: the strategy sets the layer's Allreduce kind, which the others share.
    local_nb = LocalSGD(model, optimizer, world, tau=1, collectives=Collectives(comm), allreduce="nonblocking")
    # RPS at drop 0 as training runs it: a lossless round is one Allreduce whose 1/L rides in
    # the optimizer step, as local SGD's (the optimizer step is timed by opt_round's row).
    rps0 = RPS(model, optimizer, world, tau=1, rates=LinkRates.build(comm.size, 0.0), seed=1, collectives=coll)
    return local, local_nb, rps0


def _pair_swap(comm, buffer) -> dict:
    """{"pair": a call in which rank 0 and rank P/2 swap ``buffer`` (a copy) and the others wait}."""
    peer = {0: comm.size // 2, comm.size // 2: 0}.get(comm.rank)
    send, recv = buffer.copy(), buffer.copy()
    if peer is None:
        return {"pair": lambda: None}
    return {"pair": lambda: comm.Sendrecv(send, dest=peer, recvbuf=recv, source=peer)}


def _exchange_report(m: dict, mb: str, path: str, nbytes: int) -> list[dict]:
    """The exchange section's rows from its medians ``m`` (``nbytes``: the model buffer's size)."""
    whole = (m["opt_round"] + m["avg"]) / (m["opt"] + m["raw"])
    pair = [row("Sendrecv of the buffer between two nodes, one rank each (the links' floor) / raw Allreduce",
                m["pair"], m["pair"] / m["raw"], None, key="link_sendrecv", bytes=nbytes,
                **link_fields(m, "pair", ref="raw"))] if "pair" in m else []
    return [
        row(f"raw mpi4py Allreduce, {mb} (the floor)", m["raw"], 1.0, None, key="allreduce_raw", bytes=nbytes,
             **link_fields(m, "raw")),
        *pair,
        row("averaging round / raw Allreduce", m["avg"], m["avg"] / m["raw"], 1.03, key="avg_vs_allreduce",
             bytes=nbytes, **link_fields(m, "avg", ref="raw")),
        row("averaging round, allreduce nonblocking (opt-in, not bit-identical) / raw",
             m["avg_nb"], m["avg_nb"] / m["raw"], None, key="avg_nonblocking_vs_allreduce", bytes=nbytes,
             **link_fields(m, "avg_nb", ref="raw")),
        row("round step's optimizer step (1/L folded in) / plain step", m["opt_round"], m["opt_round"] / m["opt"], 1.05,
             key="round_opt_vs_plain_opt"),
        row("round step (optimizer + average) / (optimizer + raw)", m["opt_round"] + m["avg"], whole, 1.10,
             key="round_step_vs_opt_allreduce"),
        row("RPS round, drop 0 (1/L in the optimizer step) / raw Allreduce", m["rps0"], m["rps0"] / m["raw"], 1.03,
             key="rps0_vs_allreduce", bytes=nbytes, **link_fields(m, "rps0", ref="raw")),
        row(f"RPS round, drop 0.1 ({path}) / raw Allreduce", m["rps1"], m["rps1"] / m["raw"], 1.0,
             key="rps01_vs_allreduce", bytes=nbytes, path=path, **link_fields(m, "rps1", ref="raw")),
        row("RPS round, drop 0.1, two Ialltoallv (the multi-node path) / raw Allreduce", m["rps1_msg"],
             m["rps1_msg"] / m["raw"], None, key="rps01_alltoallv_vs_allreduce", bytes=nbytes,
             **link_fields(m, "rps1_msg", ref="raw")),
        row("drop masks / RPS round at 0.1 (loss-layer cost)", m["mask1"], m["mask1"] / m["rps1"], 0.02,
             key="drop_masks_vs_rps01"),
    ]


def watchdog_rows(comm, params: int, reps: int, warmup: int) -> list[dict]:
    """What the collective watchdog costs when nothing is wrong, and what the alternative would.

    ``watchdog_overhead``: local SGD's averaging round (``allreduce_sum_`` of the flat model, a
    blocking Allreduce under the guard, the monitor thread running) with the watchdog on / off. ``watchdog_polling_alternative``:
    the same Allreduce started nonblocking and polled with ``Test`` against a deadline (a
    watchdog without a thread) / the blocking Allreduce.
    """
    from mpi4py import MPI

    from ..comm import Collectives
    from ..comm.watchdog import WATCHDOG

    _, flat = flat_mlp(params)
    flat.flat.detach().zero_()  # sums of zeros stay zero: no rescaling pass between rounds
    coll = Collectives(comm)
    buffer = flat.flat.detach().numpy()
    timeout = 600.0
    WATCHDOG.arm(comm, timeout)

    def round_with(seconds: float):
        WATCHDOG.timeout = seconds
        coll.allreduce_sum_(flat.flat)  # what LocalSGD.after_step runs on a round step

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
        row("averaging round, collective watchdog on / off", on, on_ratio, 1.01, key="watchdog_overhead",
             guard_us=guard_us),
        row("Iallreduce + Test polling / blocking Allreduce (the watchdog not chosen)", poll, poll_ratio, None,
             key="watchdog_polling_alternative"),
    ]



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
        rows.append({"ranks": P, "params": d, "bytes": 4 * d, "cores": node_cores(comm),
                     "allreduce_s": m["allreduce"], "alltoall_s": m["alltoall"]})
    return rows


__all__ = ["SCALING_SIZES", "exchange_rows", "scaling_rows", "watchdog_rows"]
