"""A model's parameters and floating buffers as views into one contiguous buffer.

Every collective then runs on one buffer (no per-parameter calls), and strategies see the
model as the vector ``x`` of ALGORITHMS.md: parameters first, floating buffers (BatchNorm
running statistics) after them, in module order. Gradients live in a second flat buffer whose
slices are the parameters' ``.grad`` (autograd accumulates into them in place, as PyTorch
DDP's ``gradient_as_bucket_view`` relies on); it has room after the gradients for a copy of
the floating buffers, so gradient-sharing strategies average both in one message
(ALGORITHMS.md: sync averages BatchNorm statistics every step, packed with the gradients).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


class FlatParams:
    """Re-homes a model's tensors into ``self.flat`` (length d) and ``self.grad`` (n_params).

    Args:
        model: the model whose parameters and floating buffers move into the flat buffer.
        flat_grad: keep gradients in one flat buffer too (strategies that communicate
            gradients need it). Without it ``grad`` is None and autograd hands each parameter a
            fresh gradient, which saves the zeroing and accumulating passes over the
            gradient memory that a persistent buffer costs every step (local SGD, RPS).

    Attributes:
        flat: parameters then floating buffers, the vector strategies average and exchange.
        params: the view ``flat[:n_params]``.
        buffers: the view ``flat[n_params:]`` (floating buffers; may be empty).
        packed: ``[gradients | copy of the floating buffers]`` (or None), what sync and
            lossy-allreduce communicate.
        grad: ``packed[:n_params]`` (or None); ``p.grad`` of every parameter is a view into it.
    """

    def __init__(self, model: nn.Module, flat_grad: bool = True):
        params = list(model.parameters())
        buffers = _floating_buffers(model)
        tensors = params + [buf for _, _, buf in buffers]
        if not tensors:
            raise ConfigError("the model has no parameters to train")
        dtypes = {t.dtype for t in tensors}
        devices = {t.device for t in tensors}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ConfigError(
                f"all parameters and floating buffers must share one dtype and device, got "
                f"dtypes {sorted(map(str, dtypes))} on {sorted(map(str, devices))}"
            )
        self.dtype = dtypes.pop()
        self.device = devices.pop()
        self.n_params = sum(p.numel() for p in params)
        self.numel = self.n_params + sum(buf.numel() for _, _, buf in buffers)
        self.flat = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        self.packed = torch.zeros(self.numel, dtype=self.dtype, device=self.device) if flat_grad else None
        self.grad = self.packed[: self.n_params] if flat_grad else None
        self.params = self.flat[: self.n_params]
        self.buffers = self.flat[self.n_params :]

        self._grad_views: list[torch.Tensor] = []  # what each parameter's .grad is while untouched
        offset = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                view = self.flat[offset : offset + n].view_as(p)
                view.copy_(p)
                p.data = view
                if self.grad is not None:
                    p.grad = self.grad[offset : offset + n].view_as(p)
                    self._grad_views.append(p.grad)
                offset += n
            for module, name, buf in buffers:
                n = buf.numel()
                view = self.flat[offset : offset + n].view_as(buf)
                view.copy_(buf)
                module._buffers[name] = view  # replace the tensor; the module keeps using it
                offset += n
        self.parameters = params
        self.param_offsets = [0]  # parameter k is flat[param_offsets[k]:param_offsets[k+1]]
        for p in params:
            self.param_offsets.append(self.param_offsets[-1] + p.numel())

    def zero_grad(self) -> None:
        """Zero the flat gradient in place (its views must stay), or drop per-parameter grads."""
        if self.grad is not None:
            self.grad.zero_()
        else:
            for p in self.parameters:
                p.grad = None

    def adopt_grad(self, index: int) -> None:
        """Make parameter ``index``'s ``.grad`` the view into the flat gradient again.

        A user's ``optimizer.zero_grad()`` sets gradients to None, so autograd hands the
        parameter a fresh tensor: its values are copied into the flat buffer (zeros when the
        parameter got no gradient) and the view put back. A no-op when ``.grad`` is the view.
        """
        p = self.parameters[index]
        view = self._grad_views[index]
        grad = p.grad
        if grad is view:  # the common case, checked first: this runs in a hook per parameter per step
            return
        if grad is not None and grad.data_ptr() == view.data_ptr() and grad.stride() == view.stride() and grad.shape == view.shape:
            self._grad_views[index] = grad  # the same memory under a new tensor object
            return
        if grad is None:
            view.zero_()
        else:
            view.copy_(grad)
        p.grad = view

    def adopt_grads(self, lo: int = 0, hi: int | None = None) -> None:
        """:meth:`adopt_grad` for every parameter whose values lie in ``flat[lo:hi]``."""
        hi = self.n_params if hi is None else hi
        for index in range(len(self.parameters)):
            if lo <= self.param_offsets[index] and self.param_offsets[index + 1] <= hi:
                self.adopt_grad(index)

    @property
    def n_buffers(self) -> int:
        """Number of floating buffer values (BatchNorm statistics), 0 for most MLPs."""
        return self.numel - self.n_params

    def pack_buffers(self, contribute: bool = True) -> None:
        """Copy the floating buffers behind the gradients in ``packed`` (zeros: no contribution)."""
        if self.n_buffers:
            tail = self.packed[self.n_params :]
            tail.copy_(self.buffers) if contribute else tail.zero_()

    def unpack_buffers(self) -> None:
        """Take the (averaged) floating buffers back from ``packed``."""
        if self.n_buffers:
            self.buffers.copy_(self.packed[self.n_params :])

    def gradient(self) -> torch.Tensor:
        """The current gradient as one vector (a copy when there is no flat gradient buffer)."""
        if self.grad is not None:
            return self.grad
        return torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.parameters
        ])


def _floating_buffers(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(module, name, tensor) of every floating-point buffer, each tensor once."""
    seen: set[int] = set()
    found = []
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is None or not buf.is_floating_point() or id(buf) in seen:
                continue
            seen.add(id(buf))
            found.append((module, name, buf))
    return found
