"""Learning-rate schedule, settings that do nothing, and intra-gradient diversity (serial)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpcsgd.config import build_config
from hpcsgd.train.diversity import intra_gradient_diversity
from hpcsgd.train.schedule import Schedule, pointless_settings


def _cfg(**overrides):
    return build_config({"data": "d", "run_dir": "r", **overrides})


def test_warmup_then_cosine_has_no_jump():
    """The cosine starts at lr where the warm-up ends (was 0.0992 -> 0.0854) and ends near 0."""
    cfg = _cfg(lr=0.1, lr_schedule="cosine", warmup_epochs=1.0, epochs=5)
    sched = Schedule(steps_per_epoch=100, total_steps=500, log_every=10, eval_every=0, checkpoint_every=0)
    lrs = [sched.lr_at(cfg, t) for t in range(500)]
    assert lrs[99] == pytest.approx(0.1 * (0.1 + 0.9 * 99 / 100))
    assert lrs[100] == pytest.approx(0.1)
    assert all(abs(b - a) < 0.002 for a, b in zip(lrs, lrs[1:]))  # continuous
    assert all(b <= a for a, b in zip(lrs[100:], lrs[101:]))  # decays after the warm-up
    assert lrs[-1] < 1e-4


def test_cosine_without_warmup_is_unchanged():
    cfg = _cfg(lr=0.2, lr_schedule="cosine")
    sched = Schedule(steps_per_epoch=10, total_steps=40, log_every=1, eval_every=0, checkpoint_every=0)
    import math

    assert [sched.lr_at(cfg, t) for t in range(40)] == [0.2 * 0.5 * (1 + math.cos(math.pi * t / 40)) for t in range(40)]


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        ({"algorithm": "sync", "drop_rate": 0.3}, "drop rates apply to rps and lossy-allreduce only"),
        ({"algorithm": "local", "link_drop": ["to:1=0.5"]}, "drop rates apply"),
        ({"algorithm": "sync", "overlap_rounds": True}, "overlap_rounds applies to local and rps only"),
        ({"algorithm": "sync", "tau": 4}, "tau=4 is ignored"),
        ({"algorithm": "local", "tau": 500}, "tau=500 exceeds the run's 100 steps"),
        ({"algorithm": "rps", "fail": ["2@100"]}, "fail 2@100 is at or after the run's last step (99)"),
        ({"algorithm": "lossy-allreduce", "average_optimizer_state": True}, "average_optimizer_state does nothing"),
        ({"algorithm": "local", "average_optimizer_state": True}, "average_optimizer_state does nothing with momentum 0"),
        ({"algorithm": "sync", "lr_milestones": [5]}, "lr_milestones apply to lr_schedule 'step' only"),
        ({"algorithm": "rps", "link_drop": ["2->2=0.5"]}, "link_drop rule '2->2=0.5' names the link from rank 2 to itself"),
        ({"algorithm": "sync", "link_latency": [" 1->01 = 3"]}, "link_latency rule ' 1->01 = 3' names the link from rank 1"),
    ],
)
def test_pointless_settings_are_named(overrides, fragment):
    messages = pointless_settings(_cfg(**overrides), total_steps=100)
    assert len(messages) == 1 and fragment in messages[0]


def test_useful_settings_give_no_warning():
    for overrides in ({"algorithm": "rps", "drop_rate": 0.1, "tau": 2, "fail": ["1@50"]}, {"algorithm": "sync"},
                      {"algorithm": "local", "average_optimizer_state": True, "momentum": 0.9},
                      {"algorithm": "rps", "lr_schedule": "step", "lr_milestones": [5], "link_drop": ["2->3=0.5"]}):
        assert pointless_settings(_cfg(**overrides), total_steps=100) == []


def test_a_run_longer_than_a_64_bit_step_count_is_refused():
    from hpcsgd.config import validate_for_world
    from hpcsgd.errors import ConfigError

    cfg = _cfg(epochs=9e18, batch_size=1)  # fits as epochs, not as steps: 2 steps per epoch
    validate_for_world(cfg, 2, (1, 1))
    with pytest.raises(ConfigError, match=r"epochs 9e\+18 at 2 steps per epoch is more than 2\*\*63-1 steps"):
        validate_for_world(cfg, 2, (2, 2))


def test_intra_diversity_equals_a_loop_over_samples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x, y = torch.randn(70, 5), torch.randint(0, 3, (70,))  # more than one vmap chunk
    grads = []
    for k in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model(x[k : k + 1]), y[k : k + 1]).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double())
    g = torch.stack(grads)
    expected = len(y) * float((g * g).sum()) / float(g.sum(0).dot(g.sum(0)))
    assert intra_gradient_diversity(model, x, y) == pytest.approx(expected, rel=1e-5)
    assert model.training  # the eval-mode switch is undone


def test_intra_diversity_bounds():
    """1 when every sample pulls the same way; B when the pulls are orthogonal."""
    model = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    same = intra_gradient_diversity(model, torch.ones(6, 4), torch.zeros(6, dtype=torch.long))
    assert same == pytest.approx(1.0)
    orthogonal = intra_gradient_diversity(model, torch.eye(4), torch.arange(4))
    assert orthogonal > 1.0
