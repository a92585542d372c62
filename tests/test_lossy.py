"""The drop-mask generator and link rates: pure functions, tested serially."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hpcsgd.comm import LinkRates, arrival_mask, block_offsets, uniforms
from hpcsgd.errors import ConfigError


def _off_diagonal(mask: np.ndarray) -> np.ndarray:
    return mask[~np.eye(len(mask), dtype=bool)]


@pytest.mark.parametrize("delta", [0.01, 0.1, 0.4])
def test_realised_drop_fraction_within_three_standard_errors(delta):
    P, steps = 8, 400
    rates = LinkRates.build(P, delta)
    dropped = [~_off_diagonal(arrival_mask(11, t, phase, rates.for_phase(phase))) for t in range(steps) for phase in (1, 2)]
    n = sum(d.size for d in dropped)
    fraction = sum(int(d.sum()) for d in dropped) / n
    standard_error = math.sqrt(delta * (1 - delta) / n)
    assert abs(fraction - delta) < 3 * standard_error, (fraction, delta, standard_error)


def test_masks_are_pure_functions_of_seed_step_phase():
    rates = LinkRates.build(6, 0.3).phase1
    a = arrival_mask(7, 123, 1, rates)
    assert np.array_equal(a, arrival_mask(7, 123, 1, rates))  # repeatable
    assert not np.array_equal(a, arrival_mask(8, 123, 1, rates))  # the seed matters
    assert np.all(np.diag(a))  # a rank's own block always arrives


def test_phases_and_steps_are_independent():
    """Correlation of the uniforms between phases and between neighbouring steps is ~0."""
    P, steps = 16, 300
    u1 = np.stack([uniforms(3, t, 1, P) for t in range(steps)]).ravel()
    u2 = np.stack([uniforms(3, t, 2, P) for t in range(steps)]).ravel()
    u_next = np.stack([uniforms(3, t + 1, 1, P) for t in range(steps)]).ravel()
    bound = 4 / math.sqrt(u1.size)  # 4 standard errors of a correlation coefficient
    assert abs(np.corrcoef(u1, u2)[0, 1]) < bound
    assert abs(np.corrcoef(u1, u_next)[0, 1]) < bound
    assert abs(u1.mean() - 0.5) < 4 * math.sqrt(1 / 12 / u1.size)


def test_zero_drop_rate_never_drops():
    rates = LinkRates.build(5, 0.0)
    assert rates.lossless
    assert all(arrival_mask(1, t, 1, rates.phase1).all() for t in range(50))


def test_per_phase_rates_and_link_rules():
    rates = LinkRates.build(4, 0.1, phase1=0.2, rules=["to:0=0.3", "from:2=0.05", "1->3=0.5"])
    assert rates.phase1[1, 2] == 0.2 and rates.phase2[1, 2] == 0.1
    assert rates.phase1[3, 0] == rates.phase2[3, 0] == 0.3  # into rank 0
    assert rates.phase1[2, 0] == 0.05  # later rules win: out of rank 2, including to 0
    assert rates.phase1[1, 3] == 0.5
    assert np.all(np.diag(rates.phase1) == 0)


def test_link_matrix_and_bad_rules():
    matrix = np.full((3, 3), 0.25)
    rates = LinkRates.build(3, 0.0, matrix=matrix)
    assert rates.phase1[0, 1] == 0.25 and rates.phase1[0, 0] == 0.0
    with pytest.raises(ConfigError, match="3x3"):
        LinkRates.build(3, 0.0, matrix=np.zeros((2, 2)))
    with pytest.raises(ConfigError, match="form"):
        LinkRates.build(3, 0.0, rules=["everything=0.1"])
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        LinkRates.build(3, 1.0)


@pytest.mark.parametrize("d,parts,align", [(10, 3, 1), (0, 4, 1), (1000, 7, 1), (1000, 7, 16), (5, 8, 1)])
def test_block_offsets_cover_and_balance(d, parts, align):
    offsets = block_offsets(d, parts, align)
    sizes = np.diff(offsets)
    assert offsets[0] == 0 and offsets[-1] == d and len(sizes) == parts and np.all(sizes >= 0)
    assert sizes.max() - sizes.min() <= align
    if align > 1:
        assert np.all(offsets[:-1] % align == 0)
