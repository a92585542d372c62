"""Single-process reference implementations of ALGORITHMS.md: P simulated workers.

Written from the specification, not from the package's strategies: plain loops over workers
and blocks, so a bug in the vectorised MPI code cannot hide in a shared helper. Only the data
(shards, sampler) and the drop-mask generator are reused, as the spec names them.
"""

from __future__ import annotations

import copy
from fractions import Fraction

import torch
import torch.nn.functional as F

from hpcsgd.comm import FlatParams, LinkRates, arrival_mask, block_offsets
from hpcsgd.config import TrainConfig
from hpcsgd.data import StratifiedSampler, chunks_for_rank, load_chunk, read_index
from hpcsgd.train.models import build_model
from hpcsgd.train.schedule import Schedule


def chunk_plan(sizes, q: int, b: int, weighting: str = "size") -> dict[int, tuple[int, Fraction]]:
    """Per chunk ``c``: (samples drawn per step by each holder, loss weight of each sample).

    ALGORITHMS.md, "Data": under ``size`` a chunk's draw is proportional to its size,
    ``round(b |C_c| / mean|C|)`` (at least 1), and its weight makes every sample weigh the
    same: chunk ``c`` weighs ``|C_c| / N`` in the mean over the P ranks of the ranks' losses,
    so each of its ``q`` holders gives each of its ``n_c`` samples ``(|C_c| / N) P / (q n_c)``.
    Under ``uniform`` every chunk draws ``b`` and weighs ``1 / P``. Equal chunks: ``b`` and
    ``1 / (q b)`` either way, the plain batch mean.
    """
    P, N = len(sizes), sum(sizes)
    plan = {}
    for c, n in enumerate(sizes):
        if weighting == "uniform" or len(set(sizes)) == 1:
            draws, target = b, Fraction(1, P)
        else:
            draws, target = max(1, round(Fraction(b * n * P, N))), Fraction(n, N)
        plan[c] = (draws, target * P / (q * draws))
    return plan


class Worker:
    def __init__(self, model, cfg: TrainConfig, rank: int, P: int, index, chunks_data, b: int | None = None):
        self.model = model
        self.flat = FlatParams(model)
        self.opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.sampler, self.weights = rank_sampler(cfg, P, rank, index, b)
        self.data = chunks_data
        self.drawn = 0  # samples drawn since the last round: w_i under average_weights = "samples"

    def batch(self):
        x, y = draw(self.sampler, self.data)
        self.drawn += len(y)
        return x, y

    def loss(self, x, y) -> torch.Tensor:
        """The sample-weighted loss; the plain batch mean when every sample weighs ``1 / B``."""
        return weighted_loss(self.model(x), y, self.weights)

    def backward(self, x, y) -> float:
        self.flat.zero_grad()
        loss = self.loss(x, y)
        loss.backward()
        return float(loss.detach())


def rank_sampler(cfg: TrainConfig, P: int, rank: int, index, b: int | None = None):
    """Rank ``rank``'s stratified sampler (its held chunks, per-chunk draws) and per-sample weights.

    ``b``: this rank's own batch size per chunk (heterogeneous mini-batches), default
    ``cfg.batch_size``. Per-rank sizes draw ``b`` from every held chunk and take the plain mean
    over the rank's batch (ALGORITHMS.md, "Fractional and per-rank redundancy": the authors' rule).
    """
    held = chunks_for_rank(P, cfg.q, rank)
    if b is None:
        plan = chunk_plan(index.chunk_sizes, cfg.q, cfg.batch_size, cfg.chunk_weighting)
    else:
        plan = {c: (b, Fraction(1, b * len(held))) for c in held}
    sampler = StratifiedSampler({c: index.chunk_sizes[c] for c in held}, {c: plan[c][0] for c in held},
                                cfg.seed, rank)
    weights = [plan[c][1] for c in held for _ in range(plan[c][0])]
    return sampler, weights


def draw(sampler, data):
    xs, ys = [], []
    for c, idx in sampler.next_batch():
        x, y = data[c]
        xs.append(torch.from_numpy(x[idx]))
        ys.append(torch.from_numpy(y[idx]))
    return torch.cat(xs), torch.cat(ys)


def weighted_loss(out, y, weights) -> torch.Tensor:
    """``sum_k a_k loss_k``; torch's batch mean when every ``a_k`` is ``1 / B`` (the same value, its bits)."""
    if all(a == Fraction(1, len(weights)) for a in weights):
        return F.cross_entropy(out, y)
    a = torch.tensor([float(a) for a in weights], dtype=out.dtype)
    return torch.dot(F.cross_entropy(out, y, reduction="none"), a)


def simulate(cfg: TrainConfig, P: int, steps: int, batch_sizes: list[int] | None = None) -> list[torch.Tensor]:
    """Run ``cfg`` for ``steps`` steps on P simulated workers; returns each worker's flat x_i.

    ``batch_sizes``: worker i's own ``b_i`` (default: ``cfg.batch_size`` for all). Under
    ``cfg.average_weights == "samples"`` every averaging weighs worker i by ``w_i``, the samples
    it drew since the last round (ALGORITHMS.md, "Fractional and per-rank redundancy").
    """
    index = read_index(cfg.data)
    data = {c: load_chunk(index, c) for c in range(P)}
    torch.manual_seed(cfg.seed)
    base = build_model(cfg.model, tuple(index.input_shape), index.num_classes, tuple(cfg.mlp_hidden))
    sizes = batch_sizes or [None] * P
    workers = [Worker(copy.deepcopy(base), cfg, i, P, index, data, sizes[i]) for i in range(P)]
    schedule = Schedule.from_config(cfg, index.train_size, P)
    rates = LinkRates.build(P, cfg.drop_rate, cfg.drop_rate_phase1, cfg.drop_rate_phase2, cfg.link_drop)
    pending = None
    for t in range(steps):
        lr = schedule.lr_at(cfg, t)
        for w in workers:
            for g in w.opt.param_groups:
                g["lr"] = lr
            w.backward(*w.batch())
        if cfg.algorithm == "sync":
            mean = sum(w.flat.grad for w in workers) / P
            for w in workers:
                w.flat.grad.copy_(mean)
        elif cfg.algorithm == "lossy-allreduce":
            blockwise_average([w.flat.grad for w in workers], cfg.seed, t, rates)
        for w in workers:
            w.opt.step()
        if getattr(cfg, "overlap_rounds", False):
            pending = _overlapped_round(workers, pending if t else None, cfg, t, rates, P)
            continue
        if (t + 1) % cfg.tau == 0:
            weights = round_weights(cfg, workers)
            if cfg.algorithm == "local":
                mean = weighted_mean([w.flat.flat for w in workers], weights)
                for w in workers:
                    w.flat.flat.copy_(mean)
            elif cfg.algorithm == "rps":
                blockwise_average([w.flat.flat for w in workers], cfg.seed, t, rates, weights)
    if getattr(cfg, "overlap_rounds", False) and steps:
        _apply_delayed(workers, pending)  # the last round, applied at the end of training
    return [w.flat.flat.detach().clone() for w in workers]


def round_weights(cfg: TrainConfig, workers) -> list[int] | None:
    """Each worker's ``w_i`` for this round under ``average_weights = "samples"`` (None: equal);
    the counts start again from zero."""
    if getattr(cfg, "average_weights", "equal") != "samples":
        return None
    weights = [w.drawn for w in workers]
    for w in workers:
        w.drawn = 0
    return weights


def weighted_mean(vectors: list[torch.Tensor], weights: list[int] | None) -> torch.Tensor:
    """``(1/P) sum_i x_i``, or ``sum_i w_i x_i / sum_i w_i``."""
    if weights is None:
        return sum(vectors) / len(vectors)
    return sum(w * x for w, x in zip(weights, vectors)) / sum(weights)


def _overlapped_round(workers, pending, cfg, t, rates, P):
    """ALGORITHMS.md, "Overlapped rounds": apply the round started after step t-1, then start
    step t's on snapshots. Returns what is in flight: (snapshots, averages, received masks)."""
    _apply_delayed(workers, pending)
    if (t + 1) % cfg.tau:
        return None
    weights = round_weights(cfg, workers)
    snapshots = [w.flat.flat.detach().clone() for w in workers]
    averages = [s.clone() for s in snapshots]
    d = snapshots[0].numel()
    if cfg.algorithm == "local":
        mean = weighted_mean(snapshots, weights)
        for a in averages:
            a.copy_(mean)
        received = [torch.ones(d, dtype=torch.bool) for _ in workers]
    else:  # rps: per block, where w_j reached worker i
        blockwise_average(averages, cfg.seed, t, rates, weights)
        a2 = arrival_mask(cfg.seed, t, 2, rates.phase2)
        offsets = block_offsets(d, P)
        received = [torch.zeros(d, dtype=torch.bool) for _ in workers]
        for i in range(P):
            for j in range(P):
                if i == j or a2[j, i]:
                    received[i][offsets[j]:offsets[j + 1]] = True
    return snapshots, averages, received


def _apply_delayed(workers, pending):
    """x_i <- avg_i + (x_i - s_i) where the average reached worker i; unchanged elsewhere."""
    if pending is None:
        return
    snapshots, averages, received = pending
    for w, s, a, r in zip(workers, snapshots, averages, received):
        x = w.flat.flat
        x[r] = a[r] + (x[r] - s[r])


def blockwise_average(vectors: list[torch.Tensor], seed: int, step: int, rates: LinkRates,
                      weights: list[int] | None = None) -> None:
    """RPS's exchange, literally: steps 1-5 of ALGORITHMS.md with loops over blocks and ranks.

    ``weights``: block j's average over its arrived set ``N_j`` weighs rank i by
    ``w_i / sum_{k in N_j} w_k`` (None: ``1/|N_j|``).
    """
    P = len(vectors)
    d = vectors[0].numel()
    offsets = block_offsets(d, P)
    a1 = arrival_mask(seed, step, 1, rates.phase1)
    a2 = arrival_mask(seed, step, 2, rates.phase2)
    v = [x.clone() for x in vectors]
    for j in range(P):
        lo, hi = offsets[j], offsets[j + 1]
        arrived = [i for i in range(P) if i == j or a1[i, j]]
        w_j = weighted_mean([v[i][lo:hi] for i in arrived], None if weights is None else [weights[i] for i in arrived])
        for i in range(P):
            if i == j or a2[j, i]:
                vectors[i][lo:hi] = w_j
            else:
                vectors[i][lo:hi] = v[i][lo:hi]


def single_process_concatenated(cfg: TrainConfig, P: int, steps: int) -> torch.Tensor:
    """One model, one optimizer, each step's batch the concatenation of the P ranks' batches.

    What sync SGD must equal (ALGORITHMS.md): no simulated workers, no averaging at all; the
    loss is the mean over ranks of each rank's sample-weighted loss (the plain mean over the
    concatenated batch when the chunks are equal).
    """
    index = read_index(cfg.data)
    data = {c: load_chunk(index, c) for c in range(P)}
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, tuple(index.input_shape), index.num_classes, tuple(cfg.mlp_hidden))
    flat = FlatParams(model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    ranks = [rank_sampler(cfg, P, i, index) for i in range(P)]
    schedule = Schedule.from_config(cfg, index.train_size, P)
    for t in range(steps):
        batches = [draw(sampler, data) for sampler, _ in ranks]
        for g in opt.param_groups:
            g["lr"] = schedule.lr_at(cfg, t)
        flat.zero_grad()
        # The mean over ranks of each rank's weighted loss: with equal weights, the plain
        # mean over the concatenated batch.
        weights = [a / P for _, w in ranks for a in w]
        weighted_loss(model(torch.cat([x for x, _ in batches])), torch.cat([y for _, y in batches]), weights).backward()
        opt.step()
    return flat.flat.detach().clone()


# -- gradient accumulation and optimizer-state averaging (ALGORITHMS.md, issue 26) ----------

def _flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def accumulated_sync(model, optimizer, batches, P: int, steps: int, micro: int, max_norm: float | None = None):
    """Sync SGD with gradient accumulation, one model: ALGORITHMS.md, "Gradient accumulation".

    Every step, rank r's gradient is the *sum* of its ``micro`` micro-batch gradients
    ``batches(t, r, m)``; the optimizer steps on the mean over the P ranks, clipped to
    ``max_norm`` as ``torch.nn.utils.clip_grad_norm_`` clips. Returns the averaged gradient
    of every step (before clipping) and the final flat parameters.
    """
    averaged = []
    for t in range(steps):
        total = None
        for r in range(P):
            for m in range(micro):
                model.zero_grad()
                x, y = batches(t, r, m)
                F.cross_entropy(model(x), y).backward()
                g = _flat_grad(model).clone()
                total = g if total is None else total + g
        mean = total / P
        averaged.append(mean.clone())
        if max_norm is not None:
            mean = mean * min(1.0, max_norm / (float(mean.norm()) + 1e-6))
        offset = 0
        for p in model.parameters():
            n = p.numel()
            p.grad = mean[offset:offset + n].view_as(p).clone()
            offset += n
        optimizer.step()
    return averaged, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def averaged_state_run(models, optimizers, batches, steps: int, tau: int, algorithm: str,
                       seed: int = 0, rates: LinkRates | None = None):
    """P workers, each its own model and optimizer (any torch optimizer), local steps, and every
    ``tau`` steps the models *and every per-parameter state tensor* averaged: plainly
    (``local``) or block-wise by RPS's masks (``rps``), the state in the model's blocks.
    Scalar state is left as it is (it agrees). ALGORITHMS.md, "Local SGD and RI-SGD".
    """
    P = len(models)
    for t in range(steps):
        for r, (model, opt) in enumerate(zip(models, optimizers)):
            opt.zero_grad()
            x, y = batches(t, r, 0)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        if (t + 1) % tau:
            continue
        vectors = [[torch.cat([p.detach().reshape(-1) for p in m.parameters()])] for m in models]
        names = sorted(k for k, v in optimizers[0].state[next(models[0].parameters())].items()
                       if isinstance(v, torch.Tensor) and v.dim() > 0)
        for r, (m, opt) in enumerate(zip(models, optimizers)):
            for name in names:
                vectors[r].append(torch.cat([opt.state[p][name].reshape(-1) for p in m.parameters()]))
        for k in range(1 + len(names)):
            column = [vectors[r][k] for r in range(P)]
            if algorithm == "local":
                mean = sum(column) / P
                for v in column:
                    v.copy_(mean)
            else:
                blockwise_average(column, seed, t, rates)
        for r, (m, opt) in enumerate(zip(models, optimizers)):
            offset = 0
            for p in m.parameters():
                n = p.numel()
                with torch.no_grad():
                    p.copy_(vectors[r][0][offset:offset + n].view_as(p))
                    for k, name in enumerate(names, start=1):
                        opt.state[p][name].copy_(vectors[r][k][offset:offset + n].view_as(p))
                offset += n
    return models, optimizers


def node_bytes(P: int, R: int, seed: int, rates: LinkRates, round_steps, d: int, itemsize: int = 4,
               contributors=None) -> tuple[int, int]:
    """RPS rounds' bytes between ranks of one node and between nodes (rank i on node i // R; R = 0:
    one node), summed over ranks, as the node-aware exchange sends them (ALGORITHMS.md,
    "Node-aware exchange"; the flat exchange's where every node holds one rank).

    A pair on one node: each arrived message ``i -> j`` (phase 1, block j) and ``j -> i`` (phase 2,
    block j), through the node's window. Across nodes, phase 1: a node's ranks are cut into the
    largest ranges of the summation tree inside it; a range of one rank sends its arrived row, a
    wider range sends one sum per block j that any of its rows counts in, from its member
    ``lo + j % width``, to which every other member whose row counts copies it (one node). Phase
    2: block j's average goes once to each other node where some rank gets it, to its member
    ``j % size``, which copies it to the others there that get it. ``contributors(t)``: who
    counts at step t (None: everyone).
    """
    node = [i // R if R else 0 for i in range(P)]
    groups = sorted(set(node))
    members = {n: [i for i in range(P) if node[i] == n] for n in groups}
    offsets = block_offsets(d, P)
    size = [int(offsets[j + 1] - offsets[j]) for j in range(P)]

    def ranges(lo: int, hi: int, n: int) -> list[tuple[int, int]]:
        if all(node[i] == n for i in range(lo, hi)):
            return [(lo, hi)]
        if hi - lo == 1:
            return []
        mid = lo + 2 ** ((hi - lo - 1).bit_length() - 1)
        return ranges(lo, mid, n) + ranges(mid, hi, n)

    intra = inter = 0
    for t in round_steps:
        a1 = arrival_mask(seed, t, 1, rates.phase1)
        a2 = arrival_mask(seed, t, 2, rates.phase2)
        counts = [True] * P if contributors is None or contributors(t) is None else list(contributors(t))
        has_average = [any(a1[i, j] and counts[i] for i in range(P)) for j in range(P)]
        for j in range(P):
            for i in range(P):
                if i != j and node[i] == node[j]:
                    intra += size[j] * itemsize * (int(a1[i, j]) + int(a2[j, i] and has_average[j]))
            for n in groups:
                if n == node[j]:
                    continue
                for lo, hi in ranges(0, P, n):
                    rows = [i for i in range(lo, hi) if a1[i, j] and counts[i]]
                    if hi - lo == 1:
                        inter += size[j] * itemsize * int(a1[lo, j])
                    elif rows:
                        combiner = lo + j % (hi - lo)
                        inter += size[j] * itemsize
                        intra += size[j] * itemsize * len([i for i in rows if i != combiner])
                getting = [i for i in members[n] if a2[j, i] and has_average[j]]
                if getting:
                    relay = members[n][j % len(members[n])]
                    inter += size[j] * itemsize
                    intra += size[j] * itemsize * len([i for i in getting if i != relay])
    return intra, inter
