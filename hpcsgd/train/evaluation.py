"""Evaluation of this rank's own model and of the live ranks' averaged model.

Sums (loss, hits, counts, per class) are what ranks combine, so the averaged model's figures
need one Allreduce whichever rank evaluated which share.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data import load_chunk

EVAL_BATCH = 1024


class Evaluator:
    """Evaluates ``strategy.model`` (its values live in ``strategy.flat``) on held-out data.

    ``chunks`` are the training chunks already on the device; others are read from the
    shards when the full training set is evaluated. ``membership`` splits the work.
    """

    def __init__(self, strategy, index, chunks: dict, membership, device):
        self.strategy, self.index, self.chunks = strategy, index, chunks
        self.membership, self.device = membership, device
        self.num_classes = index.num_classes

    @torch.no_grad()
    def sums(self, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        """[loss sum, correct, count, correct per class..., count per class...] of the model."""
        k, model = self.num_classes, self.strategy.model
        sums = np.zeros(3 + 2 * k)
        model.eval()
        for start in range(0, len(y), EVAL_BATCH):
            xb, yb = x[start : start + EVAL_BATCH], y[start : start + EVAL_BATCH]
            out = model(xb)
            sums[0] += float(F.cross_entropy(out, yb, reduction="sum"))
            hit = out.argmax(1) == yb
            sums[1] += float(hit.sum())
            sums[2] += len(yb)
            sums[3 : 3 + k] += torch.bincount(yb[hit], minlength=k).cpu().numpy()
            sums[3 + k :] += torch.bincount(yb, minlength=k).cpu().numpy()
        return sums

    def as_metrics(self, sums: np.ndarray) -> dict:
        """Loss, accuracy and per-class accuracy from :meth:`sums`."""
        k = self.num_classes
        count = max(sums[2], 1)
        per_class = np.divide(sums[3 : 3 + k], sums[3 + k :], out=np.full(k, np.nan), where=sums[3 + k :] > 0)
        return {
            "loss": float(sums[0] / count),
            "accuracy": float(sums[1] / count),
            "per_class_accuracy": [None if np.isnan(v) else round(float(v), 6) for v in per_class],
        }

    def own(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """This rank's own model on (x, y), locally."""
        return self.as_metrics(self.sums(x, y))

    def averaged(self, mean: torch.Tensor, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> dict:
        """The averaged model on (x, y), or on the full training set when x is None.

        The work is split over the live ranks (every n-th sample, or every n-th chunk) and the
        sums combined by one Allreduce.
        """
        self.strategy.wait_snapshot()  # an overlapped round must copy this rank's model before we overwrite it
        flat = self.strategy.flat.flat
        own = flat.clone()
        flat.copy_(mean)
        try:
            share, n = self.membership.share()
            if x is None:
                sums = np.zeros(3 + 2 * self.num_classes)
                for c in range(share, self.index.parts, n):
                    sums += self.sums(*self.chunk_tensors(c))
            else:
                sums = self.sums(x[share::n], y[share::n])
        finally:
            flat.copy_(own)
        return self.as_metrics(self.strategy.live_sum(sums))

    def chunk_tensors(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        if c in self.chunks:
            return self.chunks[c]
        x, y = load_chunk(self.index, c)  # evaluation only: training never reads it
        return torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)

    def own_on_train(self) -> dict:
        """This rank's own model on the full training set, chunk by chunk."""
        sums = np.zeros(3 + 2 * self.num_classes)
        for c in range(self.index.parts):
            sums += self.sums(*self.chunk_tensors(c))
        return self.as_metrics(sums)


__all__ = ["EVAL_BATCH", "Evaluator"]
