"""This rank's training batches: the sampler over its held chunks, draws and loss weights.

Draws per chunk and per-sample loss weights follow the live ranks (``sample_plan``): after a
failure the survivors may re-weight. They are derived, not stored: only the sampler's
position goes into checkpoints.
"""

from __future__ import annotations

from fractions import Fraction

import torch
import torch.nn.functional as F

from .data import StratifiedSampler, chunks_for_rank, draws_per_step, sample_plan


class Batches:
    """Batches of (x, y) on the device, drawn as ALGORITHMS.md says, with their loss weights.

    Attributes:
        sampler: the :class:`~hpcsgd.data.StratifiedSampler` over the held chunks.
        sample_weights: ``{chunk: weight of one of its samples}`` in the current plan.
        weight_vector: one loss weight per sample of a batch, or None when the plain batch
            mean is exactly right (every sample weighs ``1/B``).
    """

    def __init__(self, cfg, chunk_sizes: list[int], membership, chunks: dict, dtype: torch.dtype, device):
        self.cfg, self.chunk_sizes, self.chunks = cfg, list(chunk_sizes), chunks
        self.dtype, self.device = dtype, device
        rank, adopted = membership.rank, membership.adopted
        sizes = {c: chunk_sizes[c] for c in chunks_for_rank(membership.P, cfg.q, rank)}
        draws = draws_per_step(cfg.batch_size, chunk_sizes, cfg.chunk_weighting)
        self.sampler = StratifiedSampler(sizes, {c: draws[c] for c in sizes}, cfg.seed, rank)
        for c in (c for c, r in adopted.items() if r == rank):
            self.sampler.adopt(c, chunk_sizes[c], draws[c])
        self.fresh = list(adopted)  # adopted since any checkpoint: may be absent from its sampler state
        self.replan(membership)

    def replan(self, membership) -> None:
        """Draws per held chunk and per-sample loss weights for the live ranks (see sample_plan).

        When every sample of the batch weighs ``1/B`` the loss is torch's plain batch mean,
        so equal chunks give exactly the trajectory of an unweighted loss.
        """
        cfg = self.cfg
        plan = sample_plan(
            cfg.q, cfg.batch_size, self.chunk_sizes, membership.live, membership.adopted,
            weighting=cfg.chunk_weighting, reweight=cfg.reweight,
        )[membership.rank]
        self.sampler.set_batch_per_chunk({c: n for c, (n, _) in plan.items()})
        self.sample_weights = {c: a for c, (_, a) in plan.items()}
        batch = self.sampler.batch_size
        if all(a == Fraction(1, batch) for a in self.sample_weights.values()):
            self.weight_vector = None
        else:  # one weight per sample, in the sampler's batch order
            self.weight_vector = torch.cat([
                torch.full((n,), float(self.sample_weights[c]), dtype=self.dtype)
                for c, (n, _) in ((c, plan[c]) for c in self.sampler.chunks)
            ]).to(self.device)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next step's batch, gathered on the device."""
        return gather_on_device(self.sampler.next_batch(), self.chunks)

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The loss to differentiate and, for the metrics, the plain batch mean.

        With per-sample weights (unequal chunks, re-weighting) the loss is their weighted sum.
        """
        out = model(x)
        if self.weight_vector is None:
            loss = F.cross_entropy(out, y)
            return loss, float(loss.detach())
        losses = F.cross_entropy(out, y, reduction="none")
        return torch.dot(losses, self.weight_vector), float(losses.detach().mean())

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state, fresh=self.fresh)


def gather_on_device(batch, chunks: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples a sampler batch names, from chunks already on the device.

    Indexing happens on the device: only the indices cross PCIe, never the samples.
    """
    xs, ys = [], []
    for c, idx in batch:
        x_c, y_c = chunks[c]
        index = torch.from_numpy(idx).to(x_c.device)
        xs.append(x_c.index_select(0, index))
        ys.append(y_c.index_select(0, index))
    return torch.cat(xs), torch.cat(ys)


__all__ = ["Batches", "gather_on_device"]
