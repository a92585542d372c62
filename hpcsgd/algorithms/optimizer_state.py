"""Any torch optimizer's per-parameter state, laid out like the model so a round can average it.

ALGORITHMS.md ("Local SGD and RI-SGD"): with ``average_optimizer_state`` every per-parameter
state tensor (SGD ``momentum_buffer``, Adam ``exp_avg`` and ``exp_avg_sq``, ...) is averaged
with the model in the same round; scalar state (Adam's ``step``) must agree across ranks and
is checked, not averaged. Each state name is one segment of the model's length ``d``, in the
model's coordinates (element ``k`` of a segment belongs to the parameter element ``k`` of
``x``), so local SGD packs the segments behind the model into one Allreduce and RPS exchanges
them through the model's own blocks and masks.

Torch creates state lazily, at a parameter's first step, so the layout is found at
construction by a trial step of a copy of the optimizer on zero gradients over stand-in
parameters; what that reveals and cannot be averaged so is refused then, by name.
"""

from __future__ import annotations

import copy
import numbers

import numpy as np
import torch
from mpi4py import MPI

from ..comm import Collectives, FlatParams
from ..comm.watchdog import WATCHDOG
from ..errors import ConfigError, TrainingError


def _refuse(optimizer: torch.optim.Optimizer, why: str) -> ConfigError:
    return ConfigError(f"average_optimizer_state cannot average the state of {type(optimizer).__name__}: {why}")


def _trial_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> dict:
    """The state a copy of ``optimizer`` creates in one step on zero gradients, keyed by parameter index."""
    stand_ins = [torch.zeros_like(p, requires_grad=True) for p in params]
    memo = {id(p): s for p, s in zip(params, stand_ins)}
    try:
        trial = copy.deepcopy(optimizer, memo)
        for s in stand_ins:
            s.grad = torch.zeros_like(s)
        trial.step()
    except Exception as exc:  # any optimizer a user brings: what failed goes into the message
        raise _refuse(optimizer, f"a trial step on zero gradients failed ({type(exc).__name__}: {exc})") from None
    index = {id(s): k for k, s in enumerate(stand_ins)}
    unknown = [key for key in trial.state if id(key) not in index]
    if unknown:
        raise _refuse(optimizer, "its state is not kept per parameter")
    return {index[id(key)]: dict(value) for key, value in trial.state.items()}


def _is_scalar(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0
    return isinstance(value, numbers.Number)


class OptimizerState:
    """Which state of ``optimizer`` is averaged (``names``) and which is checked (``scalars``).

    Args:
        optimizer: any ``torch.optim.Optimizer`` over (some of) the model's parameters.
        flat: the model's :class:`~hpcsgd.comm.FlatParams` (gives each parameter's offset).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, flat: FlatParams):
        self.optimizer, self.flat = optimizer, flat
        offset_of = {id(p): (lo, hi) for p, lo, hi in zip(flat.parameters, flat.param_offsets, flat.param_offsets[1:])}
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        missing = [k for k, p in enumerate(self.params) if id(p) not in offset_of]
        if missing:
            raise _refuse(optimizer, f"it holds {len(missing)} tensor(s) that are not the model's parameters")
        self.spans = [offset_of[id(p)] for p in self.params]
        # SGD's momentum buffer is the one state hpcsgd fills in where it is missing: torch treats
        # a zero buffer exactly like a fresh one, so every rank packs the same values.
        self.zero_fill = isinstance(optimizer, torch.optim.SGD)
        if self.zero_fill:
            self.names = ["momentum_buffer"] if any(g.get("momentum", 0) for g in optimizer.param_groups) else []
            self.scalars: list[str] = []
            self.momentum_params = {k for k, p in enumerate(self.params) if self._group_of(p).get("momentum", 0)}
        else:
            self.names, self.scalars = self._layout(_trial_state(optimizer, self.params))
        self.segments = torch.zeros(len(self.names), flat.numel, dtype=flat.dtype, device=flat.device)

    def _group_of(self, p: torch.Tensor) -> dict:
        return next(g for g in self.optimizer.param_groups if any(q is p for q in g["params"]))

    def _layout(self, trial: dict) -> tuple[list[str], list[str]]:
        names, scalars = set(), set()
        for k, state in trial.items():
            p = self.params[k]
            for name, value in state.items():
                if _is_scalar(value):
                    scalars.add(name)
                elif isinstance(value, torch.Tensor) and value.shape == p.shape and value.is_floating_point():
                    names.add(name)
                elif value is not None:
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise _refuse(self.optimizer, f"its state {name!r} ({shape}) is not shaped like its "
                                                  f"parameter {tuple(p.shape)}")
        return sorted(names), sorted(scalars)

    @property
    def empty(self) -> bool:
        """Nothing to average or check (SGD without momentum, a stateless optimizer)."""
        return not self.names and not self.scalars

    def gather(self) -> torch.Tensor:
        """The state tensors as ``(len(names), d)`` segments in model coordinates (zeros elsewhere)."""
        self.segments.zero_()
        for k, (p, (lo, hi)) in enumerate(zip(self.params, self.spans)):
            state = self.optimizer.state[p]
            if self.zero_fill and k in self.momentum_params and state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p)
            for row, name in enumerate(self.names):
                value = state.get(name)
                if isinstance(value, torch.Tensor):
                    self.segments[row, lo:hi].copy_(value.reshape(-1))
        return self.segments

    def scatter(self, segments: torch.Tensor) -> None:
        """Write averaged ``segments`` back into the state tensors this rank has."""
        for p, (lo, hi) in zip(self.params, self.spans):
            state = self.optimizer.state[p]
            for row, name in enumerate(self.names):
                value = state.get(name)
                if isinstance(value, torch.Tensor):
                    value.copy_(segments[row, lo:hi].view_as(value))

    def check_scalars(self, coll: Collectives) -> None:
        """Raise the same TrainingError on every rank unless each parameter's scalar state agrees.

        Whether a parameter has state at all is one of the values checked: an optimizer that
        stepped on some ranks only (a skipped non-finite step) cannot be averaged with the others.
        """
        if self.zero_fill or not self.names and not self.scalars:
            return
        values = []
        for p in self.params:
            state = self.optimizer.state.get(p, {})
            values.append(float(bool(state)))
            values.extend(float(state[name]) if name in state else 0.0 for name in self.scalars)
        mine = np.array(values + [-v for v in values], dtype=np.float64)
        top = np.empty_like(mine)
        with WATCHDOG.guard("Allreduce [optimizer scalar state check]", coll.comm):
            coll.comm.Allreduce(mine, top, op=MPI.MAX)
        n = len(values)
        differs = np.flatnonzero(top[:n] != -top[n:])
        if differs.size:
            width = 1 + len(self.scalars)
            k, column = divmod(int(differs[0]), width)
            what = "whether it has state" if column == 0 else f"its {self.scalars[column - 1]!r}"
            raise TrainingError(
                f"average_optimizer_state: {type(self.optimizer).__name__}'s state differs across ranks "
                f"(parameter {k}: {what}, from {-top[n + int(differs[0])]:g} to {top[int(differs[0])]:g}); "
                f"every rank must take the same optimizer steps"
            )


__all__ = ["OptimizerState"]
