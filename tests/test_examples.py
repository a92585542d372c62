"""The scripts in jobs/examples run under ``mpiexec -n 4`` as the README shows them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch import ROOT, env, hpcsgd

EXAMPLES = ROOT / "jobs" / "examples"


def _mpi_script(script: Path, *args: str):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    cmd = [str(mpiexec), "-n", "4", sys.executable, "-m", "mpi4py", str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env(), cwd=ROOT)


@pytest.mark.slow
def test_own_loop_example_writes_a_run_directory_report_reads(tmp_path):
    run_dir = tmp_path / "own-loop"
    proc = _mpi_script(EXAMPLES / "own_loop.py", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"(\d+) steps, (\d+) rounds, arrival ([0-9.]+), test accuracy \(mean over ranks\) ([0-9.]+), "
                      r"of the averaged model ([0-9.]+)", proc.stdout)
    assert match, proc.stdout
    steps, rounds, arrival, accuracy = int(match[1]), int(match[2]), float(match[3]), float(match[4])
    assert steps == rounds == 4 * 32  # RPS tau 1: a round every step; 4 epochs of ceil(2000/4/16) steps
    assert 0.8 < arrival < 0.97  # 10% drop rate
    assert accuracy > 0.5  # five classes: chance is 0.2
    assert float(match[5]) > 0.5
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algorithm"] == "rps" and summary["ranks"] == 4 and summary["q"] == 2
    for rank in range(4):
        lines = (run_dir / "metrics" / f"rank-{rank}.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [32, 64, 96, 128]
    report = hpcsgd("report", run_dir, "--out", tmp_path / "report")
    assert report.returncode == 0, report.stderr
    assert "own-loop" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.slow
def test_wrapped_loop_example_averages_every_8_steps():
    proc = _mpi_script(EXAMPLES / "wrap_local_sgd.py")
    assert proc.returncode == 0, proc.stderr
    epochs = re.findall(r"epoch (\d): loss ([0-9.]+), replicas' spread ([0-9.e+-]+), (\d+) rounds", proc.stdout)
    assert [int(e[0]) for e in epochs] == [1, 2, 3], proc.stdout
    # 35 steps an epoch (ceil(4096 / 4 / 30)): a round every 8 steps.
    assert [int(e[3]) for e in epochs] == [35 // 8, 70 // 8, 105 // 8]
    assert float(epochs[-1][1]) < float(epochs[0][1])  # it learns
    assert float(epochs[0][2]) > 0  # epochs end between rounds: the replicas differ there


def _modern(run_dir: Path, *args: str, n: int = 4):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    cmd = [str(mpiexec), "-n", str(n), sys.executable, "-m", "mpi4py", str(EXAMPLES / "modern_loop.py"),
           str(run_dir), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


DONE = re.compile(r"done: (\d+) steps on (\d+) of (\d+) ranks, coverage ([0-9.]+), final train loss (\S+), "
                  r"test accuracy ([0-9.]+)")


@pytest.mark.slow
def test_modern_loop_stopped_after_epoch_2_and_resumed_equals_an_uninterrupted_run(tmp_path):
    """SyncSGD, AdamW, warm-up + cosine, accumulation, clipping, bf16, workers: bit for bit."""
    args = ("--strategy", "sync", "--epochs", "3", "--train-size", "1000")
    whole = DONE.search(_modern(tmp_path / "whole", *args).stdout)
    stopped = _modern(tmp_path / "resumed", *args, "--stop-after", "2")
    assert "stopped after epoch 2 (step 32)" in stopped.stdout and not (tmp_path / "resumed" / "summary.json").exists()
    resumed = DONE.search(_modern(tmp_path / "resumed", *args).stdout)
    assert whole and resumed
    assert resumed[5] == whole[5]  # the final train loss, every digit of its repr
    assert resumed[1] == whole[1] == "48" and float(whole[6]) > 0.4  # five classes: chance is 0.2
    for rank in range(4):
        lines = (tmp_path / "resumed" / "metrics" / f"rank-{rank}.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert [r["epoch"] for r in records] == [1, 2, 3]  # every epoch once
        assert [r["step"] for r in records] == [16, 32, 48]
        assert records[2]["wall_s"] > records[1]["wall_s"]  # the wall time went on
        whole_records = [json.loads(line) for line in
                         (tmp_path / "whole" / "metrics" / f"rank-{rank}.jsonl").read_text().splitlines()]
        assert [r["loss"] for r in records] == [r["loss"] for r in whole_records]
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["ranks"] == summary["world_size"] == 4 and summary["coverage"] == 1.0


@pytest.mark.slow
def test_modern_loop_local_sgd_resumed_on_2_of_4_ranks_keeps_full_coverage(tmp_path):
    """LocalSGD, q = 2: 2 epochs on 4 ranks, then the job is requeued on 2 (the library's resume)."""
    args = ("--strategy", "local", "--epochs", "3", "--train-size", "1000")
    run = tmp_path / "run"
    _modern(run, *args, "--stop-after", "2")
    resumed = _modern(run, *args, n=2)
    assert "resuming a run of 4 ranks on 2 processes at step 32" in resumed.stderr
    assert "chunk 3 -> rank 0" in resumed.stderr and "coverage 100%" in resumed.stderr
    done = DONE.search(resumed.stdout)
    assert done and done[1] == "48" and (done[2], done[3], done[4]) == ("2", "4", "1.0")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["coverage"] == 1.0 and summary["live_ranks"] == 2 and summary["world_size"] == 2
    assert summary["ranks"] == 4 and summary["steps"] == 48 and summary["rounds"] == 48 // 8
    for rank in range(4):  # the departed ranks' records end at the checkpoint
        steps = [json.loads(line)["step"] for line in (run / "metrics" / f"rank-{rank}.jsonl").read_text().splitlines()]
        assert steps == ([16, 32, 48] if rank < 2 else [16, 32])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["sync", "local", "rps"])
def test_modern_loop_under_torch_compile(tmp_path, strategy):
    """torch.compile over the strategy's re-homed parameters. The aot_eager backend traces the
    model as inductor does (dynamo, AOT autograd) without generating C++, which takes minutes
    per rank on a busy CPU; its numbers are eager's, so the compiled loop must match bit for bit."""
    args = ("--strategy", strategy, "--epochs", "1", "--train-size", "256")
    compiled = DONE.search(_modern(tmp_path / "compiled", *args, "--compile", "aot_eager", n=2).stdout)
    eager = DONE.search(_modern(tmp_path / "eager", *args, n=2).stdout)
    assert compiled and eager and compiled[1] == "8"
    assert compiled[5] == eager[5]
