"""Bench section 'overlap': how much of an emulated round an overlapped round hides, and what
network emulation costs when it is off (ALGORITHMS.md, "Overlapped rounds", "Network emulation")."""

from __future__ import annotations

from .timing import ratio_paired, row, time_interleaved
from .training import models


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
    from ..algorithms import link_network
    from ..world import init

    world = init(comm, device="cpu")
    rows = []
    for kind in ("mlp",) if quick else ("mlp", "resnet20"):  # ResNet-20's rows take minutes
        name, builder, x, y = models(kind, quick)
        # ResNet-20: 5 rounds of 2 x 4 steps at the default reps (2 rounds left a median of
        # two, which moved the rows by +-0.3 from run to run).
        rounds = max(3, reps // 2) if kind == "mlp" else max(3, reps // 4)
        compute_s, net = _round_as_long_as_a_step(comm, world, builder, x, y, link_network)
        for label, kw in (("local", {}), ("rps", {"drop_rate": 0.1, "seed": 1})):
            sides = {side: _timed_steps(world, builder, x, y, label, overlap, net, block, kw)
                     for side, overlap in (("blocking", False), ("overlapped", True))}
            m = time_interleaved(comm, sides, rounds, 1)
            hidden = (m["blocking"] - m["overlapped"]) / (block - 1) / compute_s if net is not None else None
            suffix = "" if kind == "mlp" else f"_{kind}"
            rows.append(row(f"{label} tau 1 ({name}), emulated round = one compute step ({compute_s * 1e3:.0f} ms): "
                             f"hidden share of the round", m["overlapped"] / block, hidden, 0.80,
                             higher_is_better=True, key=f"overlap_hidden_{label}{suffix}",
                             blocking_step_s=m["blocking"] / block))
    name, builder, x, y = models("mlp", quick)
    off = _timed_steps(world, builder, x, y, "local", False, None, block, {})  # emulation compiled in, off
    absent = _timed_steps(world, builder, x, y, "local", False, None, block, {}, before_emulation=True)
    # Twice the pairs of the other rows: the two sides run the same code but for a None check,
    # and at 20 pairs the row spread from 0.97 to 1.03 over six runs.
    seconds, ratio = ratio_paired(comm, off, absent, max(5, 2 * reps), warmup)
    rows.append(row(f"local tau 1 ({name}) step, network emulation off / absent (paired)", seconds / block,
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
