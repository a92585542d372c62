"""The node-aware paths through `hpcsgd train` on simulated nodes (``--ranks-per-node``) of one machine.

An rps run on 2 simulated nodes of 2 ranks (a window per node, messages between them) must give
the one-node run's figures bit for bit, report ``exchange: node-aware`` and split its bytes into
intra- and inter-node by the closed form; with a failed rank too. The node-aware Allreduce of
local SGD runs, says so, repeats itself bit for bit and stays within rounding of the library's.
"""

from __future__ import annotations

import json

import pytest

from helpers import synthetic_shards
from launch import mpi
from reference import node_bytes

STEPS, TAU, SEED = 24, 4, 3
COMMON = ["--steps", STEPS, "--tau", TAU, "--seed", SEED, "--progress", "none", "--eval-every", 0, "--log-every", 8,
          "--mlp-hidden", 32]
# Everything but the timings, the path and the nodes themselves must agree bit for bit. The bytes
# that travelled depend on the nodes (across them a node adds its rows before they cross): they
# are checked against the closed form below instead.
NOT_RESULTS = {"wall_s", "compute_s_mean", "comm_s_mean", "data_s_mean", "exchange", "ranks_per_node",
               "bytes_sent", "bytes_intra_node", "bytes_inter_node"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory.mktemp("xnode") / "p4", 4, "label", n_train=512, n_test=64)


def _train(shards, run_dir, *extra) -> dict:
    r = mpi(4, "train", "--data", shards, "--run-dir", run_dir, *map(str, COMMON), *map(str, extra), timeout=240)
    assert r.returncode == 0, r.stderr
    return json.loads((run_dir / "summary.json").read_text())


def _numel(features: int = 8, hidden: int = 32, classes: int = 4) -> int:
    return features * hidden + hidden + hidden * classes + classes  # the MLP's weights and biases


@pytest.mark.parametrize("fail", [[], ["--fail", "1@10"], ["--overlap-rounds"]])
def test_rps_on_simulated_nodes_is_the_one_node_run_bit_for_bit(shards, tmp_path, fail):
    rps = ["--algorithm", "rps", "--drop-rate", "0.2", *fail]
    one = _train(shards, tmp_path / "one", *rps)
    two = _train(shards, tmp_path / "two", *rps, "--ranks-per-node", 2)
    # An overlapped round takes messages on one node and the node-aware path across nodes.
    one_node = "alltoallv" if "--overlap-rounds" in fail else "shared-memory"
    assert (one["exchange"], two["exchange"]) == (one_node, "node-aware")
    differ = {k: (one.get(k), two.get(k)) for k in (one.keys() | two.keys()) - NOT_RESULTS if one.get(k) != two.get(k)}
    assert not differ, differ
    # Every byte of the block exchange is counted on one side or the other.
    assert one["bytes_intra_node"] == one["bytes_sent"] and one["bytes_inter_node"] == 0
    assert two["bytes_intra_node"] + two["bytes_inter_node"] == two["bytes_sent"]
    if "--fail" not in fail:
        from hpcsgd.comm import LinkRates

        rounds = [t for t in range(STEPS) if (t + 1) % TAU == 0]
        expected = node_bytes(4, 2, SEED, LinkRates.build(4, 0.2), rounds, _numel())
        assert (two["bytes_intra_node"], two["bytes_inter_node"]) == expected
        assert one["bytes_sent"] == sum(node_bytes(4, 1, SEED, LinkRates.build(4, 0.2), rounds, _numel()))
    else:
        assert two["live_rank_ids"] == [0, 2, 3] and two["bytes_inter_node"] > 0


def test_local_sgd_node_aware_allreduce(shards, tmp_path):
    local = ["--algorithm", "local", "--ranks-per-node", 2]
    library = _train(shards, tmp_path / "library", *local)
    aware = _train(shards, tmp_path / "aware", *local, "--allreduce", "node-aware")
    again = _train(shards, tmp_path / "again", *local, "--allreduce", "node-aware")
    assert (library["exchange"], aware["exchange"]) == ("allreduce", "node-aware-allreduce")
    assert aware["train_loss"] == again["train_loss"] and aware["test_loss"] == again["test_loss"]  # repeatable
    assert aware["train_loss"] == pytest.approx(library["train_loss"], rel=1e-5)  # rounding apart, no more
    assert aware["bytes_intra_node"] > 0 and aware["bytes_inter_node"] > 0
    assert aware["bytes_intra_node"] + aware["bytes_inter_node"] == aware["bytes_sent"]
    assert library["bytes_intra_node"] == library["bytes_inter_node"] == 0  # the library does not say


@pytest.mark.parametrize("extra,message", [
    (("--algorithm", "sync", "--allreduce", "node-aware"), "give --no-overlap"),
    (("--algorithm", "local", "--allreduce", "node-aware", "--overlap-rounds"), "give --no-overlap-rounds"),
    (("--allreduce", "tree"), "allreduce must be one of library, node-aware, nonblocking, got 'tree'"),
    (("--algorithm", "rps", "--exchange", "rdma"), "exchange must be one of auto, alltoallv, shared-memory, node-aware"),
])
def test_bad_node_aware_settings_exit_2(shards, tmp_path, extra, message):
    r = mpi(4, "train", "--data", shards, "--run-dir", tmp_path / "run", "--steps", 2, "--progress", "none",
            *map(str, extra), timeout=90)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
