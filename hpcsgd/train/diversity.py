"""Intra-worker gradient diversity: how differently the samples of one batch pull the model.

ALGORITHMS.md, "Gradient diversity": over the per-sample gradients ``h_k`` of one rank's batch
of ``B`` samples, ``B * sum_k ||h_k||^2 / ||sum_k h_k||^2``: 1 when every sample pulls the
same way, up to ``B`` when they are orthogonal. The RI-SGD paper's claim is that redundancy
raises it on skewed data (a batch mixes q chunks). Per-sample gradients come from
``torch.func`` (vmap of grad), a diagnostic computed at log steps only.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

# Samples per vmap call: bounds the (samples x parameters) gradient matrix held at once.
_CHUNK = 64


def intra_gradient_diversity(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """``B sum_k ||h_k||^2 / ||sum_k h_k||^2`` over the per-sample loss gradients of (x, y).

    The model is evaluated in eval mode: a single sample has no batch statistics, so
    BatchNorm uses its running statistics (models without BatchNorm or dropout are unaffected).
    Returns NaN when the summed gradient is zero.
    """
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def sample_loss(p, b, xi, yi):
        out = functional_call(model, (p, b), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, None, 0, 0))
    was_training = model.training
    model.eval()
    squares = torch.zeros((), dtype=torch.float64)
    total = None
    try:
        for start in range(0, len(y), _CHUNK):
            grads = per_sample(params, buffers, x[start : start + _CHUNK], y[start : start + _CHUNK])
            flat = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1).double()
            squares += (flat * flat).sum()
            part = flat.sum(0)
            total = part if total is None else total + part
    finally:
        model.train(was_training)
    denominator = float(torch.dot(total, total))
    return len(y) * float(squares) / denominator if denominator > 0 else float("nan")


def gradient_diversity(strategy, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Inter-worker and intra-worker gradient diversity (ALGORITHMS.md, "Gradient diversity").

    Inter: ``sum_i ||g_i||^2 / ||sum_i g_i||^2`` over the strategy's live ranks, one Allreduce
    (collective; before the gradients are averaged). Intra: :func:`intra_gradient_diversity`.
    """
    total, squares = strategy.sum_with_squared_norms(strategy.flat.gradient())
    denominator = float(np.dot(total, total))
    inter = squares / denominator if denominator > 0 else float("nan")
    return inter, intra_gradient_diversity(strategy.model, x, y)
