"""A DDP-style loop of today on hpcsgd: AdamW, warm-up + cosine, accumulation, clipping, bf16, workers.

    mpiexec -n 4 python -m mpi4py jobs/examples/modern_loop.py runs/modern --strategy local
    mpiexec -n 2 python -m mpi4py jobs/examples/modern_loop.py runs/modern --strategy local  # resumes on 2
    hpcsgd report runs/modern --out reports/modern --tensorboard reports/modern-tb

Every epoch ends with a checkpoint of every part (model, optimizer, scheduler, sampler,
strategy); started again on the same run directory the script resumes from it, also on
fewer ranks (the departed ranks' chunks are adopted). ``--stop-after E`` ends the job after
epoch E's checkpoint, as a killed job would. The README's "From DDP to hpcsgd" explains each part.
"""

import argparse
import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

import hpcsgd


class Net(nn.Module):
    def __init__(self, features=20, classes=5):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, classes))

    def forward(self, x):
        return self.body(x)


def blobs(n, seed):
    """Five Gaussian blobs in 20 dimensions (a TensorDataset: workers pickle it cheaply)."""
    g = torch.Generator().manual_seed(seed)
    centres = 0.4 * torch.randn(5, 20, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 5, (n,), generator=g)
    return torch.utils.data.TensorDataset(centres[y] + torch.randn(n, 20, generator=g), y)


def warmup_cosine(step, warmup, total):
    """LambdaLR factor: linear warm-up over ``warmup`` steps, then cosine down to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def evaluate(model, dataset, batch_size=250):
    """Loss and accuracy over ``dataset`` (every rank holds the same model inside averaged_model())."""
    loss = correct = 0.0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for x, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
            out = model(x).float()
            loss += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
    return loss / len(dataset), correct / len(dataset)


def build_strategy(name, model, opt, world):
    if name == "sync":
        return hpcsgd.SyncSGD(model, opt, world)  # buckets averaged from gradient hooks, as DDP's
    # AdamW's exp_avg and exp_avg_sq are averaged with the model at each round, so every
    # rank's optimizer continues from the same state as its averaged model.
    if name == "local":
        return hpcsgd.LocalSGD(model, opt, world, tau=8, average_optimizer_state=True)
    return hpcsgd.RPS(model, opt, world, tau=2, drop_rate=0.1, seed=0, average_optimizer_state=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--strategy", choices=("sync", "local", "rps"), default="sync")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--stop-after", type=int, default=None, metavar="E", help="end after epoch E's checkpoint")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="train through torch.compile(model, backend=BACKEND) (default backend: inductor)")
    parser.add_argument("--train-size", type=int, default=2000)
    args = parser.parse_args()

    world = hpcsgd.init()  # arms the watchdog: a rank that hangs or runs ahead ends the job (600 s)
    train, test = blobs(args.train_size, seed=1), blobs(500, seed=2)
    sampler = hpcsgd.RedundantSampler(train, world, q=2, batch_size=16, partition="label",
                                      labels=train.tensors[1], seed=0)
    loader = torch.utils.data.DataLoader(train, batch_sampler=sampler, num_workers=2, persistent_workers=True)
    torch.manual_seed(0)
    model = Net().to(world.device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    strategy = build_strategy(args.strategy, model, opt, world)
    # len(sampler) is read at every step: after a resume on fewer ranks it is the run's again.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, warmup=2 * len(sampler), total=args.epochs * len(sampler)))
    parts = {"model": model, "optimizer": opt, "scheduler": scheduler, "sampler": sampler, "strategy": strategy}
    start = hpcsgd.load_checkpoint(args.run_dir, world, parts)  # None: nothing to resume
    # Compiled after the strategy re-homed the parameters into its flat buffer.
    forward = torch.compile(model, backend=args.compile) if args.compile else model

    config = {"algorithm": args.strategy, "q": 2, "batch_size": 16, "optimizer": "AdamW", "lr": 3e-3,
              "epochs": args.epochs, "model": "Net"}
    log = hpcsgd.RunLog(args.run_dir, strategy.world, config, resume_step=start, sampler=sampler)
    for epoch in range((start or 0) // len(sampler), args.epochs):
        sampler.set_epoch(epoch)
        losses = []
        for x, y in hpcsgd.progress(loader, world, desc=f"epoch {epoch + 1}"):
            opt.zero_grad()
            for i, (xm, ym) in enumerate(zip(x.chunk(2), y.chunk(2))):  # two micro-batches
                # The first accumulates locally; the second's backward averages the sum (sync).
                quiet = strategy.no_sync() if i == 0 else contextlib.nullcontext()
                with quiet:
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        loss = F.cross_entropy(forward(xm), ym) / 2
                    loss.backward()  # outside autocast, as torch recommends
                losses.append(2 * loss.item())
            strategy.synchronize()  # sync: the averaged gradient is what gets clipped, as under DDP
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            strategy.step()
            scheduler.step()
        with strategy.averaged_model():
            test_loss, test_acc = evaluate(forward, test)
        log.log(strategy.steps, strategy, epoch=epoch + 1, loss=sum(losses) / len(losses),
                lr=scheduler.get_last_lr()[0], avg_test_loss=test_loss, avg_test_accuracy=test_acc)
        hpcsgd.save_checkpoint(args.run_dir, world, parts, step=strategy.steps)
        if args.stop_after == epoch + 1 and epoch + 1 < args.epochs:
            if world.rank == 0:
                print(f"stopped after epoch {epoch + 1} (step {strategy.steps})", flush=True)
            return

    with strategy.averaged_model():
        train_loss, _ = evaluate(forward, train)
        test_loss, test_acc = evaluate(forward, test)
    summary = log.finish(strategy, train_loss=train_loss, test_loss=test_loss, test_accuracy=test_acc)
    if summary:
        print(f"done: {summary['steps']} steps on {summary['world_size']} of {summary['ranks']} ranks, "
              f"coverage {summary['coverage']}, final train loss {train_loss!r}, test accuracy {test_acc:.3f}")


if __name__ == "__main__":
    main()
