"""Bad input ends the whole 4-rank job with one clear message and a non-zero exit, fast."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from hpcsgd.data import load_source, read_index, write_shards
from hpcsgd.data.shards import checksum

from launch import hpcsgd, mpi

DEADLINE = 30  # seconds: a hang would be caught by subprocess's timeout well after this


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    out = root / "p4"
    write_shards(load_source("synthetic", seed=0, n_train=128, n_test=32, num_classes=4, features=8), 4, "iid", out, seed=0)
    return out


@pytest.fixture(scope="module")
def finished_run(shards, tmp_path_factory):
    """One finished run of ``_train``'s flags (3 steps, lr 0.1, the default), checkpointed every step.

    Five tests below need such a run before the second job they refuse; each trained it again
    (a 4-rank launch that imports torch), four of them without ``--checkpoint-every 1``. Each now
    refuses its second job on its own copy (:func:`_finished_copy`): a run directory's path is no
    part of its checkpoints' config, nor is checkpoint_every (trajectory.NOT_TRAJECTORY), and the
    newest checkpoint, the one a resume checks first, is the end-of-run one at step 3 either way.
    """
    root = tmp_path_factory.mktemp("finished")
    first = _train(shards, root, "--checkpoint-every", 1)
    assert first.returncode == 0, first.stderr
    return root / "run"


def _finished_copy(finished_run, tmp_path):
    """A copy of the finished run at ``_train``'s run directory for this test."""
    return _copy(finished_run, tmp_path / "run")


def _train(shards, tmp_path, *extra, n=4):
    return mpi(n, "train", "--data", shards, "--run-dir", tmp_path / "run", "--steps", 3, "--progress", "none", *extra, timeout=90)


def _expect(result, message):
    assert result.returncode != 0, result.stderr
    assert message in result.stderr, result.stderr
    assert result.seconds < DEADLINE, f"took {result.seconds:.1f}s"
    assert "Traceback" not in result.stderr, result.stderr


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _rewrite_chunk(path, c, mutate):
    """Change chunk c's arrays and re-sign it, as a foreign tool writing shards might."""
    index = read_index(path)
    chunk = index.chunk_path(c)
    with h5py.File(chunk, "r+") as f:
        x, y = f["x"][()], f["y"][()]
        x, y = mutate(x, y)
        del f["x"], f["y"]
        f["x"], f["y"] = x, y
        f.attrs["checksum"] = checksum(x, y)
    with h5py.File(path / "index.h5", "r+") as f:
        sums = list(index.chunk_checksums)
        sums[c] = checksum(x, y)
        f.attrs["chunk_checksums"] = sums


def test_q_greater_than_p(shards, tmp_path):
    _expect(_train(shards, tmp_path, "--q", 5), "q must be in 1..P=4, got 5")


def test_tau_zero(shards, tmp_path):
    _expect(_train(shards, tmp_path, "--tau", 0), "tau must be >= 1, got 0")


def test_batch_zero(shards, tmp_path):
    _expect(_train(shards, tmp_path, "--batch-size", 0), "batch_size must be >= 1, got 0")


def test_drop_rate_one(shards, tmp_path):
    _expect(_train(shards, tmp_path, "--algorithm", "rps", "--drop-rate", 1.0), "drop_rate must be in [0, 1)")


def test_unknown_config_key(shards, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('algorithm = "local"\nlearning_rate = 0.1\n')
    _expect(_train(shards, tmp_path, cfg), "unknown config key 'learning_rate'")


def test_wrong_type_in_config(shards, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('q = "two"\n')
    _expect(_train(shards, tmp_path, cfg), "config key 'q'")


def test_missing_shard_dir(tmp_path):
    _expect(_train(tmp_path / "nowhere", tmp_path), "run `hpcsgd shard` first")


def test_missing_chunk_file(shards, tmp_path):
    broken = _copy(shards, tmp_path / "s")
    (broken / "chunk-00002.h5").unlink()
    result = _train(broken, tmp_path)
    _expect(result, "chunk 2 file")
    assert "missing" in result.stderr


def test_corrupted_chunk(shards, tmp_path):
    broken = _copy(shards, tmp_path / "s")
    with h5py.File(broken / "chunk-00001.h5", "r+") as f:
        f["x"][0, 0] += 1.0
    _expect(_train(broken, tmp_path), "fails its checksum")


def test_truncated_chunk(shards, tmp_path):
    broken = _copy(shards, tmp_path / "s")
    f = broken / "chunk-00003.h5"
    f.write_bytes(f.read_bytes()[:1000])
    _expect(_train(broken, tmp_path), "truncated or corrupted")


def test_shard_parts_differ_from_world_size(shards, tmp_path):
    result = _train(shards, tmp_path, n=2)
    _expect(result, "has P=4 chunks but the job has 2 ranks")


def test_label_out_of_range(shards, tmp_path):
    broken = _copy(shards, tmp_path / "s")

    def bad_label(x, y):
        y = y.copy()
        y[0] = 9
        return x, y

    _rewrite_chunk(broken, 0, bad_label)
    _expect(_train(broken, tmp_path), "label")


def test_nan_features_in_shard(shards, tmp_path):
    broken = _copy(shards, tmp_path / "s")

    def nan(x, y):
        x = x.copy()
        x[1, 0] = np.nan
        return x, y

    _rewrite_chunk(broken, 3, nan)
    result = _train(broken, tmp_path)
    _expect(result, "NaN or Inf in features")
    assert "rank" in result.stderr  # names the rank that found it


def test_nan_features_rejected_at_shard_time(tmp_path):
    x = np.zeros((20, 3), np.float32)
    x[4, 1] = np.nan
    y = np.arange(20) % 2
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:4] * 0, y_test=y[:4])
    result = hpcsgd("shard", "--source", "npz", "--path", tmp_path / "d.npz", "--parts", 2, "--out", tmp_path / "s")
    assert result.returncode == 2, result.stderr
    assert "NaN or Inf" in result.stderr


def test_unwritable_run_dir(shards, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = mpi(4, "train", "--data", shards, "--run-dir", blocker / "run", "--steps", 2, "--progress", "none", timeout=90)
    _expect(result, "cannot write the run directory")


def test_nan_loss_stops_whole_job_with_rank_and_step(shards, tmp_path):
    result = _train(shards, tmp_path, "--lr", 1e30, "--steps", 20, "--algorithm", "local", "--tau", 100)
    _expect(result, "non-finite training loss")
    assert "at step" in result.stderr


def test_empty_chunk(shards, tmp_path):
    broken = _copy(shards, tmp_path / "s")

    def empty(x, y):
        return x[:0], y[:0]

    _rewrite_chunk(broken, 2, empty)
    # The index still promises the old size: the mismatch is named before anything trains.
    _expect(_train(broken, tmp_path), "chunk 2")


def test_world_size_one_with_four_chunks(shards, tmp_path):
    _expect(_train(shards, tmp_path, n=1), "has P=4 chunks but the job has 1 ranks")


def test_model_does_not_fit_the_shards(shards, tmp_path):
    # The synthetic shards hold flat feature vectors; a CNN needs images.
    _expect(_train(shards, tmp_path, "--model", "lenet"), "does not fit the shards")


def test_checkpoint_from_another_config(shards, finished_run, tmp_path):
    _finished_copy(finished_run, tmp_path)  # trained with lr 0.1
    _expect(_train(shards, tmp_path, "--lr", 0.05, "--resume"), "written by a run with another config")


def test_fail_every_rank_is_refused(shards, tmp_path):
    _expect(_train(shards, tmp_path, "--fail", "0@1", "1@1", "2@1", "3@1"), "at least one must survive")


def test_bad_link_drop_rule(shards, tmp_path):
    _expect(_train(shards, tmp_path, "--algorithm", "rps", "--link-drop", "to:7=0.3"), "names a rank outside 0..3")


def test_model_factory_module_cannot_be_imported(shards, tmp_path):
    _expect(_train(shards, tmp_path, "--model", "nosuch.mod:make"),
            "model 'nosuch.mod:make': cannot import module 'nosuch.mod': ModuleNotFoundError: No module named 'nosuch' (ranks 0, 1, 2, 3)")


def test_model_factory_not_callable(shards, tmp_path):
    _expect(_train(shards, tmp_path, "--model", "tests.user_models:WIDTH"),
            "model 'tests.user_models:WIDTH': 'WIDTH' is a int, not callable (ranks 0, 1, 2, 3)")


def test_model_factory_output_does_not_fit_the_shards(shards, tmp_path):
    _expect(_train(shards, tmp_path, "--model", "tests.user_models:wrong_classes"),
            "model 'tests.user_models:wrong_classes' does not fit the shards: it maps a batch of 2 samples of shape (8,) "
            "to (2, 3), expected (2, 4) for 4 classes (ranks 0, 1, 2, 3)")


# -- run directories, resumes, and inputs found by a hostile review (README, "Bad input") -------


def test_config_path_is_a_directory(shards, tmp_path):
    _expect(_train(shards, tmp_path, tmp_path), f"config file {tmp_path} is a directory, not a TOML file")


def test_config_not_utf8(shards, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_bytes(b"lr = 0.1\n# caf\xe9\n")
    _expect(_train(shards, tmp_path, cfg), "is not UTF-8 text (byte 0xe9 at offset 14)")


def test_seed_beyond_64_bits(shards, tmp_path):
    _expect(_train(shards, tmp_path, "--seed", 2**64), "config key 'seed' (command line) must be at most 2**64-1")


def test_batch_larger_than_a_chunk(shards, tmp_path):
    # 128 samples in 4 chunks of 32: a batch of 100 per chunk would count one step as three passes.
    _expect(_train(shards, tmp_path, "--batch-size", 100), "batch_size 100 (samples per chunk per step) is larger than chunk")


def test_fail_with_a_negative_rank(shards, tmp_path):
    _expect(_train(shards, tmp_path, "--fail", "-1@5"), "fail entry '-1@5' must look like RANK@STEP with RANK, STEP >= 0")


def test_run_directory_that_holds_a_run(shards, finished_run, tmp_path):
    _finished_copy(finished_run, tmp_path)
    _expect(_train(shards, tmp_path, "--lr", 0.05), "already holds a run (config.toml, summary.json, metrics/, checkpoints/)")


def test_resume_and_overwrite_together(shards, tmp_path):
    _expect(_train(shards, tmp_path, "--resume", "--overwrite"), "give --resume (continue the run in run_dir) or --overwrite")


def test_resume_on_other_shards_names_both(shards, finished_run, tmp_path):
    _finished_copy(finished_run, tmp_path)
    other = tmp_path / "label"
    write_shards(load_source("synthetic", seed=0, n_train=128, n_test=32, num_classes=4, features=8), 4, "label", other, seed=0)
    result = _train(other, tmp_path, "--resume")
    _expect(result, "was written on other shards: ")
    assert f"{shards} (synthetic, iid, seed 0, P=4" in result.stderr and f"this run reads {other} (synthetic, label" in result.stderr


def test_resume_on_shards_of_another_input_shape(shards, finished_run, tmp_path):
    _finished_copy(finished_run, tmp_path)
    wide = tmp_path / "wide"
    write_shards(load_source("synthetic", seed=0, n_train=128, n_test=32, num_classes=4, features=16), 4, "iid", wide, seed=0)
    _expect(_train(wide, tmp_path, "--resume"), "was written on other shards: ")  # not a parameter-count mismatch


def test_resume_with_no_intact_checkpoint(shards, finished_run, tmp_path):
    _finished_copy(finished_run, tmp_path)  # checkpointed every step
    for rank_file in (tmp_path / "run" / "checkpoints").glob("step-*/rank-2.h5"):
        rank_file.write_bytes(rank_file.read_bytes()[:1000])
    result = _train(shards, tmp_path, "--resume")
    _expect(result, "resume: no intact checkpoint in ")
    assert "step-00000003: rank-2.h5 is unreadable or truncated" in result.stderr
    assert "step-00000002: rank-2.h5 is unreadable or truncated" in result.stderr


def _shard_npz(tmp_path, **arrays):
    np.savez(tmp_path / "d.npz", **arrays)
    return hpcsgd("shard", "--source", "npz", "--path", tmp_path / "d.npz", "--parts", 2, "--out", tmp_path / "s")


def _expect_shard_error(result, message):
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


X, Y = np.zeros((20, 3), np.float32), np.arange(20) % 2


def test_npz_that_is_no_zip(tmp_path):
    (tmp_path / "d.npz").write_bytes(b"plain text")
    result = hpcsgd("shard", "--source", "npz", "--path", tmp_path / "d.npz", "--parts", 2, "--out", tmp_path / "s")
    _expect_shard_error(result, "is not a .npz archive (a zip of .npy arrays, as np.savez writes)")


def test_npz_with_an_object_array(tmp_path):
    objects = np.array([{"x": 1}] * 20, dtype=object)
    _expect_shard_error(_shard_npz(tmp_path, x_train=objects, y_train=Y, x_test=X, y_test=Y),
                        "array 'x_train' holds Python objects (dtype=object); hpcsgd never unpickles data files")


def test_npz_with_one_based_labels(tmp_path):
    _expect_shard_error(_shard_npz(tmp_path, x_train=X, y_train=Y + 1, x_test=X, y_test=Y + 1),
                        "labels start at 1, so class 0 would have no sample; labels must be 0-based class indices: subtract 1")


def test_npz_with_labels_near_a_million(tmp_path):
    _expect_shard_error(_shard_npz(tmp_path, x_train=X, y_train=Y + 999_990, x_test=X, y_test=Y + 999_990),
                        "labels start at 999990")
    # Kept on purpose with a num_classes array: a million classes shard without HDF5's header limit.
    result = _shard_npz(tmp_path, x_train=X, y_train=Y + 999_990, x_test=X, y_test=Y, num_classes=1_000_000)
    assert result.returncode == 0, result.stderr
    assert read_index(tmp_path / "s").num_classes == 1_000_000


def test_shard_seed_beyond_64_bits(tmp_path):
    result = hpcsgd("shard", "--source", "synthetic", "--parts", 2, "--out", tmp_path / "s", "--seed", 2**64)
    _expect_shard_error(result, "argument --seed: must be an integer in 0..2**64-1")


def test_crafted_cifar_batch_runs_nothing(tmp_path):
    import os
    import pickle

    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "data_batch_1").write_bytes(pickle.dumps({b"data": Payload(), b"labels": [0]}, protocol=2))
    result = hpcsgd("shard", "--source", "cifar10", "--path", d, "--parts", 2, "--out", tmp_path / "s")
    _expect_shard_error(result, "cannot read CIFAR batch")
    assert "refusing posix.system" in result.stderr and not marker.exists()


# --- issue 28: values checked where they are parsed (the whole sweep: tests/test_flag_sweep.py) ---


def _once(result, message):
    """Refused on every rank together: exit 2, the message printed once, no rank aborting alone."""
    assert result.returncode == 2, result.stderr
    _expect(result, message)
    assert result.stderr.count(message) == 1, result.stderr
    assert "error on rank" not in result.stderr, result.stderr


def test_lr_that_overflows_float32(shards, tmp_path):
    _once(_train(shards, tmp_path, "--lr", "1e300"), "lr must be at most 3.403e+38 in magnitude (it becomes a float32)")


@pytest.mark.parametrize("rule", ["1@2:99999999999999999999999", "1@2:1..2", "1@2:."])
def test_straggle_durations_time_sleep_cannot_take(shards, tmp_path, rule):
    reason = "SECONDS must be a duration in 0..1e+09 seconds" if rule.endswith("9") else "is not a number"
    result = _train(shards, tmp_path, "--straggle", rule)
    _once(result, f"straggle entry '{rule}'")
    assert reason in result.stderr, result.stderr


def test_threads_beyond_the_node(shards, tmp_path):
    _once(_train(shards, tmp_path, "--threads", 100000), "threads must be at most this node's")


def test_overlap_rounds_with_optimizer_state_refused_at_config_time(shards, tmp_path):
    result = _train(shards, tmp_path, "--algorithm", "local", "--tau", 2, "--momentum", 0.9, "--overlap-rounds",
                    "--average-optimizer-state")
    _once(result, "overlap_rounds does not combine with average_optimizer_state")
    assert "starting" not in result.stderr  # before the banner: no torch, no MPI


def test_no_op_settings_are_warned_once(shards, tmp_path):
    result = _train(shards, tmp_path, "--algorithm", "rps", "--link-drop", "2->2=0.5", "--average-optimizer-state",
                    "--lr-milestones", 5)
    assert result.returncode == 0, result.stderr
    for warning in ("link_drop rule '2->2=0.5' names the link from rank 2 to itself",
                    "average_optimizer_state does nothing with momentum 0",
                    "lr_milestones apply to lr_schedule 'step' only"):
        assert result.stderr.count(warning) == 1, result.stderr


def test_config_error_without_a_launcher_but_a_slurm_rank(shards, tmp_path, monkeypatch):
    """SLURM_PROCID=2 left in the environment of a plain command: the error is still printed."""
    monkeypatch.setenv("SLURM_PROCID", "2")
    result = hpcsgd("train", "--data", shards, "--run-dir", tmp_path / "run", "--tau", 0)
    assert result.returncode == 2 and "tau must be >= 1, got 0" in result.stderr, result.stderr


def test_chunk_copied_over_another_is_warned(shards, tmp_path):
    import shutil

    copied = _copy(shards, tmp_path / "s")
    shutil.copy(copied / "chunk-00001.h5", copied / "chunk-00003.h5")
    with h5py.File(copied / "chunk-00003.h5", "r+") as f:
        f.attrs["chunk"] = 3
    with h5py.File(copied / "index.h5", "r+") as f:  # the index re-signed to match
        sums = list(read_index(copied).chunk_checksums)
        sums[3] = sums[1]
        f.attrs["chunk_checksums"] = sums
    result = _train(copied, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("warning: chunks 1, 3 of") == 1, result.stderr
    assert "hold the same samples in the same order" in result.stderr


def test_npz_with_a_negative_training_label(tmp_path):
    _expect_shard_error(_shard_npz(tmp_path, x_train=X, y_train=np.r_[-1, Y[1:]], x_test=X, y_test=Y),
                        "label -1 at sample 0 is negative; labels are class indices 0..K-1")


def test_npz_with_text_or_complex_features(tmp_path):
    _expect_shard_error(_shard_npz(tmp_path, x_train=X.astype(str), y_train=Y, x_test=X, y_test=Y),
                        "features must be numbers, got dtype <U32 (text)")
    _expect_shard_error(_shard_npz(tmp_path, x_train=X + 1j, y_train=Y, x_test=X, y_test=Y),
                        "features are complex (complex64); float32 would drop their imaginary part")
    assert not (tmp_path / "s").exists()


def test_npz_with_a_trillion_classes_leaves_no_directory(tmp_path):
    result = _shard_npz(tmp_path, x_train=X, y_train=Y, x_test=X, y_test=Y, num_classes=np.array(10**12))
    _expect_shard_error(result, "num_classes 1000000000000 (its class counts) needs 21.8 TiB, more than this node's")
    assert not (tmp_path / "s").exists()
    # The same check in write_shards, for P: a failed first write removes the directory it made.
    from hpcsgd.data.sources import Dataset
    from hpcsgd.errors import ConfigError

    data = Dataset("npz", X, Y, X, Y, 10**12, (3,))
    with pytest.raises(ConfigError, match="over 2 chunks"):
        write_shards(data, 2, "iid", tmp_path / "a" / "b", seed=0)
    assert not (tmp_path / "a").exists()


def test_synthetic_features_beyond_memory_are_refused_before_allocation(tmp_path):
    result = hpcsgd("shard", "--source", "synthetic", "--synthetic-features", 100_000_000, "--parts", 2,
                    "--out", tmp_path / "s")
    _expect_shard_error(result, "--synthetic-samples 2048 x --synthetic-features 100000000")
    assert result.seconds < DEADLINE and not (tmp_path / "s").exists()
