"""This rank's training batches: the public RedundantSampler over the shards, on the device.

Draws per chunk and per-sample loss weights follow the live ranks (``sample_plan``): after a
failure the survivors may re-weight. They are derived, not stored: only the sampler's
position goes into checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .pace import Pace
from ..redundant import RedundantSampler
from .schedule import Schedule


class Batches:
    """Batches of (x, y) on the device, drawn as ALGORITHMS.md says, with their loss weights.

    Attributes:
        sampler: the :class:`~hpcsgd.RedundantSampler` over the shards' chunks, the same
            object a user's loop draws from (here through ``next_chunk_batch``).
        weight_vector: one loss weight per sample of a batch, in the model's dtype, or None
            when the plain batch mean is exactly right (every sample weighs ``1/B``).
        pace: the :class:`~hpcsgd.train.pace.Pace` that emulates ``slowdown`` and, under
            ``balance = "speed"``, sets per-rank batch sizes (checkpointed with the sampler).
    """

    def __init__(self, cfg, chunk_sizes: list[int], world, membership, chunks: dict, dtype: torch.dtype, device):
        self.cfg, self.chunks, self.dtype, self.device = cfg, chunks, dtype, device
        self.sampler = RedundantSampler.over_chunks(chunk_sizes, world, q=cfg.q, batch_size=cfg.batch_size,
                                                    seed=cfg.seed, chunk_weighting=cfg.chunk_weighting,
                                                    adopted=membership.adopted, placement=membership.placement,
                                                    redundancy=cfg.redundancy_per_rank or cfg.redundancy,
                                                    redundancy_spread=cfg.redundancy_spread)
        self.replan(membership)
        schedule = Schedule.from_config(cfg, sum(chunk_sizes), membership.P)  # the trainer's
        self.pace = Pace(cfg, self, membership.rank, membership.P, schedule, min(chunk_sizes))

    def replan(self, membership) -> None:
        """Draws per held chunk and per-sample loss weights for the live ranks (see sample_plan).

        When every sample of the batch weighs ``1/B`` the loss is torch's plain batch mean,
        so equal chunks give exactly the trajectory of an unweighted loss. The weights are
        built from the exact fractions in the model's dtype (not cast from float32).
        """
        self.sampler.set_live(membership.live, reweight=self.cfg.reweight)
        self._weight_vector()

    def set_batch_sizes(self, sizes, now: bool = False) -> None:
        """Per-rank batch sizes from the next epoch on, or from the next batch with ``now``
        (RedundantSampler.set_batch_sizes)."""
        self.sampler.set_batch_sizes(sizes, now=now)
        self._weight_vector()

    def _weight_vector(self) -> None:
        sampler = self.sampler
        if sampler.loss_weights is None:
            self.weight_vector = None
        else:  # one weight per sample, in the sampler's batch order
            n, a = sampler.batch_per_chunk, sampler.sample_weights
            self.weight_vector = torch.cat([
                torch.full((n[c],), float(a[c]), dtype=self.dtype) for c in sampler.held_chunks
            ]).to(self.device)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next step's batch, gathered on the device."""
        batch = self.sampler.next_chunk_batch()
        if self.sampler.loss_weights is None:  # per-rank batch sizes took effect: the batch mean
            self.weight_vector = None
        return gather_on_device(batch, self.chunks)

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
        state, balance = self.sampler.state_dict(), self.pace.state_dict()
        return state if balance is None else {**state, "balance": balance}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self.pace.load_state_dict(state.get("balance"))


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
