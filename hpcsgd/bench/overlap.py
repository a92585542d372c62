"""Bench section 'overlap': how much of an emulated round an overlapped round hides, and what
network emulation costs when it is off (ALGORITHMS.md, "Overlapped rounds", "Network emulation")."""

from __future__ import annotations

from .timing import link_fields, ratio_paired, row, time_interleaved
from .training import models


def overlap_rows(comm, reps: int, warmup: int, quick: bool, block: int = 4, nodes: int = 1) -> list[dict]:
    """How much of a round an overlapped round hides, and what emulation costs when off.

    Local SGD and RPS (drop 0.1) at tau 1 through the public API, on the MLP 5.8M (the rows
    issue 14 names) and on ResNet-20. On one node the round is emulated: the emulated
    bandwidth is set so that one averaging round (an Allreduce charged as a ring) takes as
    long as one compute step (forward, backward, optimizer, measured first). Across ``nodes``
    > 1 the round is the real one over the links, and the batch is repeated until a compute
    step takes about as long (a round can hide behind no more than one step at tau 1). Blocks
    of ``block`` consecutive steps and a flush are timed, blocking and overlapped alternately
    (a round in flight must not run into the other side's timing). Row value, the steady
    state: (blocking block - overlapped block) / ((block - 1) x the hideable time, the round's
    or the step's, whichever is shorter); the overlapped block's last round, completed by the
    flush, has no next step to hide behind, and the blocking block's last round is no better.

    What it can show depends on the cores: the round's real transfer is CPU and memory work
    too, which hides behind the computation only where the computation leaves room for it.
    """
    from ..world import init

    world = init(comm, device="cpu")
    rows = []
    # ResNet-20's rows take minutes; across nodes its round (1.1 MB) is a few percent of its step,
    # far below the step's noise, so the hidden share of it cannot be measured there.
    for kind in ("mlp",) if quick or nodes > 1 else ("mlp", "resnet20"):
        name, builder, x, y = models(kind, quick)
        # ResNet-20: 5 rounds of 2 x 4 steps at the default reps (2 rounds left a median of
        # two, which moved the rows by +-0.3 from run to run).
        rounds = max(3, reps // 2) if kind == "mlp" else max(3, reps // 4)
        x, y, net, hideable, what, extra = _round_and_step(comm, world, builder, x, y, nodes)
        for label, kw in (("local", {}), ("rps", {"drop_rate": 0.1, "seed": 1})):
            sides = {side: _timed_steps(world, builder, x, y, label, overlap, net, block, kw)
                     for side, overlap in (("blocking", False), ("overlapped", True))}
            m = time_interleaved(comm, sides, rounds, 1)
            hidden = (m["blocking"] - m["overlapped"]) / (block - 1) / hideable if hideable else None
            suffix = "" if kind == "mlp" else f"_{kind}"
            rows.append(row(f"{label} tau 1 ({name}), {what}: hidden share of the round", m["overlapped"] / block,
                             hidden, 0.80, higher_is_better=True, key=f"overlap_hidden_{label}{suffix}",
                             blocking_step_s=m["blocking"] / block, **extra,
                             **link_fields(m, "overlapped", per=block, ref="blocking")))
    name, builder, x, y = models("mlp", quick)
    off = _timed_steps(world, builder, x, y, "local", False, None, block, {})  # emulation compiled in, off
    absent = _timed_steps(world, builder, x, y, "local", False, None, block, {}, before_emulation=True)
    # Twice the pairs of the other rows: the two sides run the same code but for a None check,
    # and at 20 pairs the row spread from 0.97 to 1.03 over six runs.
    seconds, ratio = ratio_paired(comm, off, absent, max(5, 2 * reps), warmup)
    rows.append(row(f"local tau 1 ({name}) step, network emulation off / absent (paired)", seconds / block,
                     ratio, 1.01, key="netem_off_overhead"))
    return rows


def _round_and_step(comm, world, builder, x, y, nodes: int):
    """(x, y, emulated network or None, hideable seconds or None, row text, row fields) of one model."""
    from ..algorithms import link_network

    if nodes > 1:  # the real round over the links; the step made about as long
        x, y, compute_s, round_s = _step_as_long_as_a_round(comm, builder, x, y)
        what = f"real round {round_s * 1e3:.0f} ms over {nodes} nodes, batch {len(x)}"
        return x, y, None, min(compute_s, round_s), what, {"compute_s": compute_s, "round_s": round_s}
    compute_s = _compute_step_s(comm, builder, x, y)
    net = _network_as_long_as(comm, world, builder, compute_s, link_network)
    what = f"emulated round = one compute step ({compute_s * 1e3:.0f} ms)"
    return x, y, net, compute_s if net is not None else None, what, {}


def _compute_step_s(comm, builder, x, y) -> float:
    """Median seconds of one compute step (forward, backward, optimizer) at this batch."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = builder()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return time_interleaved(comm, {"c": step}, 3, 1)["c"]


def _network_as_long_as(comm, world, builder, seconds: float, link_network):
    """An emulated network whose ring Allreduce of the model takes ``seconds`` (None on one rank)."""
    L, numel = comm.size, sum(p.numel() for p in builder().parameters())
    if L < 2:
        return None
    bytes_per_s = 2 * (L - 1) / L * numel * 4 / seconds
    return link_network(world, gbps=bytes_per_s * 8 / 1e9)


def _step_as_long_as_a_round(comm, builder, x, y, most: int = 16):
    """(x, y, compute seconds, round seconds): the batch repeated (up to ``most`` times) until a
    compute step takes about as long as one real averaging round of the model (an Allreduce,
    as local SGD's round; RPS's is of the same order)."""
    import torch

    from ..comm import Collectives

    torch.manual_seed(0)
    flat = torch.cat([p.detach().reshape(-1) for p in builder().parameters()])
    flat.zero_()  # sums of zeros stay zero
    coll = Collectives(comm)
    round_s = time_interleaved(comm, {"r": lambda: coll.allreduce_sum_(flat, count_round=False)}, 3, 1)["r"]
    compute_s = _compute_step_s(comm, builder, x, y)
    times = comm.bcast(max(1, min(most, round(round_s / compute_s))))
    if times > 1:
        x, y = torch.cat([x] * times), torch.cat([y] * times)
        compute_s = _compute_step_s(comm, builder, x, y)
    return x, y, compute_s, round_s


def _timed_steps(world, builder, x, y, label, overlap, network, block, kw, before_emulation=False):
    """``block`` training steps of a fresh model under ``label``'s strategy, then a flush."""
    import torch
    import torch.nn.functional as F

    from ..algorithms import RPS, LocalSGD

    torch.manual_seed(0)
    model = builder()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cls = LocalSGD if label == "local" else RPS
    if before_emulation:  # the round as it was before network emulation existed
        coll = _collectives_before_emulation()(world.comm, list(range(world.size)), network=network)
        strategy = cls(model, opt, world, tau=1, overlap_rounds=overlap, collectives=coll, **kw)
    else:
        strategy = cls(model, opt, world, tau=1, overlap_rounds=overlap, network=network, **kw)

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

    from ..comm import Collectives
    from ..comm.watchdog import WATCHDOG

    class CollectivesBeforeEmulation(Collectives):
        def allreduce_sum_(self, tensor, tag: str = "avg", count_round: bool = True):
            buf, host = self.mpi_view(tensor, tag)
            with WATCHDOG.guard(f"Allreduce [{tag}]", self.comm):
                self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            self._count_allreduce(tensor, count_round)
            if host is not None:
                tensor.copy_(host.view_as(tensor))
            return tensor

    return CollectivesBeforeEmulation


__all__ = ["overlap_rows"]
