"""Your model, your data, your loop: RPS at 10% message loss, q=2 redundancy, a run directory.

    mpiexec -n 4 python -m mpi4py jobs/examples/own_loop.py runs/own-loop
    hpcsgd report runs/own-loop --out reports/own-loop
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn

import hpcsgd


class Net(nn.Module):
    def __init__(self, features=20, classes=5):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x):
        return self.body(x)


def blobs(n, seed):
    """Five Gaussian blobs in 20 dimensions: a TensorDataset with .tensors = (x, y)."""
    g = torch.Generator().manual_seed(seed)
    centres = 0.4 * torch.randn(5, 20, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 5, (n,), generator=g)
    return torch.utils.data.TensorDataset(centres[y] + torch.randn(n, 20, generator=g), y)


world = hpcsgd.init()
train, test = blobs(2000, seed=1), blobs(500, seed=2)
sampler = hpcsgd.RedundantSampler(train, world, q=2, batch_size=16, partition="label",
                                  labels=train.tensors[1], seed=0)
loader = torch.utils.data.DataLoader(train, batch_sampler=sampler)
torch.manual_seed(0)
model = Net().to(world.device)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
strategy = hpcsgd.RPS(model, opt, world, tau=1, drop_rate=0.1, seed=0)
config = {"algorithm": "rps", "q": 2, "tau": 1, "drop_rate": 0.1, "batch_size": 16, "lr": 0.05, "model": "Net"}
log = hpcsgd.RunLog(sys.argv[1] if len(sys.argv) > 1 else "runs/own-loop", world, config)

for epoch in range(4):
    sampler.set_epoch(epoch)
    for x, y in loader:
        opt.zero_grad()
        loss = F.cross_entropy(model(x.to(world.device)), y.to(world.device))
        loss.backward()
        strategy.step()
    log.log(strategy.steps, strategy, epoch=epoch + 1, loss=loss.item())

with torch.no_grad():
    x, y = (t.to(world.device) for t in test.tensors)
    accuracy = (model(x).argmax(1) == y).float().mean().item()  # this rank's own model
    with strategy.averaged_model():  # the mean of the ranks' models, then each gets its own back
        averaged = (model(x).argmax(1) == y).float().mean().item()
summary = log.finish(strategy, rank_means={"test_accuracy": accuracy}, test_accuracy=averaged)
if summary:
    print(f"{summary['steps']} steps, {summary['rounds']} rounds, arrival {summary['arrival_realised']:.3f}, "
          f"test accuracy (mean over ranks) {summary['test_accuracy_rank_mean']:.3f}, "
          f"of the averaged model {summary['test_accuracy']:.3f}")
