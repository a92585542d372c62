"""Property-based tests (hypothesis) of the config parser and the shard validator."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hpcsgd.config import FIELDS, TrainConfig, build_config
from hpcsgd.data import validate_arrays
from hpcsgd.errors import ConfigError, ShardError

REQUIRED = {"data": "shards", "run_dir": "run"}
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 1000), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(-2, 50), max_size=3), st.lists(st.text(max_size=8), max_size=2),
)
keys = st.one_of(st.sampled_from(sorted(FIELDS)), st.text(min_size=1, max_size=10))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(keys, scalars, max_size=5))
def test_config_parser_accepts_or_names_the_problem(values):
    """Any input either parses into a config or raises ConfigError; never another exception."""
    try:
        cfg = build_config({**REQUIRED, **values})
    except ConfigError as exc:
        message = str(exc)
        assert message and any(k in message for k in list(FIELDS) + ["config key"]), message
        return
    assert isinstance(cfg, TrainConfig)
    # Whatever parsed survives the trip through the resolved config file unchanged.
    again = build_config(tomllib.loads(cfg.to_toml()))
    assert again == cfg


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10), st.integers(-3, 12), st.integers(0, 20))
def test_range_checks_are_exact(q, tau, batch):
    values = {**REQUIRED, "q": q, "tau": tau, "batch_size": batch}
    if tau >= 1 and batch >= 1:
        assert build_config(values).tau == tau
    else:
        with pytest.raises(ConfigError, match="tau must be >= 1|batch_size must be >= 1"):
            build_config(values)


features = hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=2, max_dims=3, min_side=0, max_side=6),
    elements=st.floats(width=32, allow_nan=True, allow_infinity=True),
)


@settings(max_examples=300, deadline=None)
@given(features, st.integers(1, 6), st.data())
def test_shard_validator_rejects_exactly_the_bad_arrays(x, num_classes, data):
    n = len(x)
    y = np.asarray(data.draw(st.lists(st.integers(-2, num_classes + 1), min_size=n, max_size=n)), dtype=np.int64)
    bad = n == 0 or not np.isfinite(x).all() or bool(((y < 0) | (y >= num_classes)).any())
    if bad:
        with pytest.raises(ShardError):
            validate_arrays(x, y, num_classes, "chunk 0")
    else:
        validate_arrays(x, y, num_classes, "chunk 0")
