"""``--model pkg.module:factory``: a user's own model for ``hpcsgd train``.

``factory(input_shape, num_classes)`` must return a ``torch.nn.Module`` whose output on a
batch of ``input_shape`` samples is ``(batch, num_classes)``. Each way this can fail is a
:class:`~hpcsgd.errors.ConfigError` naming the spec (so every rank exits 2 together).
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ..errors import ConfigError


def is_factory_spec(name: str) -> bool:
    """Whether ``--model`` names a factory (``pkg.module:factory``) rather than a built-in model."""
    return ":" in name


def load_factory(spec: str):
    """The callable that ``pkg.module:factory`` names."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a user's module may raise anything while importing
        raise ConfigError(f"model {spec!r}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ConfigError(f"model {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise ConfigError(f"model {spec!r}: {attr!r} is a {type(factory).__name__}, not callable")
    return factory


def build_user_model(spec: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Call the factory and check that its model maps the shards' samples to ``num_classes`` logits.

    The check runs one forward pass of two zero samples in eval mode without gradients, so
    it changes no BatchNorm statistic and draws no random number.
    """
    factory = load_factory(spec)
    try:
        model = factory(tuple(input_shape), int(num_classes))
    except Exception as exc:
        call = f"factory({tuple(input_shape)}, {num_classes})"
        raise ConfigError(f"model {spec!r}: {call} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {spec!r}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros((2, *input_shape), dtype=dtype))
    except Exception as exc:
        raise ConfigError(
            f"model {spec!r} does not fit the shards: a batch of shape {(2, *input_shape)} raised "
            f"{type(exc).__name__}: {exc}"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"model {spec!r} does not fit the shards: it maps a batch of 2 samples of shape {tuple(input_shape)} "
            f"to {shape}, expected (2, {num_classes}) for {num_classes} classes"
        )
    return model


__all__ = ["build_user_model", "is_factory_spec", "load_factory"]
