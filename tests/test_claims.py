"""The papers' headline claims, reproduced small on the embedded data set (each ~30-60 s)."""

from __future__ import annotations

import json

import pytest

from launch import ROOT, hpcsgd, mpi

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits_label4(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "shards"
    result = hpcsgd("shard", "--source", "digits", "--parts", 4, "--partition", "label", "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def test_risgd_q2_beats_local_sgd_on_label_skewed_digits(digits_label4, tmp_path):
    """RI-SGD: same steps and rounds, redundancy q=2 -> lower train loss, higher accuracy."""
    summaries = {}
    for q in (1, 2):
        run = tmp_path / f"q{q}"
        result = mpi(4, "train", ROOT / "jobs/configs/digits-risgd.toml", "--data", digits_label4,
                     "--run-dir", run, "--q", q, "--progress", "none", "--eval-every", 0, timeout=300)
        assert result.returncode == 0, result.stderr
        summaries[q] = json.loads((run / "summary.json").read_text())
    one, two = summaries[1], summaries[2]
    assert one["steps"] == two["steps"] and one["rounds"] == two["rounds"]
    assert two["train_loss"] < one["train_loss"], (one["train_loss"], two["train_loss"])
    assert two["test_accuracy"] > one["test_accuracy"], (one["test_accuracy"], two["test_accuracy"])
