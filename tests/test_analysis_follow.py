"""`hpcsgd report --follow`: a running job's metrics read as they grow; the labelled progress
and done lines of `hpcsgd train` (serial)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hpcsgd.analysis.follow import CLEAR, Follower, RankTail, duration, follow, header_line
from hpcsgd.cli import done_line
from hpcsgd.progress import Progress

REPO = Path(__file__).resolve().parents[1]
RANKS = 2
SPE = 5  # steps per epoch of the synthetic job
SUMMARY = {"steps": 10, "rounds": 5, "wall_s": 2.5, "train_loss": 0.4321, "test_accuracy": 0.8765}


def line(rank: int, step: int, **extra) -> str:
    rec = {"step": step, "epoch": step / SPE, "loss": 2.0 - 0.1 * step + 0.1 * rank, "lr": 0.05,
           "wall_s": 0.25 * step, "rounds": step // 2, "live_ranks": RANKS, "consensus_distance": 0.5 / step,
           **extra}
    return json.dumps(rec) + "\n"


def start_job(run_dir: Path, epochs: float = 2.0) -> list:
    """A run directory as `hpcsgd train` starts it: config.toml and empty rank files."""
    (run_dir / "metrics").mkdir(parents=True)
    (run_dir / "config.toml").write_text(f'algorithm = "local"\nq = 2\ntau = 2\nepochs = {epochs}\nsteps = 0\n')
    return [open(run_dir / "metrics" / f"rank-{r}.jsonl", "w") for r in range(RANKS)]


def write_steps(files: list, steps, torn: bool = False) -> None:
    """Every rank logs ``steps``; ``torn`` leaves rank 1's last line half written."""
    for step in steps:
        for rank, fh in enumerate(files):
            text = line(rank, step, **({"avg_test_accuracy": 0.1 * step} if step % SPE == 0 else {}))
            fh.write(text[: len(text) // 2] if torn and rank == 1 and step == steps[-1] else text)
            fh.flush()


def finish_line(files: list, step: int) -> None:
    text = line(1, step, **({"avg_test_accuracy": 0.1 * step} if step % SPE == 0 else {}))
    files[1].write(text[len(text) // 2:])
    files[1].flush()


def rows_of(output: str) -> list[str]:
    """The step column of each table row ("4/10") in the order printed."""
    return [ln.split()[0] for ln in output.splitlines() if ln.strip() and ln.split()[0].count("/") == 1
            and ln.split()[0].split("/")[0].isdigit()]


# -- reading files as they grow --------------------------------------------------------------
def test_rank_tail_waits_for_a_torn_line_and_skips_garbage(tmp_path):
    path = tmp_path / "rank-0.jsonl"
    tail = RankTail(path)
    assert tail.read() == ([], False)  # not there yet
    full = line(0, 1)
    path.write_text(full + full[:10])
    records, restart = tail.read()
    assert [r["step"] for r in records] == [1] and restart
    with open(path, "a") as fh:
        fh.write(full[10:] + "not json\n")
    records, restart = tail.read()
    assert [r["step"] for r in records] == [1] and not restart and tail.bad == 1


def test_a_rewritten_file_is_read_again_from_its_start(tmp_path):
    """A resume rewrites the rank files through a new file, dropping lines after its checkpoint."""
    path = tmp_path / "rank-0.jsonl"
    path.write_text(line(0, 1) + line(0, 2) + line(0, 3))
    tail = RankTail(path)
    assert len(tail.read()[0]) == 3
    tmp = tmp_path / "new"
    tmp.write_text(line(0, 1) + line(0, 2) + line(0, 3, loss=9.0) + line(0, 4))
    os.replace(tmp, path)
    records, restart = tail.read()
    assert restart and [r["step"] for r in records] == [1, 2, 3, 4] and records[2]["loss"] == 9.0


def test_follower_rows_are_rank_means_of_whole_steps(tmp_path):
    files = start_job(tmp_path)
    write_steps(files, [1, 2])
    files[0].write(line(0, 3))  # rank 1 has not logged step 3 yet
    files[0].flush()
    f = Follower(tmp_path)
    f.poll()
    assert f.complete_steps() == [1, 2]
    row = f.row(2)
    assert row["loss"] == pytest.approx(2.0 - 0.2 + 0.05) and row["live_ranks"] == RANKS
    assert f.total_steps() == 10  # epochs 2 x (step / epoch = 5)
    files[1].write(line(1, 3))
    files[1].flush()
    f.poll()
    assert f.complete_steps() == [1, 2, 3]


def test_a_failed_rank_does_not_hold_back_the_table(tmp_path):
    files = start_job(tmp_path)
    write_steps(files, [1])
    # Rank 1 failed: rank 0 goes on alone and says one rank is live.
    files[0].write(line(0, 2, live_ranks=1))
    files[0].flush()
    f = Follower(tmp_path)
    f.poll()
    assert f.complete_steps() == [1, 2]


# -- the views -------------------------------------------------------------------------------
def test_follow_prints_each_step_once_as_the_files_grow(tmp_path):
    """Not a terminal: rows appended in step order; a torn line waits for its end."""
    files = start_job(tmp_path)
    plan = [
        lambda: write_steps(files, [1, 2, 3], torn=True),
        lambda: (finish_line(files, 3), write_steps(files, [4, 5])),
        lambda: None,  # a poll that finds nothing new prints nothing
        lambda: write_steps(files, range(6, 11)),
        lambda: (tmp_path / "summary.json").write_text(json.dumps(SUMMARY)),
    ]
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        plan[len(sleeps) - 1]()

    out = io.StringIO()
    assert follow(tmp_path, 0.5, out=out, tty=False, sleep=sleep) is True
    text = out.getvalue()
    assert rows_of(text) == [f"{s}/10" for s in range(1, 11)]
    assert sleeps == [0.5] * 5
    assert "following" in text and "local, q=2, tau=2" in text
    assert "batch loss" in text.splitlines()[1] and "test acc" in text
    # The header is as wide as the rows: printed once the total (10 steps) is known.
    assert text.splitlines()[2] == header_line(10) and len(header_line(10)) == len(text.splitlines()[3])
    row5 = next(ln for ln in text.splitlines() if ln.split()[0] == "5/10").split()
    assert row5[1] == "50.0%" and row5[2] == "1.00" and float(row5[3]) == pytest.approx(1.55)
    assert row5[5] == "0.5000"  # the averaged model's test accuracy at the evaluation step
    assert text.rstrip().splitlines()[-1] == (
        "finished: 10 steps, 5 rounds, 2.5s; averaged model: train loss 0.4321 (full train set), "
        "test accuracy 0.8765"
    )


def test_follow_on_a_terminal_redraws_the_screen(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("LINES", "12")
    files = start_job(tmp_path)
    write_steps(files, range(1, 9))
    plan = [lambda: (tmp_path / "summary.json").write_text(json.dumps(SUMMARY))]
    out = io.StringIO()
    assert follow(tmp_path, 1.0, out=out, tty=True, sleep=lambda s: plan.pop(0)()) is True
    screens = out.getvalue().split(CLEAR)[1:]
    assert len(screens) == 2
    first = screens[0]
    assert "[" + "#" * 24 + "-" * 6 + "]  8/10 steps (80.0%)" in first and "epoch 1.60/2" in first
    assert "wall 2.0s" in first and "eta 0.5s" in first
    assert "last evaluation: step 5, test accuracy 0.5000 (averaged model)" in first and "ranks (rank@latest step): 0@8 1@8" in first
    # 12 lines of terminal: the latest rows that fit under the header, not all eight.
    assert rows_of(first)[-1] == "8/10" and len(rows_of(first)) < 8
    assert screens[1].rstrip().endswith("test accuracy 0.8765")


def test_follow_waits_for_a_job_that_has_not_written_yet(tmp_path):
    run_dir = tmp_path / "run"  # not even created: the job is still queued
    plan = [
        lambda: write_steps(start_job(run_dir), [1, 2]),
        lambda: (run_dir / "summary.json").write_text(json.dumps(SUMMARY)),
    ]
    out = io.StringIO()
    assert follow(run_dir, 0.1, out=out, tty=False, sleep=lambda s: plan.pop(0)()) is True
    assert rows_of(out.getvalue()) == ["1/10", "2/10"]


def test_ctrl_c_stops_following_without_an_error(tmp_path, capsys):
    start_job(tmp_path)

    def interrupt(seconds):
        raise KeyboardInterrupt

    assert follow(tmp_path, 0.1, out=io.StringIO(), tty=False, sleep=interrupt) is False
    assert "stopped following" in capsys.readouterr().err


@pytest.mark.parametrize("seconds, text", [(0.46, "0.5s"), (42.4, "42s"), (187, "3m07s"), (7500, "2h05m")])
def test_durations_read_at_a_glance(seconds, text):
    assert duration(seconds) == text


# -- the command line ------------------------------------------------------------------------
def _report(*argv, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "hpcsgd", "report", *map(str, argv)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_cli_follow_a_job_written_while_it_runs(tmp_path):
    """A writer thread logs steps (a torn line among them), then summary.json: exit 0, every
    step printed once; --out writes the report once the run has ended."""
    run_dir = tmp_path / "run"
    files = start_job(run_dir)
    proc = _report("--follow", run_dir, "--interval", 0.05, "--out", tmp_path / "rep")

    def job():
        for first in range(1, 11, 3):
            steps = list(range(first, min(first + 3, 11)))
            write_steps(files, steps, torn=True)
            time.sleep(0.1)
            finish_line(files, steps[-1])
            time.sleep(0.1)
        (run_dir / "summary.json").write_text(json.dumps(SUMMARY))

    writer = threading.Thread(target=job)
    writer.start()
    out, err = proc.communicate(timeout=120)
    writer.join()
    assert proc.returncode == 0, err
    assert rows_of(out) == [f"{s}/10" for s in range(1, 11)]
    assert "finished: 10 steps" in out
    assert (tmp_path / "rep" / "report.md").is_file() and "Traceback" not in err


def test_cli_follow_ctrl_c_exits_zero(tmp_path):
    run_dir = tmp_path / "run"
    write_steps(start_job(run_dir), [1, 2])
    proc = _report("--follow", run_dir, "--interval", 0.05)
    first = proc.stdout.readline()  # the "following ..." line: it is running
    assert first.startswith("following")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped following" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["A", "B", "--follow"], "--follow watches one run directory, got 2"),
        (["A", "--follow", "--interval", "0"], "--interval must be > 0"),
        (["SWEEP", "--follow"], "holds 1 run directories"),
        (["MISSING/run", "--follow"], "does not exist, nor does its parent"),
        (["A/config.toml", "--follow"], "is not a directory"),
        (["A"], "--out REPORT_DIR is required"),
    ],
)
def test_cli_follow_bad_input_exits_2(tmp_path, argv, message):
    for name in ("A", "B", "SWEEP/one"):
        start_job(tmp_path / name)
    argv = [str(tmp_path / a) if a[0].isupper() else a for a in argv]
    proc = _report(*argv)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert message in err and "Traceback" not in err


# -- the numbers `hpcsgd train` prints say which loss they are -------------------------------
def test_progress_lines_label_rank_0_batch_loss(capsys):
    progress = Progress("lines", total=4)
    rec = {"epoch": 1.0, "loss": 0.1410, "rounds": 2, "live_ranks": 4, "wall_s": 1.0, "avg_test_accuracy": 0.9}
    progress.update(4, rec)
    err = capsys.readouterr().err
    assert "step 4/4 epoch 1.00 loss (rank 0 batches, last window) 0.1410 test acc (averaged model) 0.900" in err


def test_done_line_says_averaged_model_on_the_full_train_set():
    text = done_line({**SUMMARY, "steps": 460, "rounds": 57, "wall_s": 26.7, "train_loss": 0.1448}, "runs/a")
    assert text == (
        "done: 460 steps, 57 rounds, 26.7s; averaged model: train loss 0.1448 (full train set), "
        "test accuracy 0.8765 -> runs/a/summary.json"
    )
