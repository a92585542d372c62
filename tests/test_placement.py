"""Topology-aware placement, node link rules and node failures: the pure parts
(ALGORITHMS.md, "Topology-aware placement and node-scoped links")."""

from __future__ import annotations

import json
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from hpcsgd.faults.lossy import LinkRates
from hpcsgd.faults.netem import LinkNetwork
from hpcsgd.faults.schedule import fault_schedule, rank_faults
from hpcsgd.config import build_config, validate_for_world
from hpcsgd.data.assignment import adopt_orphans, chunk_holders, chunks_for_rank, coverage, sample_plan
from hpcsgd.data.placement import Placement, node_count, node_of, node_ranks, placement_chunks
from hpcsgd.errors import ConfigError
from hpcsgd.train.topology import resolve_placement

# Every (P, q, R) spread placement accepts: q copies on q different nodes needs q * R <= P.
SPREAD = [(P, q, R) for P in range(1, 11) for R in range(1, P + 1) for q in range(1, P + 1) if q * R <= P]


def cyclic_node_loss(P: int, q: int, R: int) -> Fraction:
    """Closed form: coverage after one whole node of R consecutive ranks is lost, cyclic placement.

    Chunk c is held by ranks c-q+1..c; all of them sit in the node's block nR..nR+R-1 for the
    R-q+1 chunks c = nR+q-1..nR+R-1 (none when q > R).
    """
    return 1 - Fraction(max(0, R - q + 1), P)


@pytest.mark.parametrize("P,q,R", SPREAD)
def test_spread_is_the_formula_and_puts_copies_on_q_nodes(P, q, R):
    held = Counter()
    for rank in range(P):
        chunks = placement_chunks(P, q, R, rank)
        assert chunks == tuple((rank + k * R) % P for k in range(q)) == chunks_for_rank(P, q, rank, Placement("spread", R))
        assert chunks[0] == rank and len(set(chunks)) == q
        held.update(chunks)
    assert held == {c: q for c in range(P)}  # every chunk has exactly q copies
    for c in range(P):
        holders = [r for r in range(P) if c in placement_chunks(P, q, R, r)]
        assert len({node_of(r, R) for r in holders}) == q, (c, holders)  # ... on q different nodes


@pytest.mark.parametrize("P,q,R", SPREAD)
def test_a_lost_node_keeps_every_chunk_under_spread_but_not_cyclic(P, q, R):
    spread = Placement("spread", R)
    for node in range(node_count(P, R)):
        live = [r for r in range(P) if r not in node_ranks(node, R, P)]
        if not live:
            continue
        if q >= 2:
            assert coverage(P, q, live, placement=spread) == 1.0
        if P % R == 0:  # whole nodes: the closed form
            assert Fraction(coverage(P, q, live)).limit_denominator(P) == cyclic_node_loss(P, q, R)


def test_six_ranks_three_nodes_q2_figures():
    """The issue's case: 3 nodes x 2 ranks, q = 2, node 1 (ranks 2, 3) lost."""
    live = [0, 1, 4, 5]
    assert coverage(6, 2, live, placement=Placement("spread", 2)) == 1.0
    assert coverage(6, 2, live) == 5 / 6 == float(cyclic_node_loss(6, 2, 2))  # chunk 3 had copies on 2, 3 only
    assert chunk_holders(6, 2, live)[3] == 0
    assert chunk_holders(6, 2, live, placement=Placement("spread", 2)) == {0: 2, 1: 2, 2: 1, 3: 1, 4: 1, 5: 1}


def test_spread_with_one_rank_per_node_is_cyclic():
    for P in range(1, 8):
        for q in range(1, P + 1):
            assert all(placement_chunks(P, q, 1, r) == chunks_for_rank(P, q, r) for r in range(P))


@pytest.mark.parametrize("P,q,R", [(6, 4, 2), (4, 2, 3), (6, 2, 4), (2, 2, 2)])
def test_spread_refuses_more_copies_than_nodes(P, q, R):
    with pytest.raises(ConfigError, match=r"placement 'spread'.*needs q <= P/R") as info:
        placement_chunks(P, q, R, 0)
    assert f"q={q}" in str(info.value) and f"R={R}" in str(info.value)


def test_placement_arguments_are_checked():
    with pytest.raises(ConfigError, match="placement must be one of cyclic, spread, got 'ring'"):
        Placement("ring", 2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="ranks_per_node must be an integer >= 1"):
            Placement("spread", bad)


def test_adoption_after_losing_a_node():
    """A 6-rank run resumed on 4 (node 2 gone): nothing to adopt under spread; chunk 5 under cyclic."""
    assert adopt_orphans(6, 2, [0, 1, 2, 3], [4, 5], placement=Placement("spread", 2)) == {}
    assert adopt_orphans(6, 2, [0, 1, 2, 3], [4, 5]) == {5: 0}
    # q = 1: every chunk of the node is an orphan either way, spread out over the live ranks.
    assert adopt_orphans(6, 1, [0, 1, 2, 3], [4, 5], placement=Placement("spread", 2)) == {4: 0, 5: 1}


def test_reweight_under_spread_restores_every_chunk_weight():
    sizes = [30, 50, 40, 60, 20, 40]
    live = [0, 1, 4, 5]
    spread = Placement("spread", 2)
    plan = sample_plan(2, 4, sizes, live, reweight=True, placement=spread)
    weight = Counter()
    for r, chunks in plan.items():
        assert tuple(chunks) == chunks_for_rank(6, 2, r, spread)
        for c, (n, a) in chunks.items():
            weight[c] += n * a / len(live)
    assert weight == {c: Fraction(n, sum(sizes)) for c, n in enumerate(sizes)}


# -- link rules that name nodes ------------------------------------------------------------
NODES = [0, 0, 1, 1, 2, 2]  # 6 ranks, 2 per node


def test_inter_node_rule_sets_only_links_between_nodes():
    rates = LinkRates.build(6, 0.0, rules=["inter-node=0.2"], nodes=NODES)
    for m in (rates.phase1, rates.phase2):
        for s in range(6):
            for d in range(6):
                assert m[s, d] == (0.2 if NODES[s] != NODES[d] else 0.0)


def test_node_to_node_rule_and_precedence():
    rates = LinkRates.build(6, 0.05, rules=["inter-node=0.2", "node:0->node:2=0.5", "1->4=0.1"], nodes=NODES)
    m = rates.phase1
    assert m[0, 4] == m[0, 5] == m[1, 5] == 0.5 and m[1, 4] == 0.1  # later rules win
    assert m[4, 0] == 0.2 and m[2, 4] == 0.2  # the other direction, other pairs: inter-node
    assert m[0, 1] == m[4, 5] == 0.05 and m[3, 3] == 0.0  # inside a node: the uniform rate


def test_node_rules_without_a_node_map_treat_each_rank_as_a_node():
    rates = LinkRates.build(3, 0.0, rules=["inter-node=0.3"])
    assert np.array_equal(rates.phase1, np.full((3, 3), 0.3) - np.diag([0.3] * 3))


def test_node_rules_for_latency_and_bandwidth():
    net = LinkNetwork.build(6, latency_rules=["inter-node=5"], bandwidth_rules=["node:1->node:0=0.8"], nodes=NODES)
    assert net.latency[0, 2] == 0.005 and net.latency[0, 1] == 0.0 and net.latency[4, 5] == 0.0
    assert net.bandwidth[2, 0] == net.bandwidth[3, 1] == 0.8e9 / 8 and net.bandwidth[0, 2] == np.inf
    assert LinkNetwork.build(6, latency_rules=["inter-node=5"], nodes=[0] * 6) is None  # one node: nothing crosses


@pytest.mark.parametrize("rule,message", [
    ("node:1->node:1=0.2", "names node 1 twice"),
    ("node:0->node:3=0.2", r"names a node outside 0..2"),
    ("inter-node=1.5", r"must be in \[0, 1\)"),
    ("node:0->2=0.2", "is not of the form"),
    ("internode=0.1", "'inter-node=x' or 'node:A->node:B=x'"),
])
def test_bad_node_rules(rule, message):
    with pytest.raises(ConfigError, match=message):
        LinkRates.build(6, 0.0, rules=[rule], nodes=NODES)


# -- config: placement, ranks_per_node, node failures -----------------------------------------
BASE = {"data": "d", "run_dir": "r"}


def test_config_keys_and_flags():
    cfg = build_config(BASE, {"placement": "spread", "ranks-per-node": 2, "fail": ["node:1@30", "5@10"]})
    assert cfg.placement == "spread" and cfg.ranks_per_node == 2
    assert cfg.faults == {5: 10} and cfg.node_faults == {1: 30}
    assert rank_faults(cfg, 6, 2) == {2: 30, 3: 30, 5: 10}
    assert fault_schedule(cfg, 6, 10, 100, 2) == {2: 30, 3: 30, 5: 10}
    assert rank_faults(cfg, 5, 3) == {3: 30, 4: 30, 5: 10}  # the last node holds the remaining ranks
    assert build_config(BASE).placement == "cyclic" and build_config(BASE).ranks_per_node == 0


@pytest.mark.parametrize("values,message", [
    ({"placement": "ring"}, "placement must be one of cyclic, spread, got 'ring'"),
    ({"ranks_per_node": -1}, "ranks_per_node must be >= 0, got -1"),
    ({"fail": ["node:x@3"]}, "must look like RANK@STEP with RANK, STEP >= 0, e.g. 3@500, or node:NODE@STEP"),
    ({"fail": ["node:1@3", "node:1@5"]}, "fail names a rank or a node twice"),
])
def test_bad_config_values(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(BASE, values)


def test_node_failures_are_checked_against_the_nodes():
    cfg = build_config(BASE, {"fail": ["node:3@5"]})
    with pytest.raises(ConfigError, match=r"names node 3, but the 6 ranks fill nodes 0..2 \(2 ranks per node\)"):
        validate_for_world(cfg, 6, ranks_per_node=2)
    validate_for_world(cfg, 8, ranks_per_node=2)
    every = build_config(BASE, {"fail": ["node:0@5", "node:1@6"]})
    with pytest.raises(ConfigError, match="fail would stop all 4 ranks"):
        validate_for_world(every, 4, ranks_per_node=2)


def test_resolve_placement_keeps_the_recorded_R():
    fresh = resolve_placement("spread", 0, 2, None, 6, 2)
    assert fresh == Placement("spread", 2)
    assert resolve_placement("spread", 3, 2, None, 6, 2) == Placement("spread", 3)  # configured beats detected
    record = {"dir": "run/checkpoints/step-00000060", "ranks_per_node": 2}
    # Resumed on a machine where 6 ranks share one node: the run's R stays 2.
    assert resolve_placement("spread", 0, 6, record, 6, 2) == Placement("spread", 2)
    with pytest.raises(ConfigError, match="started with ranks_per_node = 2"):
        resolve_placement("spread", 3, 6, record, 6, 2)
    with pytest.raises(ConfigError, match="needs q <= P/R = 6/6"):
        resolve_placement("spread", 0, 6, None, 6, 2)  # one node of 6: no second node for the copy
    assert resolve_placement("cyclic", 0, 6, None, 6, 6) == Placement("cyclic", 6)


def test_report_labels_runs_by_placement(tmp_path):
    from hpcsgd.analysis.runs import differing_keys, load_runs

    for name, placement in (("a", "cyclic"), ("b", "spread")):
        run = tmp_path / name
        (run / "metrics").mkdir(parents=True)
        cfg = build_config(BASE, {"q": 2, "placement": placement, "ranks_per_node": 2})
        (run / "config.toml").write_text(cfg.to_toml())
        (run / "metrics" / "rank-0.jsonl").write_text(json.dumps({"step": 1, "epoch": 0.5, "loss": 1.0}) + "\n")
    runs = load_runs([tmp_path / "a", tmp_path / "b"])
    assert differing_keys(runs) == ["placement"]
    assert [r.label for r in runs] == ["placement=cyclic", "placement=spread"]
