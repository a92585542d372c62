"""Does an overlapped round hide where the step leaves the CPU free? (issue 23's diagnostic)

The bench's overlap rows (`hpcsgd bench`, section overlap) time real forward and backward
passes; across the namespace cluster on this 2-core machine the 4 ranks' computation takes
every core, and the round's own CPU work (polling MPI's progress, copies and sums) can then only
run instead of the step, not beside it. This script asks what the round hides when the step's
computation is replaced by a sleep of the same length (the CPU is free during the step, as it
is on a node with a core to spare per rank): for local SGD and RPS (drop 0.1) at tau 1 on the
MLP 5.8M, blocks of 4 steps blocking vs overlapped, interleaved, each the slowest rank's time;
hidden share = (blocking - overlapped) / 3 / min(step, round) as in the bench's rows.

    tools/cluster up 2 2 --gbps 1
    tools/cluster run -- .venv/bin/python tools/overlap_free_core.py [--reps 8] [--sleep-s S]
    tools/cluster down

`--sleep-s` sets the step's length (default: the blocking round's time measured first).
"""

from __future__ import annotations

import argparse
import time

BLOCK = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=8, help="interleaved blocks per side (default 8)")
    parser.add_argument("--sleep-s", type=float, help="the step's sleep (default: one blocking round's time)")
    args = parser.parse_args()

    import torch
    from mpi4py import MPI

    from hpcsgd.algorithms import RPS, LocalSGD
    from hpcsgd.bench.timing import time_interleaved
    from hpcsgd.bench.training import models
    from hpcsgd.world import init

    comm = MPI.COMM_WORLD
    world = init(comm, device="cpu")
    name, builder, _, _ = models("mlp", False)

    def steps(cls, overlap: bool, sleep_s: float, kw: dict):
        torch.manual_seed(0)
        model = builder()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        strategy = cls(model, opt, world, tau=1, overlap_rounds=overlap, **kw)

        def run():
            for _ in range(BLOCK):
                time.sleep(sleep_s)  # the step, with its core left free
                strategy.step()
            strategy.flush()

        return run

    rows = []
    for label, cls, kw in (("local", LocalSGD, {}), ("rps", RPS, {"drop_rate": 0.1, "seed": 1})):
        round_s = time_interleaved(comm, {"r": steps(cls, False, 0.0, kw)}, 3, 1)["r"] / BLOCK
        sleep_s = args.sleep_s if args.sleep_s is not None else round_s
        m = time_interleaved(comm, {"blocking": steps(cls, False, sleep_s, kw),
                                    "overlapped": steps(cls, True, sleep_s, kw)}, args.reps, 1)
        hidden = (m["blocking"] - m["overlapped"]) / (BLOCK - 1) / min(sleep_s, round_s)
        rows.append((label, round_s, sleep_s, m["blocking"] / BLOCK, m["overlapped"] / BLOCK, hidden))
    if comm.rank == 0:
        print(f"{name}, {comm.size} ranks, tau 1, steps of sleep (the CPU free), blocks of {BLOCK}, {args.reps} reps")
        print(f"{'round':<6} {'round ms':>9} {'step ms':>8} {'blocking ms/step':>17} {'overlapped ms/step':>19} {'hidden':>7}")
        for label, round_s, sleep_s, blocking, overlapped, hidden in rows:
            print(f"{label:<6} {round_s * 1e3:>9.1f} {sleep_s * 1e3:>8.1f} {blocking * 1e3:>17.1f} "
                  f"{overlapped * 1e3:>19.1f} {hidden:>7.2f}")


if __name__ == "__main__":
    main()
