"""ScalingSGD: torch's SGD, plus a step that also scales the model in the same pass."""

from __future__ import annotations

import copy

import pytest
import torch

from hpcsgd.optim import ScalingSGD


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))


def _grads(model, seed):
    torch.manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn_like(p)


@pytest.mark.parametrize("momentum,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 1e-3), (0.5, False, 5e-4)])
def test_scaled_step_is_the_plain_step_times_scale(momentum, nesterov, wd):
    plain, scaled = _model(), _model()
    opts = [ScalingSGD(m.parameters(), lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd) for m in (plain, scaled)]
    reference = copy.deepcopy(plain)
    torch_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    for step in range(4):
        for m in (plain, scaled, reference):
            _grads(m, step)
        opts[0].step()  # scale 1: exactly torch's SGD
        torch_opt.step()
        opts[1].step(scale=0.25)
        for p, q, r in zip(plain.parameters(), scaled.parameters(), reference.parameters()):
            assert torch.equal(p, r)
            torch.testing.assert_close(q, 0.25 * p, rtol=1e-6, atol=1e-7)
            q.data.copy_(p)  # next step starts from the same point
        # Momentum buffers follow the plain step's exactly: scaling touches only the model.
        for p, q in zip(plain.parameters(), scaled.parameters()):
            if momentum:
                assert torch.equal(opts[0].state[p]["momentum_buffer"], opts[1].state[q]["momentum_buffer"])


def test_parameters_without_gradient_are_scaled_too():
    model = _model()
    opt = ScalingSGD(model.parameters(), lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(scale=0.5)  # no gradients at all
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, 0.5 * b)


def test_unsupported_options_are_refused():
    with pytest.raises(ValueError, match="supports momentum"):
        ScalingSGD(_model().parameters(), lr=0.1, momentum=0.9, dampening=0.1)


def test_no_torch_dynamo_import():
    """torch.optim's wrappers import torch._dynamo (and sympy: seconds per rank) on first use."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from hpcsgd.optim import ScalingSGD\n"
        "m = torch.nn.Linear(3, 2)\n"
        "opt = ScalingSGD(m.parameters(), lr=0.1, momentum=0.9)\n"
        "m(torch.randn(4, 3)).sum().backward()\n"
        "opt.step(); opt.step(scale=0.5); opt.zero_grad(); opt.load_state_dict(opt.state_dict())\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
