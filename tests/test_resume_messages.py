"""What `--resume` does is always said in one line, and never silently loses a run: a finished
run, a checkpoint without its COMPLETE record, a directory with no checkpoint, a config that
differs (named key by key), and a checkpoint edited by hand (every byte a resume reads is
covered by a checksum: a sampler position or the optimizer's lr in the JSON state attribute)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import pytest

import hpcsgd.analysis.runs as runs
import hpcsgd.checkpoint as ckpt
import hpcsgd.train.resume as resume
from hpcsgd.trajectory import NOT_TRAJECTORY

from helpers import synthetic_shards
from launch import mpi

pytestmark = pytest.mark.slow
DEADLINE = 30  # seconds, at 4 ranks, for a refused resume
FLAGS = ["--batch-size", "8", "--steps", "6", "--checkpoint-every", "3", "--progress", "none", "--mlp-hidden", "16"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory.mktemp("resume") / "p4", 4, "label", n_train=128, n_test=32)


@pytest.fixture(scope="module")
def finished(shards, tmp_path_factory):
    """A run trained to its end: checkpoints at steps 3 and 6, summary.json."""
    run = tmp_path_factory.mktemp("finished") / "run"
    done = _train(shards, run)
    assert done.returncode == 0 and "done:" in done.stderr, done.stderr
    return run


def _train(shards, run, *extra):
    return mpi(4, "train", "--data", shards, "--run-dir", run, *FLAGS, *extra, timeout=180)


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _lines(err: str, word: str = "--resume") -> list[str]:
    return [ln for ln in err.splitlines() if word in ln]


def _edit_state(path: Path, part: str, old: str, new: str) -> None:
    """Change one byte of a part's JSON state attribute, as an editor would (no checksum redone)."""
    assert len(old) == len(new)
    with h5py.File(path, "r+") as f:
        state = f[part].attrs["state"]
        assert state.count(old) == 1, state
        f[part].attrs["state"] = state.replace(old, new)


def test_resuming_a_finished_run_says_so_and_rewrites_nothing(shards, finished, tmp_path):
    run = _copy(finished, tmp_path)
    before = (run / "summary.json").read_bytes()
    stamp = (run / "summary.json").stat().st_mtime_ns
    done = _train(shards, run, "--resume")
    assert done.returncode == 0, done.stderr
    (line,) = _lines(done.stderr)
    assert f"{run} finished already (step 6 of 6" in line and "nothing to train, nothing rewritten" in line
    assert "done:" not in done.stderr and "Traceback" not in done.stderr
    assert (run / "summary.json").read_bytes() == before and (run / "summary.json").stat().st_mtime_ns == stamp


def test_a_checkpoint_without_its_complete_record_is_said_and_the_run_moved_aside(shards, finished, tmp_path):
    run = _copy(finished, tmp_path)
    (run / "summary.json").unlink()
    for complete in run.glob("checkpoints/step-*/COMPLETE"):
        complete.unlink()  # both writes "did not finish"
    done = _train(shards, run, "--resume")
    assert done.returncode == 0, done.stderr
    (line,) = _lines(done.stderr)
    assert "has no complete checkpoint (step-00000003, step-00000006 has no COMPLETE record" in line, line
    assert f"moved what it holds to {run}/replaced/" in line and "starting from step 0" in line
    (old,) = (run / "replaced").iterdir()  # nothing lost: the earlier run is kept whole
    assert sorted(p.name for p in (old / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    assert len(list((old / "metrics").glob("rank-*.jsonl"))) == 4
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


def test_a_newer_checkpoint_without_complete_record_is_named_when_resuming_an_older_one(shards, finished, tmp_path):
    run = _copy(finished, tmp_path)
    (run / "summary.json").unlink()
    (run / "checkpoints" / "step-00000006" / "COMPLETE").unlink()
    done = _train(shards, run, "--resume")
    assert done.returncode == 0, done.stderr
    (line,) = _lines(done.stderr)
    assert f"resuming {run} from step 3 of 6 (step-00000006 has no COMPLETE record" in line, line


def test_resume_into_a_directory_without_a_checkpoint_says_it_starts_from_scratch(shards, tmp_path):
    done = _train(shards, tmp_path / "typo", "--resume")
    assert done.returncode == 0, done.stderr
    (line,) = _lines(done.stderr)
    assert f"{tmp_path / 'typo'} holds no checkpoint (nor any run): starting from scratch (step 0)" in line


def test_a_refused_resume_names_each_differing_key_with_both_values(shards, finished, tmp_path):
    run = _copy(finished, tmp_path)
    done = _train(shards, run, "--resume", "--lr", "0.05", "--seed", "3", "--log-every", "2")
    assert done.returncode == 2 and done.seconds < DEADLINE, done.stderr
    assert "written by a run with another config (lr: 0.1 in the checkpoint, 0.05 now; seed: 0 in the checkpoint, " \
           "3 now); use a new run directory or the original config" in done.stderr, done.stderr
    assert "log_every" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("part, old, new", [("sampler", '["position", 24]', '["position", 25]'),
                                            ("optimizer", '["lr", 0.1]', '["lr", 0.2]')])
def test_a_hand_edited_state_attribute_is_refused_naming_the_file_and_part(shards, finished, tmp_path, part, old, new):
    run = _copy(finished, tmp_path)
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints" / "step-00000006")  # the run stopped after its checkpoint at step 3
    _edit_state(run / "checkpoints" / "step-00000003" / "rank-0.h5", part, old, new)
    done = _train(shards, run, "--resume")
    assert done.returncode == 2 and done.seconds < DEADLINE, done.stderr
    assert f"step-00000003: rank-0.h5: part '{part}' fails its checksum" in done.stderr, done.stderr
    assert done.stderr.count("hpcsgd: error") == 1 and "Traceback" not in done.stderr


def test_an_edited_newest_checkpoint_is_set_aside_naming_the_part(shards, finished, tmp_path):
    run = _copy(finished, tmp_path)
    (run / "summary.json").unlink()
    _edit_state(run / "checkpoints" / "step-00000006" / "rank-2.h5", "optimizer", '["lr", 0.1]', '["lr", 0.9]')
    done = _train(shards, run, "--resume")
    assert done.returncode == 0, done.stderr
    assert "rank-2.h5: part 'optimizer' fails its checksum" in done.stderr and "resuming from the older intact " \
           "checkpoint step-00000003" in done.stderr, done.stderr


def test_an_edited_complete_record_fails_its_checksum(finished, tmp_path):
    run = _copy(finished, tmp_path)
    complete = run / "checkpoints" / "step-00000006" / "COMPLETE"
    complete.write_text(complete.read_text().replace('"step": 6', '"step": 5'))
    assert ckpt._check_intact(complete.parent, None) == "its COMPLETE record fails its checksum (altered or corrupted)"


def test_one_list_of_keys_that_do_not_change_results():
    """The checkpoint's fingerprint and the report's grouping read the same list."""
    from hpcsgd.config import build_config

    cfg = build_config({"data": "d", "run_dir": "r"})
    for key in NOT_TRAJECTORY:
        assert key not in resume.identity(cfg, {"digest": "x"})["config"]
    assert set(resume.identity(cfg, {"digest": "x"})["config"]) == set(vars(cfg)) - NOT_TRAJECTORY
    # The report: runs that differ in every key of the list and in one trajectory key differ in that key only.
    config = dict(json.loads(json.dumps(vars(cfg), default=str)))
    other = {k: f"changed {v}" if k in NOT_TRAJECTORY else v for k, v in config.items()}
    other["seed"] = config["seed"] + 1
    pair = [runs.Run(Path("a"), config, None, {}), runs.Run(Path("b"), other, None, {})]
    assert runs.differing_keys(pair) == ["seed"]
