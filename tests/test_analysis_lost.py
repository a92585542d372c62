"""`hpcsgd report` never mixes runs that differ in what changes results, flags repeated seeds,
survives identical runs and diverged losses, and its --follow, --out and --interval end in a
clear line (serial)."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hpcsgd.analysis import load_runs
from hpcsgd.analysis.follow import follow, format_row
from hpcsgd.analysis.runs import aggregate, group_runs
from hpcsgd.analysis.tables import build_table, to_markdown

from diskfull import tmpfs
from test_analysis_report import make_run

REPO = Path(__file__).resolve().parents[1]


def _report(*argv, timeout=60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "hpcsgd", "report", *map(str, argv)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _set_summary(run: Path, **values) -> None:
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, **values}))


def _clean_exit_2(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    return done.stderr


def test_runs_on_other_data_or_world_size_are_never_one_group(tmp_path):
    """The issue's case: a 4-rank run on d4 and a 1-rank run on other shards, both seed 0."""
    a = make_run(tmp_path, "four", steps=12)
    b = make_run(tmp_path, "one", ranks=1, steps=12)
    _set_summary(a, shards={"digest": "5d1c0000aaaa", "partition": "label"}, partition="label", world_size=4)
    _set_summary(b, shards={"digest": "93fa0000bbbb", "partition": "iid"}, partition="iid", world_size=1)
    runs = load_runs([tmp_path])
    groups = group_runs(runs)
    assert [g.n for g in groups] == [1, 1]
    markdown = to_markdown(build_table(runs))
    assert "nothing but the seed" not in markdown and "data_digest" in markdown and "world_size" in markdown


def test_a_crashed_run_reads_its_data_digest_from_its_newest_checkpoint(tmp_path):
    run = make_run(tmp_path, "crashed", summary=False, steps=6)
    (run / "checkpoints" / "step-00000004").mkdir(parents=True)
    record = {"step": 4, "ranks": 4, "shards": {"digest": "abcd", "partition": "label"}}
    (run / "checkpoints" / "step-00000004" / "COMPLETE").write_text(json.dumps(record))
    (loaded,) = load_runs([run])
    assert loaded.config["data_digest"] == "abcd" and loaded.config["partition"] == "label"
    assert loaded.config["world_size"] == 4


def test_a_key_that_changes_results_separates_groups_and_one_that_does_not_never_does(tmp_path):
    make_run(tmp_path, "a", threads=1, eval_every=1.0, straggle=[])
    make_run(tmp_path, "b", threads=4, eval_every=0.5, seed=1, straggle=[])  # neither changes results: seeds of one experiment
    make_run(tmp_path, "c", straggle=["1@2:0.1"])  # part of the trajectory's config: its own group
    groups = group_runs(load_runs([tmp_path]))
    assert sorted(g.n for g in groups) == [1, 2]


def test_repeated_seeds_are_flagged(tmp_path):
    make_run(tmp_path, "first")
    make_run(tmp_path, "again")
    runs = load_runs([tmp_path])
    (group,) = group_runs(runs)
    assert group.repeated_seeds == [0]
    markdown = to_markdown(build_table(runs))
    assert "0,0 (repeated: 0)" in markdown and "Repeated seeds" in markdown
    done = _report(tmp_path, "--out", tmp_path / "rep")
    assert done.returncode == 0, done.stderr
    assert "seed(s) 0 repeated in" in done.stderr and "Traceback" not in done.stderr


def test_seven_identical_runs_report_cleanly(tmp_path):
    for i in range(7):
        make_run(tmp_path / "runs", f"same{i}", seed=i % 1)
    done = _report(tmp_path / "runs", "--out", tmp_path / "rep", "--band", "std")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and (tmp_path / "rep" / "report.md").is_file()
    assert len(list((tmp_path / "rep").glob("*.png"))) >= 3
    mean, std, lo, hi = aggregate([0.1] * 7)
    assert (mean, std, lo, hi) == (0.1, 0.0, 0.1, 0.1)  # not 0.09999999999999999 +- 1.5e-17


def test_a_diverged_loss_keeps_the_table_readable(tmp_path):
    run = make_run(tmp_path, "diverged", steps=4)
    lines = [json.loads(x) for x in (run / "metrics" / "rank-0.jsonl").read_text().splitlines()]
    for rank in range(4):
        path = run / "metrics" / f"rank-{rank}.jsonl"
        path.write_text("".join(json.dumps({**r, "loss": 1.76004707353186278e29}) + "\n" for r in lines))
    markdown = to_markdown(build_table(load_runs([run])))
    assert "1.76e+29" in markdown and "176004707353186" not in markdown
    row = format_row({"step": 4.0, "loss": 1.76004707353186278e29, "wall_s": 3.0e12}, 10)
    assert "1.76e+29" in row and "3e+12" in row and len(row) == len(format_row({"step": 4.0, "loss": 1.0}, 10))


def _lock(run: Path, pid: int) -> None:
    record = {"pid": pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00", "ranks": 4}
    (run / ".hpcsgd.lock").write_text(json.dumps(record) + "\n")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_follow_ends_when_the_job_is_gone(tmp_path):
    run = make_run(tmp_path, "crashed", summary=False, steps=5)
    _lock(run, _dead_pid())
    done = _report("--follow", run, "--interval", "0.1", timeout=30)
    err = _clean_exit_2(done)
    assert f"stopped following {run}: its job is gone (pid" in err and "has exited) at step 5, without summary.json" in err
    assert "5/" in done.stdout  # the table up to the crash was shown


def test_follow_of_a_live_job_does_not_end_until_it_gives_up(tmp_path):
    run = make_run(tmp_path, "hung", summary=False, steps=3)
    _lock(run, os.getpid())  # alive
    clock = iter(range(0, 1000, 10))
    result = follow(run, 1.0, out=io.StringIO(), tty=False, sleep=lambda s: None, give_up_after=60,
                    clock=lambda: next(clock))
    assert isinstance(result, str) and "nothing changed in it, at step 3 for 1m00s (--give-up-after 60)" in result


def test_follow_a_directory_that_never_appears_gives_up(tmp_path):
    done = _report("--follow", tmp_path / "typo", "--interval", "0.2", "--give-up-after", "1", timeout=30)
    assert done.returncode == 2, done.stderr
    assert "its directory never appeared for" in done.stderr and "Traceback" not in done.stderr


def test_follow_sees_a_summary_written_just_before_the_job_exited(tmp_path):
    run = make_run(tmp_path, "done", summary=True, steps=4)
    _lock(run, _dead_pid())
    assert follow(run, 0.1, out=io.StringIO(), tty=False, sleep=lambda s: None) is True


@pytest.mark.parametrize("argv, message", [
    (["--interval", "1e308"], "--interval must be > 0 and at most 3600 seconds, got 1e+308"),
    (["--interval", "nan"], "--interval must be > 0 and at most 3600 seconds, got nan"),
    (["--give-up-after", "-1"], "--give-up-after must be a finite number of seconds > 0, got -1"),
    (["--give-up-after", "inf"], "--give-up-after must be a finite number of seconds > 0, got inf"),
])
def test_follow_times_out_of_range_exit_2(tmp_path, argv, message):
    run = make_run(tmp_path, "r", summary=False)
    assert message in _clean_exit_2(_report("--follow", run, *argv))


def test_a_read_only_out_is_one_line(tmp_path):
    run = make_run(tmp_path, "r")
    with tmpfs(tmp_path / "ro", "1m", "ro") as ro:
        err = _clean_exit_2(_report(run, "--out", ro / "rep"))
        assert f"--out {ro / 'rep'}: cannot create it: Read-only file system" in err
        err = _clean_exit_2(_report(run, "--out", ro))
        assert f"--out: cannot write {ro}/table.md: Read-only file system (needs " in err
