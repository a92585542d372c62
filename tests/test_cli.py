"""The command line as a user meets it: help texts, shard summary, a short job."""

from __future__ import annotations

import json

from launch import hpcsgd, mpi


def test_help_lists_subcommands_and_flags():
    top = hpcsgd("--help")
    assert top.returncode == 0
    for sub in ("shard", "train", "report"):
        assert sub in top.stdout
    train = hpcsgd("train", "--help")
    assert train.returncode == 0
    for flag in ("--algorithm", "--q", "--tau", "--drop-rate", "--fail", "--resume", "averaging period"):
        assert flag in train.stdout


def test_shard_then_train_writes_run_directory(tmp_path):
    shard = hpcsgd("shard", "--source", "digits", "--parts", 2, "--partition", "label", "--out", tmp_path / "s")
    assert shard.returncode == 0, shard.stderr
    assert "wrote 2 chunks" in shard.stdout + shard.stderr
    run = tmp_path / "run"
    cfg = tmp_path / "job.toml"
    cfg.write_text('algorithm = "local"\ntau = 2\nsteps = 6\nlr = 0.05\n')
    result = mpi(2, "train", cfg, "--data", tmp_path / "s", "--run-dir", run, "--q", 2, "--lr", 0.1, "--progress", "lines")
    assert result.returncode == 0, result.stderr
    assert "step 6/6" in result.stderr
    # Each printed loss says whose it is: rank 0's batches, or the averaged model's on the train set.
    assert "loss (rank 0 batches, last window)" in result.stderr
    assert "averaged model: train loss" in result.stderr and "(full train set)" in result.stderr
    summary = json.loads((run / "summary.json").read_text())
    for key in ("algorithm", "ranks", "q", "tau", "drop_rate", "steps", "epochs", "rounds", "wall_s",
                "bytes_sent", "bytes_saved", "arrival_realised", "live_ranks", "coverage", "train_loss",
                "test_accuracy", "train_loss_rank_mean", "test_accuracy_rank_mean", "consensus_distance"):
        assert key in summary, key
    assert summary["q"] == 2 and summary["ranks"] == 2 and summary["rounds"] == 3
    resolved = (run / "config.toml").read_text()
    assert "lr = 0.1" in resolved and "tau = 2" in resolved  # the flag won over the file
    records = [json.loads(line) for line in (run / "metrics" / "rank-1.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6


def test_list_and_optional_flags_parse():
    from hpcsgd.cli import build_parser

    args = build_parser().parse_args(
        ["train", "job.toml", "--fail", "3@500", "1@20", "--mlp-hidden", "64", "32", "--drop-rate-phase2", "0.2", "--nesterov"]
    )
    assert args.config == "job.toml"
    assert args.fail == ["3@500", "1@20"] and args.mlp_hidden == [64, 32]
    assert args.drop_rate_phase2 == 0.2 and args.nesterov is True
