"""A model's parameters and floating buffers as views into one contiguous buffer.

Every collective then runs on one buffer (no per-parameter calls), and strategies see the
model as the vector ``x`` of ALGORITHMS.md: parameters first, floating buffers (BatchNorm
running statistics) after them, in module order. Gradients live in a second flat buffer whose
slices are the parameters' ``.grad`` (autograd accumulates into them in place, as PyTorch
DDP's ``gradient_as_bucket_view`` relies on).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


class FlatParams:
    """Re-homes a model's tensors into ``self.flat`` (length d) and ``self.grad`` (n_params).

    Attributes:
        flat: parameters then floating buffers, the vector strategies average and exchange.
        params: the view ``flat[:n_params]``.
        grad: flat gradient buffer; ``p.grad`` of every parameter is a view into it.
    """

    def __init__(self, model: nn.Module):
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
        self.grad = torch.zeros(self.n_params, dtype=self.dtype, device=self.device)
        self.params = self.flat[: self.n_params]
        self.buffers = self.flat[self.n_params :]

        offset = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                view = self.flat[offset : offset + n].view_as(p)
                view.copy_(p)
                p.data = view
                p.grad = self.grad[offset : offset + n].view_as(p)
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
        """Zero the gradient buffer in place (never set grads to None: they are views)."""
        self.grad.zero_()

    def check_views(self) -> None:
        """Raise if something replaced a parameter's tensor or gradient behind our back."""
        lo, hi = self.grad.data_ptr(), self.grad.data_ptr() + self.grad.numel() * self.grad.element_size()
        for p in self.parameters:
            if p.grad is None or not (lo <= p.grad.data_ptr() < hi):
                raise RuntimeError(
                    "a parameter's .grad no longer views the flat gradient buffer; "
                    "call FlatParams.zero_grad(), not optimizer.zero_grad()"
                )


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
