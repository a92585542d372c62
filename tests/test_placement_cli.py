"""Bad placement, node link rules and node failures end a 4-rank job with exit 2 and one
message, on every rank together (README, "Bad input")."""

from __future__ import annotations

import pytest

from helpers import synthetic_shards
from launch import mpi

DEADLINE = 60.0  # seconds, start-up of 4 ranks included (a hang is caught by the subprocess timeout)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory.mktemp("placement") / "p4", 4, "iid", n_train=128, n_test=32)


def _train(shards, tmp_path, *extra):
    return mpi(4, "train", "--data", shards, "--run-dir", tmp_path / "run", "--steps", 3, "--progress", "none",
               *map(str, extra), timeout=90)


@pytest.mark.parametrize("extra,message", [
    (("--placement", "ring"), "placement must be one of cyclic, spread, got 'ring'"),
    (("--ranks-per-node", -2), "ranks_per_node must be >= 0, got -2"),
    # One machine: R = 4 found, so a second copy has no other node to go to.
    (("--placement", "spread", "--q", 2), "config: placement 'spread' puts the q=2 copies of a chunk on q different "
                                          "nodes, which needs q <= P/R = 4/4"),
    (("--placement", "spread", "--q", 3, "--ranks-per-node", 2), "needs q <= P/R = 4/2"),
    (("--ranks-per-node", 2, "--fail", "node:2@1"), "config: fail entry node:2@1 names node 2, but the 4 ranks fill "
                                                    "nodes 0..1 (2 ranks per node)"),
    (("--ranks-per-node", 2, "--fail", "node:0@1", "--fail", "node:1@2"), "fail would stop all 4 ranks"),
    (("--fail", "node:one@3"), "fail entry 'node:one@3' must look like RANK@STEP"),
    (("--algorithm", "rps", "--ranks-per-node", 2, "--link-drop", "node:0->node:0=0.1"),
     "link drop rates: link_drop rule 'node:0->node:0=0.1' names node 0 twice"),
    (("--ranks-per-node", 2, "--link-latency", "node:0->node:5=3"),
     "emulated network: link_latency rule 'node:0->node:5=3' names a node outside 0..1"),
])
def test_bad_node_settings_exit_2_on_every_rank(shards, tmp_path, extra, message):
    result = _train(shards, tmp_path, *extra)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr, result.stderr
    assert result.stderr.count("hpcsgd: error") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.seconds < DEADLINE, f"took {result.seconds:.1f}s"
