"""hpcsgd bench across nodes: rows keyed xnode_*, bytes over the links, the cost model's errors.

The end-to-end test brings up its own namespace cluster (2 nodes x 2 ranks, tbf-shaped links)
through tools/bench --xnode with small buffers and one round, and checks that the rows and
their keys exist and are finite (the figures themselves are for tools/bench, not tests). It
skips without root or namespaces. The other tests check the cost model's byte counts against
closed forms, serially.
"""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest

from hpcsgd.bench.costmodel import node_link_bytes, project_across_nodes
from hpcsgd.bench.links import XNODE_TARGETS, keyed_by_placement

from launch import ROOT, env

SKIP = 77
XNODE_KEYS = ("xnode_allreduce_raw", "xnode_link_sendrecv", "xnode_avg_vs_allreduce", "xnode_rps01_vs_allreduce",
              "xnode_avg_nonblocking_vs_allreduce",
              "xnode_rps01_alltoallv_vs_allreduce", "xnode_overlap_hidden_local", "xnode_overlap_hidden_rps",
              "xnode_sync_vs_ddp_mlp")


def test_link_bytes_of_a_round_in_closed_form():
    N = 1000.0
    # Node-aware Allreduce: one leader per node, 2(n-1)/n of the buffer whatever the ranks per node.
    assert node_link_bytes("allreduce", 2, 2, N) == N
    assert node_link_bytes("allreduce", 4, 8, N) == 1.5 * N
    # Flat RPS exchange on 2 x 2: each rank's 2 blocks of N/4 for the other node, twice, 90% kept.
    assert node_link_bytes("rps", 2, 2, N, drop=0.1) == pytest.approx(2 * 0.9 * 2 * 2 * N / 4)
    assert node_link_bytes("rps", 1, 4, N) == 0  # one node: nothing crosses


def _probe(name: str, seconds: tuple[float, float], sizes=(10**7, 3 * 10**7)) -> dict:
    return {"key": f"xnode_probe_{name}", "seconds": seconds[1], "bytes": sizes[1], "probe_bytes": list(sizes),
            "probe_s": list(seconds), "ratio": None, "nodes": 2, "ranks_per_node": 2}


def test_probe_fit_is_the_rate_through_the_sizes_and_the_origin():
    from hpcsgd.bench.costmodel import probe_fit

    fit = probe_fit([_probe("allreduce", (0.02, 0.06)), _probe("one_stream", (0.01, 0.04)),
                     {"key": "probe_allreduce", "probe_bytes": [1, 2], "probe_s": [1, 2]}])  # one node: not a probe
    assert set(fit) == {"allreduce", "one_stream"}
    assert fit["allreduce"] == pytest.approx((0.0, 2e-9))  # on the line through the origin: exact
    # Least squares through the origin: (1e7 * 0.01 + 3e7 * 0.04) / (1e14 + 9e14)
    assert fit["one_stream"] == pytest.approx((0.0, 1.3e-9))


# A node's link bytes for RPS at drop 0.1 on 2 x 2, 1e8-byte buffer: the flat path sends each rank's
# row for both ranks of the other node in both phases, 90% kept (2 x 0.9 x 2 x 1e8 x 2/4); the
# node-aware path one node sum per block there and each average once, kept unless both of a
# node's two messages were dropped (2 x 0.99 x 1e8 x 2/4).
@pytest.mark.parametrize("path,link", [("alltoallv", 1.8e8), ("node-aware", 0.99e8)])
def test_projection_errors_per_row(path, link):
    rows = [_probe("allreduce", (0.02, 0.06)), _probe("iallreduce", (0.01, 0.03)), _probe("one_stream", (0.02, 0.06)),
            _probe("node_streams", (0.02, 0.06)),
            {"key": "xnode_link_sendrecv", "seconds": 0.2, "bytes": 10**8, "nodes": 2, "ranks_per_node": 2},
            {"key": "xnode_avg_vs_allreduce", "seconds": 0.4, "bytes": 10**8, "nodes": 2, "ranks_per_node": 2,
             "link_bytes": 2e8},
            {"key": "xnode_avg_nonblocking_vs_allreduce", "seconds": 0.2, "bytes": 10**8, "nodes": 2,
             "ranks_per_node": 2},
            {"key": "xnode_rps01_vs_allreduce", "seconds": 0.8, "bytes": 10**8, "nodes": 2, "ranks_per_node": 2,
             "path": path},
            {"key": "avg_vs_allreduce", "seconds": 0.1, "bytes": 10**8}]  # one node: not projected
    out = {p["key"]: p for p in project_across_nodes(rows, gbps=8.0, latency_us=0.0, fitted=None)}
    assert set(out) == {"xnode_link_sendrecv", "xnode_avg_vs_allreduce", "xnode_avg_nonblocking_vs_allreduce",
                        "xnode_rps01_vs_allreduce"}
    avg = out["xnode_avg_vs_allreduce"]
    assert avg["predicted_s"] == pytest.approx(0.1)  # 1e8 bytes per node at 1e9 bytes/s
    assert avg["error"] == pytest.approx(-0.75)
    assert avg["bytes_error"] == pytest.approx(0.0)  # 2 nodes x 1e8 predicted, 2e8 counted
    # Calibrated: each probe's time per byte at the row's bytes.
    assert avg["calibrated_s"] == pytest.approx(2e-9 * 1e8) and avg["calibrated_error"] == pytest.approx(-0.5)
    assert out["xnode_avg_nonblocking_vs_allreduce"]["calibrated_s"] == pytest.approx(1e-9 * 1e8)
    assert out["xnode_link_sendrecv"]["calibrated_s"] == pytest.approx(2e-9 * 1e8)
    rps = out["xnode_rps01_vs_allreduce"]
    assert rps["predicted_s"] == pytest.approx(link * 8 / 8e9)
    assert rps["predicted_link_bytes"] == pytest.approx(2 * link)
    # A node's link bytes at the probe's rate per node (2 ranks sent 2e-9 s/byte each at
    # once: 1e-9 s per node byte), and the probe's latency (0) once per phase.
    assert rps["calibrated_s"] == pytest.approx(link * 1e-9)
    no_probe = project_across_nodes(rows[4:], gbps=8.0, latency_us=0.0, fitted=None)
    assert no_probe and not any("calibrated_s" in p for p in no_probe)


def test_rows_keyed_by_where_they_ran():
    class Across:
        nodes, ranks_per_node, prefix = 2, 2, "xnode_"

    class One:
        nodes, ranks_per_node, prefix = 1, 4, ""

    rows = [{"key": "avg_vs_allreduce", "target": 1.03}, {"key": "watchdog_overhead", "target": 1.01}]
    assert keyed_by_placement(rows, One()) == rows
    keyed = keyed_by_placement(rows, Across())
    assert [r["key"] for r in keyed] == ["xnode_avg_vs_allreduce", "xnode_watchdog_overhead"]
    assert keyed[0]["target"] == XNODE_TARGETS["avg_vs_allreduce"] and keyed[1]["target"] == 1.01
    assert keyed[0]["nodes"] == 2 and keyed[0]["ranks_per_node"] == 2


@pytest.mark.slow
def test_xnode_bench_runs_across_a_namespace_cluster(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the namespace cluster needs root")
    out = tmp_path / "xnode.json"
    e = {**env(), "HPCSGD_CLUSTER": "xnode-bench-test"}  # its own cluster, never a user's
    proc = subprocess.run([str(ROOT / "tools" / "bench"), "--xnode", "--gbps", "10", "--quick", "--reps", "1",
                           "--params", "100000", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env=e, cwd=ROOT)
    if proc.returncode == SKIP:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    keyed = {r["key"]: r for r in rows}
    assert len(keyed) == len(rows)
    assert set(XNODE_KEYS) <= set(keyed), sorted(keyed)
    assert all(r["key"].startswith("xnode_") and r["nodes"] == 2 and r["ranks_per_node"] == 2 for r in rows)
    for key in XNODE_KEYS:
        r = keyed[key]
        assert math.isfinite(r["seconds"]) and r["seconds"] > 0, r
        assert r["ratio"] is not None and math.isfinite(r["ratio"]), r
        assert r["link_gbps"] == 10 and len(r["load_before"]) == 3
    for key in ("xnode_avg_vs_allreduce", "xnode_rps01_vs_allreduce", "xnode_sync_vs_ddp_mlp",
                "xnode_overlap_hidden_local"):
        assert keyed[key]["link_bytes"] > 0, key  # the links carried the round
    assert keyed["xnode_rps01_vs_allreduce"]["model"]["predicted_s"] > 0
    assert math.isfinite(keyed["xnode_avg_vs_allreduce"]["model"]["error"])
    for name in ("one_stream", "node_streams", "allreduce", "iallreduce"):  # the link probe, at two sizes
        probe = keyed[f"xnode_probe_{name}"]
        assert len(probe["probe_s"]) == 2 and all(s > 0 for s in probe["probe_s"]), probe
    for key in ("xnode_avg_vs_allreduce", "xnode_avg_nonblocking_vs_allreduce", "xnode_rps01_vs_allreduce"):
        assert math.isfinite(keyed[key]["model"]["calibrated_error"]), key
    assert "| `xnode_avg_vs_allreduce` |" in proc.stdout
    down = subprocess.run([str(ROOT / "tools" / "cluster"), "status"], capture_output=True, text=True, env=e)
    assert "down" in down.stdout  # the tool tore its cluster down
