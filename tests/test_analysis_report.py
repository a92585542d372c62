"""Offline analysis on synthetic run directories: loading, tables, figures, the CLI (serial)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hpcsgd.analysis import load_run, load_runs
from hpcsgd.analysis import plots, report
from hpcsgd.analysis.plots import make_figures
from hpcsgd.analysis.runs import FINISHED, UNFINISHED, differing_keys, diversity, group_curve, group_runs
from hpcsgd.analysis.tables import build_table, default_target, to_markdown, write_csv, write_runs_csv
from hpcsgd.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SPE = 4  # steps per epoch of every synthetic run
TAU = 2

BASE_CONFIG = {
    "data": "/shards",
    "run_dir": "",
    "algorithm": "rps",
    "q": 1,
    "tau": TAU,
    "drop_rate": 0.0,
    "model": "mlp",
    "mlp_hidden": [16],
    "epochs": 3.0,
    "batch_size": 8,
    "lr": 0.1,
    "seed": 0,
    "fail": [],
    "progress": "none",
    "threads": 1,
}


def record(rank: int, step: int, acc: list[float], grad_diversity: float | None, shift: float = 0.0) -> dict:
    """Rank ``rank``'s line for ``step``: closed forms, so tests can recompute any mean.

    ``shift`` moves loss, accuracies and wall time by the same amount (a seed's offset).
    """
    rounds = step // TAU
    rec = {
        "step": step,
        "epoch": round(step / SPE, 6),
        "loss": 2.0 - 0.1 * step + 0.01 * rank + shift,
        "lr": 0.1,
        "wall_s": 0.5 * step + 0.01 * rank + shift,
        "compute_s": 0.2 * step,
        "comm_s": 0.1 * step,
        "data_s": 0.05 * step,
        "straggle_s": 0.0,
        "rounds": rounds,
        "bytes_sent": 1000 * rounds,
        "bytes_saved": 100 * rounds,
        "messages_sent": 9 * rounds,
        "messages_dropped": rounds,
        "arrival": 0.9 if rounds else None,
        "live_ranks": 4,
        "coverage": 1.0,
        "consensus_distance": 0.01 * (step % TAU) + 0.001 * (rank + 1),
    }
    if step % SPE == 0:
        a = acc[step // SPE - 1] + shift
        own = a - 0.05 + 0.01 * rank
        rec.update(test_loss=1.0 - own, test_accuracy=own, avg_test_loss=1.0 - a, avg_test_accuracy=a)
    if grad_diversity is not None:
        rec["grad_diversity"] = grad_diversity
    return rec


def make_run(
    root: Path,
    name: str,
    *,
    ranks: int = 4,
    steps: int = 12,
    acc=(0.5, 0.8, 0.9),
    summary: bool = True,
    stop: dict[int, int] | None = None,
    grad_diversity: float | None = None,
    shift: float = 0.0,
    **config,
) -> Path:
    """Write a run directory; ``stop`` maps a rank to the last step it logged (a failed rank)."""
    run_dir = root / name
    (run_dir / "metrics").mkdir(parents=True)
    cfg = {**BASE_CONFIG, "run_dir": str(run_dir), **config}
    lines = [f"{k} = {json.dumps(v)}" for k, v in cfg.items()]
    (run_dir / "config.toml").write_text("\n".join(lines) + "\n")
    stop = stop or {}
    for r in range(ranks):
        last = stop.get(r, steps)
        with open(run_dir / "metrics" / f"rank-{r}.jsonl", "w") as fh:
            for s in range(1, last + 1):
                fh.write(json.dumps(record(r, s, list(acc), grad_diversity, shift)) + "\n")
    if summary:
        rounds = steps // TAU
        summ = {
            "algorithm": cfg["algorithm"], "ranks": ranks, "q": cfg["q"], "tau": TAU,
            "drop_rate": cfg["drop_rate"], "steps": steps, "epochs": steps / SPE, "rounds": rounds,
            "wall_s": 0.5 * steps + 0.1 + shift, "train_loss": 0.7 + shift,
            "bytes_sent": 1000 * rounds * ranks, "bytes_saved": 100 * rounds * ranks,
            "arrival_realised": 0.9, "live_ranks": ranks, "coverage": 1.0,
            "test_accuracy": acc[-1] + shift, "train_loss_rank_mean": 0.8,
            "test_accuracy_rank_mean": acc[-1] - 0.04 + shift,
            "consensus_distance": 0.002, "per_class_accuracy": [0.9, 0.8],
            "compute_s_mean": 0.2 * steps, "comm_s_mean": 0.1 * steps, "data_s_mean": 0.05 * steps,
        }
        (run_dir / "summary.json").write_text(json.dumps(summ) + "\n")
    return run_dir


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A folder of four runs: finished, truncated last line, missing rank file, in progress."""
    root = tmp_path / "sweep"
    make_run(root, "a-finished", q=1, grad_diversity=1.5)
    trunc = make_run(root, "b-truncated", q=2, acc=(0.4, 0.6, 0.7), grad_diversity=2.5)
    with open(trunc / "metrics" / "rank-1.jsonl", "a") as fh:
        fh.write('{"step": 13, "epoch": 3.25, "lo')  # a crash mid-write
    missing = make_run(root, "c-missing-rank", q=4, acc=(0.2, 0.3, 0.45))
    (missing / "metrics" / "rank-2.jsonl").unlink()
    make_run(root, "d-running", q=2, drop_rate=0.1, steps=6, summary=False, stop={3: 3})
    return root


def last_losses(steps: int, ranks) -> float:
    return float(np.mean([2.0 - 0.1 * steps + 0.01 * r for r in ranks]))


# -- loading ---------------------------------------------------------------------------------
def test_finished_run_loads_cleanly(sweep):
    run = load_run(sweep / "a-finished")
    assert run.status == FINISHED and run.warnings == []
    assert run.ranks == [0, 1, 2, 3] and all(len(v) == 12 for v in run.records.values())
    x, y = run.curve("loss")
    assert np.allclose(x, np.arange(1, 13) / SPE)
    assert np.allclose(y, [last_losses(s, range(4)) for s in range(1, 13)])
    xs, acc = run.curve("avg_test_accuracy", x="rounds")
    assert np.allclose(xs, [2, 4, 6]) and np.allclose(acc, [0.5, 0.8, 0.9])
    x1, y1 = run.curve("loss", x="step", ranks=1)
    assert np.allclose(y1, 2.0 - 0.1 * x1 + 0.01)


def test_truncated_last_line_is_skipped_and_counted(sweep):
    run = load_run(sweep / "b-truncated")
    assert run.status == FINISHED
    assert len(run.records[1]) == 12
    assert len(run.warnings) == 1 and "truncated last line" in run.warnings[0] and "rank-1" in run.warnings[0]


def test_missing_rank_file_warns_and_mean_uses_the_others(sweep):
    run = load_run(sweep / "c-missing-rank")
    assert run.ranks == [0, 1, 3]
    assert any("rank(s) 2 of 4" in w for w in run.warnings)
    assert run.final("loss") == pytest.approx(last_losses(12, [0, 1, 3]))


def test_run_in_progress_with_a_failed_rank(sweep):
    run = load_run(sweep / "d-running")
    assert run.status == UNFINISHED and run.summary is None
    assert any("no summary.json" in w for w in run.warnings)
    _, y = run.curve("loss", x="step")
    # Rank 3 stopped after step 3: later steps average the three ranks still writing.
    assert y[2] == pytest.approx(last_losses(3, range(4)))
    assert y[5] == pytest.approx(last_losses(6, range(3)))


def test_empty_metrics_and_no_config_warn(tmp_path):
    (tmp_path / "r" / "metrics").mkdir(parents=True)
    run = load_run(tmp_path / "r")
    assert run.records == {} and run.config == {}
    assert any("no config.toml" in w for w in run.warnings)
    assert any("no metrics records" in w for w in run.warnings)
    assert run.curve("loss")[1].size == 0 and run.final("loss") is None


def test_load_runs_expands_a_folder_and_labels_by_differing_keys(sweep):
    runs = load_runs([sweep])
    assert [r.name for r in runs] == ["a-finished", "b-truncated", "c-missing-rank", "d-running"]
    # run_dir differs in every run and data/progress/threads are ignored: only q and drop_rate count.
    assert differing_keys(runs) == ["q", "drop_rate"]
    assert runs[0].label == "q=1, drop_rate=0" and runs[3].label == "q=2, drop_rate=0.1"
    assert len(load_runs([sweep / "a-finished", sweep, sweep / "a-finished"])) == 4  # no duplicates


def test_a_key_missing_from_a_config_is_unknown_not_different(sweep):
    old = sweep / "e-old-trainer"
    make_run(old.parent, old.name, q=1)
    config = (old / "config.toml").read_text().splitlines()
    (old / "config.toml").write_text("\n".join(l for l in config if not l.startswith("mlp_hidden")) + "\n")
    runs = load_runs([sweep / "a-finished", old])
    assert differing_keys(runs) == []
    assert runs[0].label.endswith("(a-finished)") and runs[1].label.endswith("(e-old-trainer)")


def test_single_run_label_names_the_algorithm(sweep):
    (run,) = load_runs([sweep / "a-finished"])
    assert run.label == "rps, q=1, tau=2, drop_rate=0"


@pytest.mark.parametrize("what", ["missing", "file", "empty"])
def test_not_a_run_directory_is_a_config_error(tmp_path, what):
    path = tmp_path / "x"
    if what == "file":
        path.write_text("hello")
    elif what == "empty":
        (path / "sub").mkdir(parents=True)
    with pytest.raises(ConfigError, match="x"):
        load_runs([path])


# -- tables ----------------------------------------------------------------------------------
def test_table_rows_grouped_and_valued(sweep):
    runs = load_runs([sweep])
    table = build_table(runs, target=0.75)
    assert table.keys == ["q", "drop_rate"]
    assert [(row["q"], row["drop_rate"]) for row in table.rows] == [(1, 0.0), (2, 0.0), (2, 0.1), (4, 0.0)]
    rows = {row["run"]: row for row in table.rows}

    a = rows["a-finished"]
    assert a["final_loss"] == pytest.approx(last_losses(12, range(4)))
    assert a["best_loss"] == pytest.approx(last_losses(12, range(4)))
    assert a["final_acc"] == pytest.approx(0.9) and a["best_acc"] == pytest.approx(0.9)
    assert a["final_acc_ranks"] == pytest.approx(0.9 - 0.05 + 0.015)
    # 0.75 is first reached at the second evaluation: step 8, epoch 2, 8 // TAU rounds.
    assert a["epochs_to_target"] == pytest.approx(2.0)
    assert a["rounds_to_target"] == pytest.approx(4)
    assert a["wall_s_to_target"] == pytest.approx(4.0 + 0.015)
    assert a["test_accuracy"] == 0.9 and a["bytes_sent"] == 24000 and a["status"] == FINISHED

    assert rows["c-missing-rank"]["epochs_to_target"] is None  # never reaches 0.75
    d = rows["d-running"]
    assert d["status"] == UNFINISHED and d["train_loss"] is None and d["test_accuracy"] is None
    assert d["final_acc"] == pytest.approx(0.5)  # its one evaluation, at step 4
    # No summary: totals come from the records of the last step (ranks 0-2 at step 6).
    assert d["bytes_sent"] == 3 * 3000 and d["arrival_realised"] == pytest.approx(0.9)
    assert d["final_loss"] == pytest.approx(last_losses(6, range(3)))


def test_default_target_is_a_fraction_of_the_best_final_accuracy(sweep):
    runs = load_runs([sweep])
    assert default_target(runs) == pytest.approx(0.9 * 0.9)
    rows = {row["run"]: row for row in build_table(runs).rows}
    assert rows["a-finished"]["rounds_to_target"] == pytest.approx(6)  # 0.9 >= 0.81 at step 12
    assert rows["b-truncated"]["rounds_to_target"] is None


# -- report ----------------------------------------------------------------------------------
def test_report_writes_tables_figures_and_report(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    args = argparse.Namespace(runs=[str(sweep)], out=str(out), target=None, x="epoch")
    assert report.run(args) == 0
    captured = capsys.readouterr()
    assert "| run | q | drop_rate |" in captured.out
    assert "truncated last line" in captured.err and "rank(s) 2 of 4" in captured.err
    assert "no summary.json" in captured.err

    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(
        [
            "loss_vs_epoch.png", "loss_vs_wall_s.png", "loss_vs_rounds.png", "accuracy_vs_epoch.png",
            "consensus_vs_epoch.png", "time_breakdown.png", "grad_diversity_vs_q.png",
        ]
    )
    for png in out.glob("*.png"):
        assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text()
    assert all(f"]({name})" in text for name in pngs)
    assert (out / "table.md").read_text() in text

    with open(out / "table.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["run"] for r in rows] == ["a-finished", "b-truncated", "d-running", "c-missing-rank"]
    assert rows[2]["train_loss"] == "-" and rows[2]["status"] == UNFINISHED
    assert float(rows[0]["final_loss"]) == pytest.approx(last_losses(12, range(4)))


def test_figures_without_data_are_skipped_with_a_note(tmp_path):
    # No summary either: its end-of-run evaluation would be a test accuracy to draw.
    run_dir = make_run(tmp_path, "noeval", acc=(0.5, 0.8, 0.9), summary=False)
    for f in (run_dir / "metrics").iterdir():  # drop the evaluation keys
        recs = [json.loads(line) for line in f.read_text().splitlines()]
        keep = ("test_accuracy", "avg_test_accuracy", "test_loss", "avg_test_loss")
        f.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in keep}) + "\n" for r in recs))
    figures = {f.name: f for f in make_figures(load_runs([run_dir]), tmp_path, x="rounds")}
    skipped = figures["accuracy_vs_rounds"]
    assert skipped.path is None and "test accuracy" in skipped.note
    assert figures["grad_diversity_vs_q"].path is None
    assert figures["loss_vs_rounds"].path.stat().st_size > 0


def test_bad_target_is_a_config_error(sweep, tmp_path):
    args = argparse.Namespace(runs=[str(sweep)], out=str(tmp_path / "o"), target=75.0, x="epoch")
    with pytest.raises(ConfigError, match="--target"):
        report.run(args)


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "hpcsgd", "report", *argv],
        capture_output=True, text=True, env=env, timeout=120,
    )


def test_cli_report_exit_codes(sweep, tmp_path):
    done = _cli(str(sweep / "a-finished"), str(sweep / "d-running"), "--out", str(tmp_path / "rep"))
    assert done.returncode == 0, done.stderr
    assert "| run |" in done.stdout and (tmp_path / "rep" / "report.md").is_file()

    bad = tmp_path / "not-a-run"
    bad.mkdir()
    done = _cli(str(bad), "--out", str(tmp_path / "rep2"))
    assert done.returncode == 2
    assert "not a run directory" in done.stderr and "Traceback" not in done.stderr


def test_analysis_imports_neither_torch_nor_mpi4py():
    code = (
        "import sys, hpcsgd.analysis.report, hpcsgd.analysis.plots, hpcsgd.analysis.tables; "
        "bad = [m for m in ('torch', 'mpi4py', 'matplotlib') if m in sys.modules]; "
        "sys.exit(f'imported at import time: {bad}' if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr


# -- groups of seeds -------------------------------------------------------------------------
SHIFTS = (0.0, 0.03, 0.09)  # seed s moves loss, accuracy and wall time by SHIFTS[s]


@pytest.fixture
def seeds(tmp_path: Path) -> Path:
    """Two configs (q=1, q=2) x three seeds, in folders whose run names repeat (s0, s1, s2)."""
    root = tmp_path / "seeds"
    for q in (1, 2):
        for s, shift in enumerate(SHIFTS):
            make_run(root / f"q{q}", f"s{s}", q=q, seed=s, shift=shift, grad_diversity=1.0 + q + s)
    return root


def test_runs_that_differ_only_in_seed_are_one_group(seeds):
    runs = load_runs([seeds])
    groups = group_runs(runs)
    assert [(g.label, g.n, g.seeds) for g in groups] == [("q=1", 3, "0-2"), ("q=2", 3, "0-2")]
    assert groups[0].legend == "q=1 (n=3)" and groups[0].status == FINISHED
    assert all(r.config["q"] == g.config["q"] for g in groups for r in g.runs)


def test_group_curve_is_the_mean_and_spread_over_seeds(seeds):
    (group, _) = group_runs(load_runs([seeds]))
    band = group_curve(group, "loss", x="epoch")
    assert np.allclose(band.x, np.arange(1, 13) / SPE)
    expected = [last_losses(s, range(4)) + np.mean(SHIFTS) for s in range(1, 13)]
    assert np.allclose(band.mean, expected)
    assert np.allclose(band.std, np.std(SHIFTS, ddof=1))
    assert np.allclose(band.hi - band.lo, max(SHIFTS) - min(SHIFTS))
    assert list(band.count) == [3] * 12


def test_group_curve_of_a_seed_that_stopped_early_counts_the_others(tmp_path):
    make_run(tmp_path, "s0", seed=0)
    make_run(tmp_path, "s1", seed=1, shift=0.2, steps=6, summary=False)
    (group,) = group_runs(load_runs([tmp_path]))
    band = group_curve(group, "loss", x="step")
    assert list(band.count) == [2] * 6 + [1] * 6
    assert band.mean[5] == pytest.approx(last_losses(6, range(4)) + 0.1)
    assert band.mean[11] == pytest.approx(last_losses(12, range(4)))
    assert group.status == f"1/2 {FINISHED}"


def test_table_gives_mean_and_sample_std_per_group(seeds, tmp_path):
    table = build_table(load_runs([seeds]), target=0.75)
    assert table.grouped and table.group_keys == ["q"] and len(table.rows) == 6
    q1 = table.groups[0]
    assert (q1["q"], q1["n"], q1["seeds"], q1["runs"]) == (1, 3, "0-2", "s0;s1;s2")
    assert q1["final_loss"] == pytest.approx(last_losses(12, range(4)) + np.mean(SHIFTS))
    assert q1["final_loss_std"] == pytest.approx(np.std(SHIFTS, ddof=1))
    assert q1["test_accuracy"] == pytest.approx(0.9 + np.mean(SHIFTS)) and q1["test_accuracy_n"] == 3
    assert q1["grad_diversity_inter"] == pytest.approx(2.0 + 1.0)  # 1 + q + seed, mean over seeds 0-2

    markdown = to_markdown(table)
    assert "| q | n | seeds | status |" in markdown
    std = f"{np.std(SHIFTS, ddof=1):.4f}"
    assert f"{0.9 + np.mean(SHIFTS):.4f} ± {std}" in markdown  # end test acc of q=1
    assert "| 1 | 3 | 0-2 | finished |" in markdown
    assert "mean ± sample std (ddof=1)" in markdown

    write_csv(table, tmp_path / "table.csv")
    write_runs_csv(table, tmp_path / "runs.csv")
    with open(tmp_path / "table.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["group"] for r in rows] == ["q=1", "q=2"]
    assert float(rows[1]["final_loss_std"]) == pytest.approx(np.std(SHIFTS, ddof=1))
    with open(tmp_path / "runs.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 6


def test_a_value_only_some_seeds_have_says_how_many(tmp_path):
    make_run(tmp_path, "s0", seed=0)
    make_run(tmp_path, "s1", seed=1, shift=0.1)
    make_run(tmp_path, "s2", seed=2, steps=6, summary=False)  # still running: no end figures
    table = build_table(load_runs([tmp_path]), target=0.75)
    (row,) = table.groups
    assert row["n"] == 3 and row["train_loss_n"] == 2
    assert row["train_loss"] == pytest.approx(0.75) and row["status"] == f"2/3 {FINISHED}"
    markdown = to_markdown(table)
    assert f"0.7500 ± {np.std([0.7, 0.8], ddof=1):.4f} (2/3)" in markdown
    assert "nothing but the seed" in markdown


def test_single_runs_are_not_grouped(sweep):
    table = build_table(load_runs([sweep]))
    assert not table.grouped and all(g["n"] == 1 for g in table.groups)
    assert "±" not in to_markdown(table) and "| run | q | drop_rate |" in to_markdown(table)


def test_report_of_seeds_draws_mean_lines_and_bands(seeds, tmp_path, capsys):
    out = tmp_path / "rep"
    args = argparse.Namespace(runs=[str(seeds)], out=str(out), target=None, x="epoch", band="std")
    assert report.run(args) == 0
    captured = capsys.readouterr()
    assert "6 run(s) in 2 group(s) of seeds" in captured.err and "±" in captured.out
    text = (out / "report.md").read_text()
    assert "- **q=1**: 3 runs, seeds 0-2" in text and "mean ± 1 sample std over seeds" in text
    with open(out / "runs.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 6
    groups = group_runs(load_runs([seeds]))
    for figure in (plots.plot_loss(groups, tmp_path, "epoch"), plots.plot_accuracy(groups, tmp_path, "epoch"),
                   plots.plot_consensus(groups, tmp_path, "epoch")):
        assert "q=1 (n=3)" in figure.legend and "q=2 (n=3)" in figure.legend, figure.name
        assert "line: mean; band: min-max over seeds" in figure.legend, figure.name
    assert "total: min-max over seeds" in plots.plot_time_breakdown(groups, tmp_path).legend
    assert "bars: min-max over seeds" in plots.plot_grad_diversity(groups, tmp_path).legend


@pytest.mark.parametrize("configs, seeds_per", [(10, 5), (50, 1)])
def test_legends_at_fifty_runs_name_groups_by_the_keys_that_differ(tmp_path, configs, seeds_per):
    """50 runs as 10 configs x 5 seeds (10 entries) or 50 configs (50 entries, in columns)."""
    for i in range(configs):
        for s in range(seeds_per):
            make_run(tmp_path, f"c{i}-s{s}", q=1 + i % 5, lr=0.1 * (1 + i // 5), seed=s, shift=0.01 * s)
    groups = group_runs(load_runs([tmp_path]))
    legend = plots.plot_loss(groups, tmp_path, "epoch").legend
    entries = [e for e in legend if e.startswith("q=")]
    assert len(entries) == configs
    assert all("seed" not in e and "tau" not in e and "drop_rate" not in e for e in entries)
    if seeds_per > 1:
        assert entries[0] == "q=1, lr=0.1 (n=5)" and legend[-1].startswith("line: mean; band:")
    else:
        assert entries[0] == "q=1, lr=0.1" and not any("band" in e for e in legend)
    # Own-model curves would double 10+ lines: left out, and the legend says so.
    assert any("own-model curves left out" in e for e in plots.plot_accuracy(groups, tmp_path, "epoch").legend)


def test_band_must_be_known(tmp_path):
    make_run(tmp_path, "a")
    with pytest.raises(ValueError, match="band"):
        make_figures(load_runs([tmp_path]), tmp_path, band="iqr")


# -- runs shorter than one evaluation period -------------------------------------------------
def test_a_run_shorter_than_eval_every_reads_its_end_of_run_evaluation(tmp_path, capsys):
    """3 steps with an evaluation every 4: no evaluation logged, only summary.json's."""
    run_dir = make_run(tmp_path, "short", steps=3, acc=(0.6,))
    (run,) = load_runs([run_dir])
    assert not run.has("avg_test_accuracy")
    steps, x, acc = run.eval_series("avg_test_accuracy", x="rounds")
    assert list(steps) == [3] and list(x) == [3 // TAU] and list(acc) == [0.6]

    table = build_table([run], target=0.5)
    row = table.rows[0]
    assert row["final_acc"] == pytest.approx(0.6) and row["best_acc"] == pytest.approx(0.6)
    assert row["final_acc_ranks"] == pytest.approx(0.56)
    assert row["epochs_to_target"] == pytest.approx(3 / SPE) and row["rounds_to_target"] == 1
    assert table.target_note.endswith("(given)")

    out = tmp_path / "rep"
    args = argparse.Namespace(runs=[str(run_dir)], out=str(out), target=None, x="epoch")
    assert report.run(args) == 0
    text = (out / "report.md").read_text() + capsys.readouterr().err
    assert "eval_every" not in text and "accuracy_vs_epoch.png" in text


def test_end_of_run_evaluation_is_not_repeated_when_the_last_step_evaluated(sweep):
    run = load_run(sweep / "a-finished")
    steps, _, acc = run.eval_series("avg_test_accuracy", x="step")
    assert list(steps) == [4, 8, 12] and np.allclose(acc, [0.5, 0.8, 0.9])


def test_table_columns_say_which_loss_and_which_model(sweep):
    markdown = to_markdown(build_table(load_runs([sweep])))
    for header in ("batch loss (last)", "test acc (last eval)", "own test acc (last eval)", "end train loss"):
        assert f"| {header} |" in markdown or f" {header} |" in markdown
    assert "`done:` line" in markdown and "whole train and test splits" in markdown


# -- gradient diversity: both measures, from records or summary.json -------------------------
def test_both_diversity_measures_are_read_from_records_or_summary(tmp_path):
    intra = make_run(tmp_path, "intra", q=2)
    for f in (intra / "metrics").iterdir():
        recs = [json.loads(line) for line in f.read_text().splitlines()]
        f.write_text("".join(json.dumps({**r, "grad_diversity_intra": 0.25, "grad_diversity_inter": 2.0}) + "\n"
                             for r in recs))
    summary_only = make_run(tmp_path, "summary", q=4)
    summ = json.loads((summary_only / "summary.json").read_text())
    summ.update(grad_diversity_intra=0.8, grad_diversity_inter=0.4, skipped_steps=3)
    (summary_only / "summary.json").write_text(json.dumps(summ))
    runs = load_runs([tmp_path])
    assert [diversity(r, "intra") for r in runs] == [0.25, 0.8]
    assert [diversity(r, "inter") for r in runs] == [2.0, 0.4]

    markdown = to_markdown(build_table(runs))
    assert "grad diversity (intra)" in markdown and "skipped steps" in markdown
    figure = plots.plot_grad_diversity(group_runs(runs), tmp_path)
    assert figure.path is not None and "intra" in figure.note and "inter" in figure.note


def test_optional_columns_stay_out_when_no_run_has_them(tmp_path):
    make_run(tmp_path, "a")
    markdown = to_markdown(build_table(load_runs([tmp_path])))
    assert "grad diversity" not in markdown and "skipped steps" not in markdown
