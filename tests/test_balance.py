"""Speed balancing's pure parts (hpcsgd/data/balance.py): the split rule, the window and the
decision's bookkeeping, the config keys; serial (the collective decision runs in
tests/test_balance_mpi.py)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from hpcsgd.config import build_config
from hpcsgd.data.balance import MIN_CHANGE, SpeedBalance, split_by_speed
from hpcsgd.errors import ConfigError


def test_split_follows_speed_with_the_total_fixed():
    assert split_by_speed([1.0, 0.5, 1.0, 1.0], 64) == [19, 9, 18, 18]  # 64 * (2, 1, 2, 2) / 7 = 18.29, 9.14
    assert split_by_speed([1.0, 1.0, 1.0], 10) == [4, 3, 3]  # ties: the lower rank gets the remainder
    assert split_by_speed([2.0, 1.0], 9) == [6, 3]  # exact shares stay exact
    assert split_by_speed([5.0], 7) == [7]


def test_split_clamps_at_the_bounds_and_shares_the_rest():
    # A rank 1000x slower would get 0: it keeps the minimum, the others share the rest.
    assert split_by_speed([1.0, 0.001, 1.0], 30, minimum=2) == [14, 2, 14]
    # A rank far faster than the others is held to the largest size (the smallest chunk).
    assert split_by_speed([100.0, 1.0, 1.0, 1.0], 40, maximum=16) == [16, 8, 8, 8]


@pytest.mark.parametrize("seed", range(200))
def test_split_properties_on_random_speeds(seed):
    """Sum exact, bounds kept, and each size within one of its exact proportional share
    wherever no bound is active; faster never gets less than slower."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 9))
    speeds = rng.uniform(0.05, 5.0, n).tolist()
    lo, hi = int(rng.integers(1, 4)), None if seed % 2 else int(rng.integers(8, 40))
    total = int(rng.integers(n * lo, n * (hi or 40) + 1))
    sizes = split_by_speed(speeds, total, lo, hi)
    assert sum(sizes) == total
    assert all(lo <= b <= (hi or total) for b in sizes)
    for i in range(n):
        for j in range(n):
            if speeds[i] > speeds[j]:
                assert sizes[i] >= sizes[j]
    if all(lo < b < (hi or total + 1) for b in sizes):
        exact = [Fraction(total) * Fraction(s) / sum(map(Fraction, speeds)) for s in speeds]
        assert all(abs(b - e) < 1 for b, e in zip(sizes, exact))


@pytest.mark.parametrize("speeds,total,kw", [([], 4, {}), ([1.0, 0.0], 4, {}), ([1.0, float("nan")], 4, {}),
                                              ([1.0, -1.0], 4, {}), ([1.0, 1.0], 1, {}),
                                              ([1.0, 1.0], 40, {"maximum": 8})])
def test_split_refuses_what_it_cannot_do(speeds, total, kw):
    with pytest.raises(ConfigError):
        split_by_speed(speeds, total, **kw)


class FakeStrategy:
    """What a decision asks of the strategy (its live ranks and one sum), for P ranks whose figures are given."""

    def __init__(self, rank, figures):
        self.live_rank, self.figures = rank, figures
        self.live_ranks = list(range(len(figures)))

    def live_sum(self, values):
        mine = values.reshape(-1, 2)[self.live_rank]
        assert np.all(np.delete(values.reshape(-1, 2), self.live_rank, axis=0) == 0)  # a one-hot contribution
        out = np.array(self.figures, dtype=np.float64)
        out[self.live_rank] = mine
        return out.reshape(-1)


def test_a_decision_times_all_but_the_first_step_of_the_epoch_and_logs_its_step():
    # A warm-up window of the whole first epoch (4 timed steps of 5): decisions at epoch ends only.
    balance = SpeedBalance([16] * 4, steps_per_epoch=5, total_steps=15, maximum=64, warmup=4)
    for step in range(5):
        balance.record(step, 16, 100.0 if step == 0 else 0.01)  # step 0: start-up, not timed
    assert (balance.samples, balance.seconds) == (64, pytest.approx(0.04))
    assert [s for s in range(15) if balance.due(s)] == [4, 9]  # not after the last step: nothing would use it
    others = [(64, 0.04), (64, 0.08), (64, 0.04), (64, 0.04)]  # rank 1 at half speed
    sizes = balance.decide(FakeStrategy(0, others), step=4)
    assert sizes == split_by_speed([1600, 800, 1600, 1600], 64) == [19, 9, 18, 18]
    assert balance.changes == [{"step": 5, "batch_per_rank": [19, 9, 18, 18]}]
    assert (balance.samples, balance.seconds) == (0, 0.0)  # a fresh window
    # The same speeds again: no change below MIN_CHANGE, nothing logged.
    balance.record(6, 18, 0.01)
    assert balance.decide(FakeStrategy(0, [(18, 0.01), (10, 0.0111), (18, 0.01), (18, 0.01)]), step=9) is None
    assert len(balance.changes) == 1
    state = balance.state_dict()
    again = SpeedBalance([16] * 4, 5, 15, 64, warmup=4)
    again.load_state_dict(state)
    assert again.state_dict() == state
    assert MIN_CHANGE > 0


def test_a_rank_that_timed_nothing_leaves_the_sizes_alone():
    balance = SpeedBalance([8, 8], steps_per_epoch=1, total_steps=4)
    balance.record(0, 8, 1.0)  # the epoch's first (and only) step is not timed
    assert balance.decide(FakeStrategy(0, [(0, 0.0), (8, 1.0)]), step=0) is None
    assert balance.sizes == [8, 8]


def _cfg(**values):
    return build_config({"data": "d", "run_dir": "r", **values})


def test_config_keys():
    cfg = _cfg(algorithm="rps", balance="speed", slowdown=["1:2", "3:1.5"])
    assert cfg.effective_average_weights == "samples"  # balance implies it
    assert cfg.slowdowns == {1: 2.0, 3: 1.5}
    assert _cfg(average_weights="samples").effective_average_weights == "samples"
    assert _cfg().effective_average_weights == "equal" and _cfg().balance == "none"
    for bad, match in [({"average_weights": "size"}, "average_weights must be one of equal, samples"),
                       ({"balance": "time"}, "balance must be one of none, speed"),
                       ({"balance": "speed", "algorithm": "sync"}, "balance = 'speed' needs algorithm local or rps"),
                       ({"slowdown": ["1:0.5"]}, "slowdown entry '1:0.5'"),
                       ({"slowdown": ["1"]}, "slowdown entry '1'"),
                       ({"slowdown": ["1:2", "1:3"]}, "slowdown names a rank twice")]:
        with pytest.raises(ConfigError, match=match):
            _cfg(**bad)
