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
    match = re.search(r"(\d+) steps, (\d+) rounds, arrival ([0-9.]+), test accuracy \(mean over ranks\) ([0-9.]+)", proc.stdout)
    assert match, proc.stdout
    steps, rounds, arrival, accuracy = int(match[1]), int(match[2]), float(match[3]), float(match[4])
    assert steps == rounds == 4 * 32  # RPS tau 1: a round every step; 4 epochs of ceil(2000/4/16) steps
    assert 0.8 < arrival < 0.97  # 10% drop rate
    assert accuracy > 0.5  # five classes: chance is 0.2
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
