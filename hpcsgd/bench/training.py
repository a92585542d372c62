"""Bench sections of training: sync SGD vs DDP, local SGD vs torch's PeriodicModelAverager, a
user's loop vs ``hpcsgd train``'s step, the sampler's rate and memory, time to accuracy."""

from __future__ import annotations

import json
import socket
import tempfile
from pathlib import Path

from .timing import DEFAULT_PARAMS, link_fields, row, rss_mb, time_interleaved


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


def models(kind: str, quick: bool):
    """(name, builder, input batch, labels) for the DDP and averager comparisons."""
    import torch

    from ..train.models import build_model, mlp_hidden_for_params

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


def _seeded_model_and_sgd(builder, momentum: float = 0.0, wrap=None):
    """A model built from seed 0 (every side of a comparison starts from the same one), optionally
    wrapped (DDP), and a plain SGD over it."""
    import torch

    torch.manual_seed(0)
    model = builder() if wrap is None else wrap(builder())
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=momentum)


def ddp_rows(comm, reps: int, warmup: int, quick: bool) -> list[dict]:
    """hpcsgd sync-SGD step vs PyTorch DDP (gloo) step: same model, batch and ranks."""
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from ..algorithms import SyncSGD
    from ..world import init

    _gloo_group(comm)
    world = init(comm, device="cpu")
    rows = []
    for kind in ("mlp", "resnet20"):
        name, builder, x, y = models(kind, quick)
        model_h, opt_h = _seeded_model_and_sgd(builder, momentum=0.9)
        strategy = SyncSGD(model_h, opt_h, world)
        model_d, opt_d = _seeded_model_and_sgd(builder, momentum=0.9, wrap=DistributedDataParallel)

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
        rows.append(row(f"sync-SGD step / DDP step, {name}, batch {len(x)}", m["h"], m["h"] / m["d"], 1.0,
                         ddp_ms=m["d"] * 1e3, key=f"sync_vs_ddp_{kind}", **link_fields(m, "h", ref="d")))
    return rows


def local_rows(comm, reps: int, warmup: int, quick: bool, tau: int = 8) -> list[dict]:
    """Local SGD (tau 8) through the public API vs torch's PeriodicModelAverager: mean step.

    Both sides are a user's loop over a plain ``torch.optim.SGD``: ``zero_grad``, backward,
    then ``strategy.step()`` or ``opt.step()`` + ``average_parameters``.
    """
    import torch.nn.functional as F
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

    from ..algorithms import LocalSGD
    from ..world import init

    _gloo_group(comm)
    world = init(comm, device="cpu")
    rows = []
    for kind in ("mlp", "resnet20"):
        name, builder, x, y = models(kind, quick)
        model_h, opt_h = _seeded_model_and_sgd(builder)
        strategy = LocalSGD(model_h, opt_h, world, tau=tau)
        model_d, opt_d = _seeded_model_and_sgd(builder)
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
        rows.append(row(f"local-SGD tau {tau} step (hpcsgd.LocalSGD) / PeriodicModelAverager, {name}",
                         m["h"] / tau, m["h"] / m["d"], 1.0, key=f"local{tau}_api_vs_pma_{kind}"))
    return rows


def api_rows(comm, reps: int, warmup: int, quick: bool, tau: int = 8) -> list[dict]:
    """A user's loop step (RedundantSampler, plain SGD, ``hpcsgd.LocalSGD.step()``) vs ``hpcsgd train``'s step.

    The same MLP, data, q, batch and tau on both sides; the CLI side is ``Trainer.train_step``
    over shards of the same samples, the user side indexes a tensor data set with the
    sampler's indices. Timed over blocks of ``tau`` steps (one averaging round each).
    """
    import torch
    import torch.nn.functional as F

    from ..config import build_config
    from ..data import load_source, write_shards
    from ..train.models import build_model
    from ..redundant import RedundantSampler
    from ..algorithms import LocalSGD
    from ..train.loop import Trainer
    from ..world import init

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
    return [row(f"user-loop step (hpcsgd.LocalSGD tau {tau}) / hpcsgd train step, MLP, batch {q * b}",
                 m["api"] / tau, m["api"] / m["cli"], 1.02, key="api_step_vs_cli_step")]



def data_rows(comm, reps: int, quick: bool) -> list[dict]:
    """HDF5 sampler batches/s vs the model's steps/s; resident memory vs q/P of the data."""
    import torch
    from mpi4py import MPI
    import torch.nn.functional as F

    from ..data import StratifiedSampler, chunks_for_rank, load_chunk, load_source, read_index, write_shards
    from ..train.models import build_model
    from ..train.batches import gather_on_device

    P, q, b = comm.size, min(2, comm.size), 32
    tmp = comm.bcast(tempfile.mkdtemp(prefix="hpcsgd-bench-") if comm.rank == 0 else None)
    n_train = 4096 if quick else 16384
    if comm.rank == 0:
        data = load_source("synthetic", seed=0, n_train=n_train, n_test=64, num_classes=10, input_shape=(3, 32, 32))
        write_shards(data, P, "iid", Path(tmp) / "s", seed=0)
        del data
    comm.Barrier()
    index = read_index(Path(tmp) / "s")
    before = rss_mb()
    mine = chunks_for_rank(P, q, comm.rank)
    chunks = {c: tuple(torch.from_numpy(a) for a in load_chunk(index, c)) for c in mine}
    grown = rss_mb() - before
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
        row(f"HDF5 sampler batches/s / ResNet-20 steps/s (batch {q * b})", per_batch, m["step"] / per_batch, 10.0,
             higher_is_better=True, key="sampler_vs_step_rate"),
        row(f"resident MB per rank for its data / q/P share ({share_mb:.0f} of {total_mb:.0f} MB)", grown_max,
             grown_max / share_mb if share_mb else None, 1.25, key="resident_vs_share"),
    ]


def accuracy_rows(comm, quick: bool) -> list[dict]:
    """Wall time to a target test accuracy on digits: RI-SGD (q=2, tau 8) vs sync SGD."""
    from ..config import build_config
    from ..data import load_source, write_shards
    from ..train.loop import train

    tmp = comm.bcast(tempfile.mkdtemp(prefix="hpcsgd-bench-") if comm.rank == 0 else None)
    if comm.rank == 0:
        write_shards(load_source("digits"), comm.size, "label", Path(tmp) / "s", seed=0)
    comm.Barrier()
    target = 0.85
    times = {}
    for name, extra in (("sync", {"algorithm": "sync"}), ("risgd", {"algorithm": "local", "q": min(2, comm.size), "tau": 8})):
        cfg = build_config({"data": f"{tmp}/s", "run_dir": f"{tmp}/{name}", "epochs": 10 if quick else 20, "batch_size": 16,
                            "lr": 0.1, "eval_every": 0.5, "progress": "none", "eval_train_samples": 256, **extra})
        train(cfg, comm)
        hit = None
        for line in (Path(cfg.run_dir) / "metrics" / f"rank-{comm.rank}.jsonl").read_text().splitlines():
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
    return [row(f"time to {target:.0%} test accuracy on digits: RI-SGD / sync", r if r else float("nan"),
                 (r / s) if (r and s) else None, None, sync_s=s, risgd_s=r, key="time_to_accuracy_risgd_vs_sync")]


__all__ = ["accuracy_rows", "api_rows", "data_rows", "ddp_rows", "local_rows"]
