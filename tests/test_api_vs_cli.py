"""The public API and ``hpcsgd train`` take the same steps, bit for bit (CPU, 4 ranks).

This file uses only ``import hpcsgd`` (no ``hpcsgd.<submodule>``): it is a user's script.
Run as ``mpiexec -n 4 python tests/test_api_vs_cli.py OUT`` it trains :func:`factory`'s model
on a TensorDataset with each of the four strategies in a plain PyTorch loop; the test then
runs ``hpcsgd train --model test_api_vs_cli:factory`` on the same data written as shards and
compares every rank's loss at every step, the final parameters, counters and consensus.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import hpcsgd

HERE = Path(__file__).resolve().parent
P, CLASSES, PER_CLASS, FEATURES = 4, 4, 40, 12
SEED, Q, BATCH, EPOCHS, LR, MOMENTUM = 3, 2, 6, 2, 0.05, 0.9
# Per algorithm: the strategy's keyword arguments (and the same as CLI flags).
SETTINGS = {
    "sync": {},
    "local": {"tau": 3},
    "rps": {"tau": 3, "drop_rate": 0.2, "seed": SEED},
    "lossy-allreduce": {"drop_rate": 0.2, "seed": SEED},
}


class Net(nn.Module):
    """A model a user defines: two layers, one hidden ReLU."""

    def __init__(self, features: int, classes: int):
        super().__init__()
        self.hidden = nn.Linear(features, 16)
        self.out = nn.Linear(16, classes)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x.flatten(1))))


def factory(input_shape, num_classes):
    """``hpcsgd train --model test_api_vs_cli:factory`` builds the model through this."""
    return Net(int(np.prod(input_shape)), num_classes)


def make_data() -> tuple[np.ndarray, ...]:
    """Four separable-ish classes; every class has PER_CLASS samples, so label chunks are equal."""
    rng = np.random.default_rng(11)
    y = np.repeat(np.arange(CLASSES), PER_CLASS)
    centres = rng.normal(size=(CLASSES, FEATURES))
    x = (centres[y] + rng.normal(scale=1.5, size=(len(y), FEATURES))).astype(np.float32)
    order = rng.permutation(len(y))
    return x[order], y[order].astype(np.int64), x[:20], y[:20].astype(np.int64)


def strategy_for(name, model, opt, world):
    classes = {"sync": hpcsgd.SyncSGD, "local": hpcsgd.LocalSGD, "rps": hpcsgd.RPS,
               "lossy-allreduce": hpcsgd.LossyAllreduce}
    return classes[name](model, opt, world, **SETTINGS[name])


def train_with_api(name: str, out: Path) -> None:
    """A user's loop: sampler, DataLoader, model, SGD, strategy.step()."""
    world = hpcsgd.init()
    x, y, _, _ = make_data()
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    sampler = hpcsgd.RedundantSampler(dataset, world, q=Q, batch_size=BATCH, partition="label",
                                      labels=y, seed=SEED)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    torch.manual_seed(SEED)
    model = factory((FEATURES,), CLASSES).to(world.device)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    strategy = strategy_for(name, model, opt, world)
    losses = []
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            strategy.step()
            losses.append(float(loss))
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    record = {"losses": losses, "counters": strategy.counters.as_dict(),
              "consensus": strategy.consensus_distance(), "steps": strategy.steps}
    np.save(out / f"{name}-params-{world.rank}.npy", params)
    (out / f"{name}-rank-{world.rank}.json").write_text(json.dumps(record))


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=HERE.parent)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"


def _cli_flags(name: str) -> list[str]:
    s = SETTINGS[name]
    flags = ["--algorithm", name, "--q", Q, "--batch-size", BATCH, "--epochs", EPOCHS, "--lr", LR,
             "--momentum", MOMENTUM, "--seed", SEED, "--log-every", 1, "--model", "test_api_vs_cli:factory",
             "--progress", "none"]
    if "tau" in s:
        flags += ["--tau", s["tau"]]
    if "drop_rate" in s:
        flags += ["--drop-rate", s["drop_rate"]]
    return [str(f) for f in flags]


def test_api_loop_matches_hpcsgd_train_bit_for_bit(tmp_path):
    
    x, y, xt, yt = make_data()
    np.savez(tmp_path / "data.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    py, mpiexec = sys.executable, str(Path(sys.executable).parent / "mpiexec")
    _run([py, "-m", "hpcsgd", "shard", "--source", "npz", "--path", str(tmp_path / "data.npz"), "--parts", str(P),
          "--partition", "label", "--seed", str(SEED), "--out", str(tmp_path / "shards")])
    api = tmp_path / "api"
    api.mkdir()
    _run([mpiexec, "-n", str(P), py, "-m", "mpi4py", str(Path(__file__)), str(api)])
    for name in SETTINGS:
        run_dir = tmp_path / f"cli-{name}"
        _run([mpiexec, "-n", str(P), py, "-m", "mpi4py", "-m", "hpcsgd", "train", "--data", str(tmp_path / "shards"),
              "--run-dir", str(run_dir), *_cli_flags(name)])
        steps = json.loads((run_dir / "summary.json").read_text())["steps"]
        final = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
        for rank in range(P):
            mine = json.loads((api / f"{name}-rank-{rank}.json").read_text())
            cli = [json.loads(line) for line in (run_dir / "metrics" / f"rank-{rank}.jsonl").read_text().splitlines()]
            assert mine["steps"] == steps == len(cli) == len(mine["losses"])
            assert [r["loss"] for r in cli] == mine["losses"], f"{name}, rank {rank}: losses differ"
            with h5py.File(final / f"rank-{rank}.h5") as f:  # part "model": its state_dict's tensors, in order
                cli_params = np.concatenate([np.asarray(f["model"][str(i)]).reshape(-1) for i in range(len(f["model"]))])
            assert np.array_equal(cli_params, np.load(api / f"{name}-params-{rank}.npy")), f"{name}, rank {rank}"
            for key in ("rounds", "bytes_sent", "bytes_saved", "messages_sent", "messages_dropped"):
                assert cli[-1][key] == mine["counters"][key], f"{name}, rank {rank}: {key}"
            assert cli[-1]["consensus_distance"] == mine["consensus"]
        if name in ("rps", "lossy-allreduce"):
            assert mine["counters"]["messages_dropped"] > 0  # the loss layer really dropped messages
        if name in ("local", "rps", "lossy-allreduce"):
            assert mine["consensus"] > 0  # replicas differ at the end: not a trivially synced run


if __name__ == "__main__":
    for algorithm in SETTINGS:
        train_with_api(algorithm, Path(sys.argv[1]))
