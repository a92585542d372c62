"""SGD whose step can also scale the model, so a following Allreduce is the whole average.

Model averaging is ``x <- (1/L) * sum_j x_j``. Done after the Allreduce, the ``1/L`` is one
more pass over the model; done by the optimizer step of a round, it rides on the pass that
updates the parameters anyway: ``p <- s*p - s*lr*d`` is one fused kernel (``addr_``, which
computes ``beta*self + alpha*vec1*vec2`` element by element), as cheap as ``p.add_(d)``.
"""

from __future__ import annotations

import torch


class ScalingSGD(torch.optim.SGD):
    """``torch.optim.SGD`` plus ``step(scale=s)``: the usual update, then ``x <- s * x`` in the same pass.

    With ``scale == 1`` the step is exactly ``torch.optim.SGD.step``. Parameters without a
    gradient are scaled too, so after any ``step(scale=s)`` every parameter holds ``s`` times
    what the plain step would leave (up to rounding).
    """

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            if group.get("dampening", 0) or group.get("maximize") or group.get("differentiable"):
                raise ValueError("ScalingSGD supports momentum, nesterov and weight decay only")

    def step(self, closure=None, *, scale: float = 1.0):
        if scale == 1.0:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scaled_sgd_step(self, scale)
        return loss


def can_scale(optimizer: torch.optim.Optimizer) -> bool:
    """Whether :func:`scaled_sgd_step` reproduces ``optimizer.step()`` (a plain torch SGD).

    Any ``torch.optim.SGD`` without dampening, ``maximize``, ``differentiable`` or a fused
    kernel qualifies, so a user's own optimizer gets the cheap averaging round too.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return False
    return not any(
        g.get("dampening", 0) or g.get("maximize") or g.get("differentiable") or g.get("fused")
        for g in optimizer.param_groups
    )


@torch.no_grad()
def scaled_sgd_step(optimizer: torch.optim.SGD, scale: float) -> None:
    """``optimizer``'s SGD step, then ``x <- scale * x``, in one pass over each parameter.

    Parameters without a gradient are scaled too. The arithmetic is torch's single-tensor
    SGD up to the last line, so ``scale == 1`` would give ``optimizer.step()`` exactly.
    """
    for group in optimizer.param_groups:
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                p.mul_(scale)
                continue
            d = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
            if momentum != 0:
                state = optimizer.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.clone(d).detach()
                else:
                    buf.mul_(momentum).add_(d)
                d = d.add(buf, alpha=momentum) if group["nesterov"] else buf
            # p <- scale * p - scale * lr * d, in one pass over p and d.
            p.view(-1, 1).addr_(d.reshape(-1), _one(p), beta=scale, alpha=-lr * scale)


_ONES: dict[tuple, torch.Tensor] = {}


def _one(p: torch.Tensor) -> torch.Tensor:
    key = (p.dtype, p.device)
    if key not in _ONES:
        _ONES[key] = torch.ones(1, dtype=p.dtype, device=p.device)
    return _ONES[key]
