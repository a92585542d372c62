"""Model factories for ``hpcsgd train --model tests.user_models:NAME`` in the CLI tests."""

from torch import nn

WIDTH = 3  # not callable: --model must refuse it


def wrong_classes(input_shape, num_classes):
    """A model that ignores num_classes: three outputs whatever the shards hold."""
    n = 1
    for s in input_shape:
        n *= s
    return nn.Sequential(nn.Flatten(), nn.Linear(n, 3))
