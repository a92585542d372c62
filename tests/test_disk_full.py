"""A full disk anywhere a run writes ends every rank with exit 2 and one line naming the file and
the space it needed; nothing is left half-written; what was saved before resumes bit for bit;
a run that trained to its end keeps its figures. A real tmpfs (root only), as a user meets it."""

from __future__ import annotations

import io
import json
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from hpcsgd.checkpoint import read_part
from hpcsgd.errors import HpcsgdError, TrainingError
from hpcsgd.metrics import MetricsWriter

from diskfull import fill, leftovers, resize, tmpfs
from launch import hpcsgd, mpi

pytestmark = pytest.mark.slow

# The reproduction: digits in 4 label-skewed chunks, a 2 MiB tmpfs.
TRAIN = ["--batch-size", "16", "--epochs", "2", "--progress", "none"]
FIGURES = ("steps", "rounds", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "consensus_distance",
           "per_class_accuracy", "bytes_sent")


@pytest.fixture(scope="module")
def d4(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "d4"
    done = hpcsgd("shard", "--source", "digits", "--parts", "4", "--partition", "label", "--out", out, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def reference(d4, tmp_path_factory):
    """The run uninterrupted: what every recovery must end with."""
    run = tmp_path_factory.mktemp("reference") / "run"
    done = mpi(4, "train", "--data", d4, "--run-dir", run, *TRAIN, "--checkpoint-every", "5", timeout=300)
    assert done.returncode == 0, done.stderr
    return run


def _figures(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    return {k: summary[k] for k in FIGURES}


def _final_models(run: Path) -> list[np.ndarray]:
    final = sorted(run.glob("checkpoints/step-*/COMPLETE"))[-1].parent
    return [np.concatenate([v.reshape(-1).numpy() for v in read_part(final / f"rank-{r}.h5", "model").values()])
            for r in range(4)]


def _one_clean_error(err: str) -> str:
    assert "Traceback" not in err and "Segmentation" not in err, err
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(lines) == 1, err
    return lines[0]


def test_full_disk_at_a_periodic_checkpoint_exits_2_and_the_earlier_checkpoint_resumes_bit_for_bit(d4, reference,
                                                                                                     tmp_path):
    with tmpfs(tmp_path / "full", "2m") as full:
        run = full / "run"
        failed = mpi(4, "train", "--data", d4, "--run-dir", run, *TRAIN, "--checkpoint-every", "5", timeout=300)
        assert failed.returncode == 2, failed.stderr  # not 11 (libhdf5's teardown) nor an abort
        line = _one_clean_error(failed.stderr)
        assert "cannot write" in line and f"{run}/checkpoints/step-" in line and "No space left on device" in line
        assert "needs " in line and " free there" in line and "is intact: free space and rerun with --resume" in line
        assert leftovers(run) == []
        complete = sorted(run.glob("checkpoints/step-*/COMPLETE"))
        assert complete and all((d / "COMPLETE").exists() for d in run.glob("checkpoints/step-*"))
        assert not (run / "summary.json").exists()

        resize(full, "32m")  # the operator frees space
        resumed = mpi(4, "train", "--data", d4, "--run-dir", run, *TRAIN, "--checkpoint-every", "5", "--resume",
                      timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        assert "resuming" in resumed.stderr and "done:" in resumed.stderr
        assert _figures(run) == _figures(reference)
        assert all(np.array_equal(a, b) for a, b in zip(_final_models(run), _final_models(reference)))
        assert leftovers(run) == []


def test_full_disk_at_the_end_of_run_checkpoint_keeps_the_summary(d4, reference, tmp_path):
    """The summary is written before the final checkpoint: training done is never lost."""
    with tmpfs(tmp_path / "full", "2m") as full:
        fill(full, leave=200 * 1024)  # room for config, metrics and summary; not for 4 rank files
        run = full / "run"
        failed = mpi(4, "train", "--data", d4, "--run-dir", run, *TRAIN, timeout=300)
        assert failed.returncode == 2, failed.stderr
        line = _one_clean_error(failed.stderr)
        assert "checkpoint at step 46: cannot write" in line and "needs " in line, line
        assert f"the run trained to its end: its figures are in {run}/summary.json" in line
        assert _figures(run) == _figures(reference)
        assert leftovers(run) == [] and not list(run.glob("checkpoints/step-*"))


def test_full_disk_while_writing_metrics_ends_every_rank_with_whole_lines(d4, tmp_path):
    with tmpfs(tmp_path / "full", "2m") as full:
        fill(full, leave=64 * 1024)
        run = full / "run"
        failed = mpi(4, "train", "--data", d4, "--run-dir", run, *TRAIN, "--log-every", "1", timeout=300)
        assert failed.returncode == 2, failed.stderr
        line = _one_clean_error(failed.stderr)
        assert "metrics: cannot write" in line and "/metrics/rank-" in line and "No space left on device" in line
        assert "needs " in line, line
        for rank_file in run.glob("metrics/rank-*.jsonl"):
            text = rank_file.read_text()
            assert text == "" or text.endswith("\n"), rank_file  # no torn line
            [json.loads(x) for x in text.splitlines()]
        assert leftovers(run) == []


def test_a_metrics_line_that_does_not_fit_is_cut_back_and_named(tmp_path):
    with tmpfs(tmp_path / "full", "1m") as full:
        (full / "metrics").mkdir()
        writer = MetricsWriter(full, 0)
        writer.write({"step": 1, "loss": 1.0})
        fill(full, leave=0)
        with pytest.raises(TrainingError, match=r"cannot write .*rank-0.jsonl: No space left on device \(needs \d+ B"):
            for step in range(2, 10000):
                writer.write({"step": step, "loss": 1.0, "pad": "x" * 512})
        writer.close()
        lines = (full / "metrics" / "rank-0.jsonl").read_text().splitlines()
        assert all(json.loads(x)["loss"] == 1.0 for x in lines)


def test_a_summary_that_does_not_fit_is_printed_and_named(tmp_path):
    from mpi4py import MPI

    from hpcsgd.train.totals import write_summary

    with tmpfs(tmp_path / "full", "1m") as full:
        fill(full, leave=0)
        summary = {"steps": 46, "train_loss": 0.25, "test_accuracy": 0.9, "pad": "x" * 8192}
        printed = io.StringIO()
        with redirect_stdout(printed), pytest.raises(HpcsgdError) as info:
            write_summary(MPI.COMM_SELF, full, summary)
        message = str(info.value)
        assert message.startswith(f"summary: cannot write {full}/summary.json: No space left on device (needs 8.")
        assert "its summary is printed on stdout" in message
        assert json.loads(printed.getvalue()) == summary
        assert leftovers(full) == [] and not (full / "summary.json").exists()


def test_report_onto_a_full_disk_exits_2_naming_the_file(reference, tmp_path):
    with tmpfs(tmp_path / "full", "1m") as full:
        fill(full, leave=0)
        done = hpcsgd("report", reference, "--out", full / "rep", timeout=120)
        assert done.returncode == 2, done.stderr
        line = _one_clean_error(done.stderr)
        assert f"--out: cannot write {full}/rep/" in line and "No space left on device (needs " in line, line
        assert leftovers(full) == []


def test_a_run_started_on_a_full_disk_exits_2_naming_the_file(d4, tmp_path):
    with tmpfs(tmp_path / "full", "1m") as full:
        fill(full, leave=0)
        failed = mpi(4, "train", "--data", d4, "--run-dir", full / "run", *TRAIN, timeout=300)
        assert failed.returncode == 2, failed.stderr
        line = _one_clean_error(failed.stderr)
        assert f"cannot write {full}/run/" in line and "No space left on device" in line, line
        assert leftovers(full) == []
