"""The HDF5 shard format: round trip, and every way a shard directory can be broken."""

import shutil

import h5py
import numpy as np
import pytest

from hpcsgd.data.partition import partition_indices
from hpcsgd.data.shards import (
    INDEX_NAME,
    checksum,
    load_chunk,
    load_test,
    read_index,
    write_shards,
)
from hpcsgd.data.sources import Dataset, load_source
from hpcsgd.errors import ConfigError, ShardError


@pytest.fixture(scope="module")
def dataset():
    return load_source("synthetic", seed=0, n_train=203, n_test=31, num_classes=4,
                       input_shape=(2, 3))


@pytest.fixture
def shard_dir(tmp_path, dataset):
    write_shards(dataset, 4, "label", tmp_path / "shards", seed=7)
    return tmp_path / "shards"


def with_arrays(ds, **changes):
    fields = {k: getattr(ds, k) for k in Dataset.__dataclass_fields__}
    fields.update(changes)
    return Dataset(**fields)


def test_round_trip(tmp_path, dataset):
    calls = []
    index = write_shards(dataset, 4, "dirichlet:2", tmp_path / "s", seed=7,
                         progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    assert index == read_index(tmp_path / "s")
    assert (index.parts, index.partition, index.seed, index.source) == (4, "dirichlet:2.0", 7,
                                                                        "synthetic")
    assert (index.num_classes, index.input_shape, index.format_version) == (4, (2, 3), 1)
    assert index.test_size == 31 and index.train_size == 203
    pieces = partition_indices(dataset.y_train, 4, "dirichlet:2", seed=7)
    for c, idx in enumerate(pieces):
        x, y = load_chunk(index, c)
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert np.array_equal(x, dataset.x_train[idx]) and np.array_equal(y, dataset.y_train[idx])
        assert index.chunk_sizes[c] == len(idx)
        assert index.chunk_checksums[c] == checksum(x, y)
        assert index.class_counts[c] == tuple(np.bincount(y, minlength=4))
    x_test, y_test = load_test(index)
    assert np.array_equal(x_test, dataset.x_test) and np.array_equal(y_test, dataset.y_test)
    # Only final names remain: no temporary files.
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "chunk-00000.h5", "chunk-00001.h5", "chunk-00002.h5", "chunk-00003.h5", INDEX_NAME]


def test_load_chunk_opens_only_its_file(shard_dir):
    index = read_index(shard_dir)
    for c in (0, 1, 3):
        (shard_dir / f"chunk-{c:05d}.h5").unlink()
    x, y = load_chunk(index, 2)
    assert len(y) == index.chunk_sizes[2]
    with pytest.raises(ShardError, match=r"chunk 1 file .*chunk-00001\.h5 is missing"):
        load_chunk(index, 1)
    with pytest.raises(ConfigError, match=r"chunk must be in 0\.\.3"):
        load_chunk(index, 4)


def test_overwrite_rules(tmp_path, dataset, shard_dir):
    # An existing shard directory may be overwritten; stale chunks of a larger P go away.
    index = write_shards(dataset, 2, "iid", shard_dir, seed=0)
    assert index.parts == 2
    assert sorted(p.name for p in shard_dir.iterdir()) == [
        "chunk-00000.h5", "chunk-00001.h5", INDEX_NAME]
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"refusing to write shards into .*mine.*notes\.txt"):
        write_shards(dataset, 2, "iid", other, seed=0)
    assert (other / "notes.txt").read_text() == "keep me"
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        write_shards(dataset, 2, "iid", f, seed=0)


def test_interrupted_write_leaves_no_index_and_can_be_redone(tmp_path, dataset):
    out = tmp_path / "s"

    def crash(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shards(dataset, 4, "iid", out, seed=0, progress=crash)
    with pytest.raises(ShardError, match="no shard index at .*index.h5: run `hpcsgd shard` first"):
        read_index(out)
    assert write_shards(dataset, 4, "iid", out, seed=0).parts == 4


def test_bad_data_rejected_at_write(tmp_path, dataset):
    x = dataset.x_train.copy()
    x[5, 1, 1] = np.nan
    with pytest.raises(ShardError, match="NaN or Inf in features of the training set"):
        write_shards(with_arrays(dataset, x_train=x), 2, "iid", tmp_path / "a", seed=0)
    y = dataset.y_test.copy()
    y[0] = 4
    with pytest.raises(ShardError, match=r"label 4 .* out of range 0\.\.3"):
        write_shards(with_arrays(dataset, y_test=y), 2, "iid", tmp_path / "b", seed=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(ConfigError, match="parts P must be in"):
        write_shards(dataset, 0, "iid", tmp_path / "c", seed=0)


def test_changed_value_fails_checksum(shard_dir):
    index = read_index(shard_dir)
    with h5py.File(shard_dir / "chunk-00002.h5", "r+") as f:
        f["x"][0, 0, 0] += 1.0
    with pytest.raises(ShardError, match=r"chunk 2 in .*chunk-00002\.h5 fails its checksum: "
                                         r"the file is corrupted or was changed"):
        load_chunk(index, 2)
    load_chunk(index, 2, verify=False)  # the check can be skipped


def test_flipped_byte_fails_checksum(shard_dir):
    index = read_index(shard_dir)
    path = shard_dir / "chunk-00001.h5"
    with h5py.File(path, "r") as f:
        offset = f["y"].id.get_offset()  # contiguous storage: raw bytes start here
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="chunk 1 .* fails its checksum"):
        load_chunk(index, 1)


def test_test_set_checksum(shard_dir):
    index = read_index(shard_dir)
    with h5py.File(shard_dir / INDEX_NAME, "r+") as f:
        f["y_test"][0] = (f["y_test"][0] + 1) % 4
    with pytest.raises(ShardError, match="test set .* fails its checksum"):
        load_test(index)


def test_truncated_files(shard_dir):
    index = read_index(shard_dir)
    path = shard_dir / "chunk-00003.h5"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=r"cannot read chunk 3 in .*truncated"):
        load_chunk(index, 3)
    idx = shard_dir / INDEX_NAME
    idx.write_bytes(idx.read_bytes()[:1000])
    with pytest.raises(ShardError, match=r"cannot read shard index .*index\.h5"):
        read_index(shard_dir)


def patch_chunk(shard_dir, c, key, fn):
    """Change chunk c's data and make the index's checksum agree, as a buggy writer would."""
    with h5py.File(shard_dir / f"chunk-{c:05d}.h5", "r+") as f:
        arr = f[key][()]
        fn(arr)
        f[key][...] = arr
        x, y = f["x"][()], f["y"][()]
    with h5py.File(shard_dir / INDEX_NAME, "r+") as f:
        sums = [str(s) for s in f.attrs["chunk_checksums"]]
        sums[c] = checksum(x, y)
        f.attrs["chunk_checksums"] = sums
    return read_index(shard_dir)


def test_nan_and_bad_label_rejected_at_load(shard_dir):
    index = patch_chunk(shard_dir, 0, "x", lambda x: x.__setitem__((3, 0, 0), np.inf))
    with pytest.raises(ShardError, match=r"NaN or Inf in features of chunk 0 in .*chunk-00000"):
        load_chunk(index, 0)
    index = patch_chunk(shard_dir, 1, "y", lambda y: y.__setitem__(2, 9))
    with pytest.raises(ShardError, match=r"chunk 1 .*label 9 at sample 2 is out of range 0\.\.3"):
        load_chunk(index, 1)


def test_size_and_identity_mismatch(shard_dir):
    index = read_index(shard_dir)
    shutil.copy(shard_dir / "chunk-00002.h5", shard_dir / "chunk-00001.h5")
    with pytest.raises(ShardError, match="says it is chunk 2"):
        load_chunk(index, 1)
    with h5py.File(shard_dir / INDEX_NAME, "r+") as f:
        sizes = f.attrs["chunk_sizes"]
        sizes[0] += 1
        f.attrs["chunk_sizes"] = sizes
    with pytest.raises(ShardError, match="chunk 0 .* the index says"):
        load_chunk(read_index(shard_dir), 0)


def test_bad_index(shard_dir, tmp_path):
    with pytest.raises(ShardError, match="no shard index at"):
        read_index(tmp_path / "nowhere")
    with h5py.File(shard_dir / INDEX_NAME, "r+") as f:
        f.attrs["format_version"] = 2
    with pytest.raises(ShardError, match="format_version 2, this hpcsgd reads 1"):
        read_index(shard_dir)
    with h5py.File(shard_dir / INDEX_NAME, "r+") as f:
        f.attrs["format_version"] = 1
        del f.attrs["num_classes"]
    with pytest.raises(ShardError, match="lacks attribute.*num_classes"):
        read_index(shard_dir)
    (shard_dir / INDEX_NAME).write_bytes(b"this is not HDF5")
    with pytest.raises(ShardError, match="not HDF5"):
        read_index(shard_dir)
