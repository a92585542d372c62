"""SGD whose step can also scale the model, so a following Allreduce is the whole average.

Model averaging is ``x <- (1/L) * sum_j x_j``. Done after the Allreduce, the ``1/L`` is one
more pass over the model; done by the optimizer step of a round, it rides on the pass that
updates the parameters anyway: ``p <- s*p - s*lr*d`` is one fused kernel (``addr_``, which
computes ``beta*self + alpha*vec1*vec2`` element by element), as cheap as ``p.add_(d)``.

Start-up: torch.optim wraps ``SGD.step``, ``zero_grad``, ``state_dict`` and
``add_param_group`` (called by the constructor) so that the first call imports
``torch._dynamo``, which pulls in sympy: seconds per rank, more than torch itself (README,
"Threads and start-up"), for a compiler hpcsgd never uses. ScalingSGD calls those methods unwrapped and, when every
parameter is on the CPU, runs the plain step itself with the arithmetic of torch's
single-tensor SGD, the loop torch runs for CPU tensors: bit for bit the same result, and no
``torch._dynamo``. On GPUs the plain step stays torch's (its multi-tensor kernels).
"""

from __future__ import annotations

import torch


def _unwrapped(method):
    """The function under torch's lazy ``_disable_dynamo`` wrapper (itself if not wrapped)."""
    return getattr(method, "__wrapped__", method)


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

    add_param_group = _unwrapped(torch.optim.Optimizer.add_param_group)
    zero_grad = _unwrapped(torch.optim.Optimizer.zero_grad)
    state_dict = _unwrapped(torch.optim.Optimizer.state_dict)
    load_state_dict = _unwrapped(torch.optim.Optimizer.load_state_dict)

    @torch.no_grad()
    def step(self, closure=None, *, scale: float = 1.0):
        if scale == 1.0 and not self._all_on_cpu():
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if scale == 1.0:
            self._plain_step()
            return loss
        scaled_sgd_step(self, scale)
        return loss

    def _all_on_cpu(self) -> bool:
        return all(p.device.type == "cpu" for group in self.param_groups for p in group["params"])

    def _plain_step(self) -> None:
        """torch's ``_single_tensor_sgd`` (dampening 0, not maximize), step by step the same."""
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.detach().clone()
                    else:
                        buf.mul_(momentum).add_(d, alpha=1)
                    d = d.add(buf, alpha=momentum) if group["nesterov"] else buf
                p.add_(d, alpha=-lr)


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
