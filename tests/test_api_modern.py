"""A modern loop's needs on one process and as whole jobs: the watchdog for library loops, the
progress bar, TensorBoard export of a run directory, the argument checks."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import hpcsgd
from hpcsgd.comm.watchdog import WATCHDOG

from launch import BIN, ROOT, env, hpcsgd as hpcsgd_cli


class _Comm:
    def __init__(self, rank):
        self.rank, self.size = rank, 4


class _World:
    def __init__(self, rank):
        self.comm = _Comm(rank)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_bar_on_rank_0_of_a_terminal_and_the_iterable_itself_elsewhere(monkeypatch):
    loader = [1, 2, 3]
    assert hpcsgd.progress(loader, _World(1)) is loader  # other ranks
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert hpcsgd.progress(loader, _World(0)) is loader  # a batch job's log: no bar
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = hpcsgd.progress(loader, _World(0), desc="epoch 1")
    assert bar is not loader and list(bar) == loader
    bar.close()
    assert "epoch 1" in terminal.getvalue() and "3/3" in terminal.getvalue()


def test_progress_stays_a_function_after_the_cli_imported_its_module():
    import hpcsgd.progress as module  # noqa: F401  (what the CLI's training loop does)

    assert callable(hpcsgd.progress) and hpcsgd.progress.__name__ == "progress"


@pytest.mark.parametrize("value", [-1, "10", float("nan"), True])
def test_init_checks_collective_timeout(value):
    with pytest.raises(hpcsgd.ConfigError, match="collective_timeout must be a number of seconds >= 0"):
        hpcsgd.init(device="cpu", collective_timeout=value)


def test_init_arms_the_watchdog_with_the_clis_default_and_a_later_call_changes_it():
    from hpcsgd.config import TrainConfig

    hpcsgd.init(device="cpu")
    assert WATCHDOG.timeout == TrainConfig.collective_timeout == 600.0
    try:
        hpcsgd.init(device="cpu", collective_timeout=20)
        assert WATCHDOG.timeout == 20.0
    finally:
        hpcsgd.init(device="cpu", collective_timeout=TrainConfig.collective_timeout)


UNEVEN = textwrap.dedent("""
    import sys, time, torch, hpcsgd
    world = hpcsgd.init(device="cpu", collective_timeout=20)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = hpcsgd.SyncSGD(model, opt, world)
    steps = 3 + (world.rank == 0)  # a sampler that gives rank 0 one batch more
    for step in range(steps):
        if step == 3:
            print(f"hang from {time.time()}", flush=True)
        opt.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        strategy.step()
    print(f"rank {world.rank} done", flush=True)
""")


@pytest.mark.slow
def test_one_step_more_on_rank_0_ends_the_job_with_the_watchdogs_message(tmp_path):
    script = tmp_path / "uneven.py"
    script.write_text(UNEVEN)
    proc = subprocess.run([str(BIN / "mpiexec"), "-n", "4", sys.executable, "-m", "mpi4py", str(script)],
                          capture_output=True, text=True, timeout=300, env=env(), cwd=ROOT)
    ended = time.time()
    assert proc.returncode != 0, proc.stdout + proc.stderr
    hang = re.search(r"hang from ([0-9.]+)", proc.stdout)
    assert hang, proc.stdout + proc.stderr
    waited = ended - float(hang[1])
    assert 20 <= waited < 60, (waited, proc.stderr)  # the timeout, the watchdog's tick and grace, the abort
    message = re.search(r"hpcsgd: error: collective timeout: (\S+ \[[^\]]+\]) in step 4 did not complete within 20 s: "
                        r"rank\(s\) 1, 2, 3 did not arrive", proc.stderr)
    assert message, proc.stderr
    assert message[1].startswith(("Allreduce", "Iallreduce")) and "hpcsgd.init(collective_timeout=S)" in proc.stderr


def _run_dir(path: Path) -> Path:
    """A two-rank run directory as RunLog writes it: records per rank, a summary."""
    (path / "metrics").mkdir(parents=True)
    (path / "config.toml").write_text('# hpcsgd.RunLog\nalgorithm = "local"\nq = 2\n')
    for rank in range(2):
        lines = [json.dumps({"step": s, "epoch": s / 10, "loss": 1.0 / s + rank, "wall_s": 0.1 * s,
                             "avg_test_accuracy": 0.5 + s / 100, "rounds": s // 2, "live_ranks": 2})
                 for s in (10, 20, 30)]
        (path / "metrics" / f"rank-{rank}.jsonl").write_text("\n".join(lines) + "\n")
    (path / "summary.json").write_text(json.dumps({"algorithm": "local", "steps": 30, "test_accuracy": 0.9,
                                                   "ranks": 2, "coverage": 1.0}))
    return path


def test_report_tensorboard_writes_event_files_tensorboard_reads(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = [_run_dir(tmp_path / "a" / "run"), _run_dir(tmp_path / "b" / "run")]  # two runs of one name
    out = tmp_path / "tb"
    result = hpcsgd_cli("report", *runs, "--tensorboard", out)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["run", "run-2"]
    events = EventAccumulator(str(out / "run"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "epoch", "wall_s", "avg_test_accuracy", "rounds", "live_ranks"} <= tags
    assert {"summary/test_accuracy", "summary/coverage", "summary/ranks"} <= tags
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [10, 20, 30]
    assert [e.value for e in loss] == pytest.approx([1.0 / s + 0.5 for s in (10, 20, 30)])  # the rank mean
    assert [(e.step, e.value) for e in events.Scalars("summary/test_accuracy")] == [(30, pytest.approx(0.9))]
    both = hpcsgd_cli("report", runs[0], "--tensorboard", tmp_path / "tb2", "--out", tmp_path / "report")
    assert both.returncode == 0 and (tmp_path / "report" / "report.md").exists(), both.stderr


def test_report_tensorboard_onto_a_file_is_a_clear_error(tmp_path):
    run = _run_dir(tmp_path / "run")
    (tmp_path / "file").write_text("")
    result = hpcsgd_cli("report", run, "--tensorboard", tmp_path / "file")
    assert result.returncode == 2 and "--tensorboard" in result.stderr and "not a directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_strategy_resize_carries_a_uniform_drop_rate_and_refuses_per_link_rates():
    world = hpcsgd.init(device="cpu")
    from hpcsgd.world import World

    run = World(world.comm, 0, 3, 0, 1, torch.device("cpu"), (0,))
    model = torch.nn.Linear(2, 2)
    rps = hpcsgd.RPS(model, torch.optim.SGD(model.parameters(), lr=0.1), world, drop_rate=0.2)
    rps.resize(run)
    assert rps.world is run and rps.live_ranks == [0] and rps.rates.phase1.shape == (3, 3)
    assert rps.rates.phase1[0, 2] == 0.2 and rps.rates.phase1[1, 1] == 0.0
    from hpcsgd.comm import LinkRates
    from hpcsgd.algorithms.links import resized_rates

    per_link = LinkRates.build(2, 0.1, rules=("0->1=0.5",))
    with pytest.raises(hpcsgd.ConfigError, match="per-link drop rates .* built for 2 ranks .* run of 4"):
        resized_rates(per_link, None, 4)
    phases = resized_rates(LinkRates.build(2, 0.1, phase2=0.3), None, 4)
    assert phases.phase1[3, 0] == 0.1 and phases.phase2[0, 3] == 0.3 and phases.phase2[2, 2] == 0.0
