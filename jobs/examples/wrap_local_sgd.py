"""An existing plain-PyTorch loop made data-parallel local SGD: three added lines (marked).

    mpiexec -n 4 python -m mpi4py jobs/examples/wrap_local_sgd.py

Two lines change too (marked): each rank reads its own chunk through RedundantSampler, and
``strategy.step()`` takes the place of ``opt.step()`` (it calls it, and averages every 8 steps).
"""

import torch
import torch.nn.functional as F
from torch import nn

import hpcsgd  # added (1)

g = torch.Generator().manual_seed(0)
x = torch.randn(4096, 32, generator=g)
y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()  # four classes
dataset = torch.utils.data.TensorDataset(x, y)

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
world = hpcsgd.init()  # added (2)
strategy = hpcsgd.LocalSGD(model, opt, world, tau=8)  # added (3)
loader = torch.utils.data.DataLoader(dataset, batch_sampler=hpcsgd.RedundantSampler(dataset, world, batch_size=30))  # changed

for epoch in range(3):
    for xb, yb in loader:
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        strategy.step()  # changed: was opt.step()
    spread = strategy.consensus_distance()  # a collective: every rank calls it
    if world.rank == 0:
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, replicas' spread {spread:.2e}, {strategy.counters.rounds} rounds")
