"""`hpcsgd report` groups and labels runs by redundancy (issue 21): a q = 2 run and a
redundancy = 1 run are one group, fractional runs are named by redundancy, a q sweep stays a q sweep."""

from __future__ import annotations

from hpcsgd.analysis.runs import differing_keys, group_runs, label_runs, load_runs

from test_analysis_report import make_run


def test_runs_group_and_label_by_redundancy(tmp_path):
    root = tmp_path / "mu"
    none = {"redundancy_per_rank": []}  # as config.toml writes it
    make_run(root, "q2-seed0", q=2, seed=0)  # an older run: no redundancy keys at all
    make_run(root, "mu1-seed1", q=2, redundancy=1.0, seed=1, **none)  # the same experiment, another seed
    make_run(root, "mu0.5-seed0", q=1, redundancy=0.5, seed=0, **none)
    make_run(root, "mu0.25-seed0", q=1, redundancy=0.25, seed=0, **none)
    make_run(root, "per-rank", q=1, redundancy_per_rank=[0.0, 0.5, 1.0, 0.5], seed=0)
    runs = load_runs([root])
    assert {r.name: r.config["redundancy"] for r in runs} == {
        "q2-seed0": 1.0, "mu1-seed1": 1.0, "mu0.5-seed0": 0.5, "mu0.25-seed0": 0.25, "per-rank": 0.5}
    groups = group_runs(runs)
    assert any(g.n == 2 and {r.name for r in g.runs} == {"q2-seed0", "mu1-seed1"} for g in groups)
    assert all("q=" not in g.label for g in groups)  # named by redundancy, not by the q it implies
    assert len(groups) == 4
    assert any("redundancy=0.25" in g.label for g in groups) and any("redundancy=1" in g.label for g in groups)
    label_runs(runs)
    (label,) = [r.label for r in runs if r.name == "mu0.5-seed0"]
    assert "redundancy=0.5" in label.split(", ") and "q=1" not in label


def test_a_q_sweep_is_still_labelled_by_q(tmp_path):
    root = tmp_path / "q"
    for q in (1, 2, 3):
        make_run(root, f"q{q}", q=q)
    runs = load_runs([root])
    assert differing_keys(runs) == ["q"]
    label_runs(runs)
    assert sorted(r.label for r in runs) == ["q=1", "q=2", "q=3"]
