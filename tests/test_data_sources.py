"""Importers: digits, npz, CIFAR pickles, MNIST IDX files and synthetic data."""

import gzip
import pickle

import numpy as np
import pytest

from hpcsgd.data.sources import load_source, validate_arrays
from hpcsgd.errors import ConfigError, ShardError


def check_dataset(ds, shape, num_classes):
    assert ds.input_shape == shape
    assert ds.num_classes == num_classes
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.shape == (len(y), *shape)
        assert y.min() >= 0 and y.max() < num_classes


# --- digits, synthetic ----------------------------------------------------------------------


def test_digits_split_is_fixed_and_stratified():
    a = load_source("digits", seed=0)
    b = load_source("digits", seed=123)
    check_dataset(a, (1, 8, 8), 10)
    assert len(a.y_train) + len(a.y_test) == 1797
    assert 0.19 < len(a.y_test) / 1797 < 0.21
    assert np.array_equal(a.x_test, b.x_test) and np.array_equal(a.y_train, b.y_train)
    assert 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0
    # Every class is about 20% test.
    for k in range(10):
        frac = (a.y_test == k).sum() / ((a.y_test == k).sum() + (a.y_train == k).sum())
        assert abs(frac - 0.2) < 0.02


def test_synthetic_is_seeded_and_shaped():
    a = load_source("synthetic", seed=1, n_train=100, n_test=20, num_classes=3, features=5)
    b = load_source("synthetic", seed=1, n_train=100, n_test=20, num_classes=3, features=5)
    c = load_source("synthetic", seed=2, n_train=100, n_test=20, num_classes=3, features=5)
    check_dataset(a, (5,), 3)
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)
    img = load_source("synthetic", n_train=30, n_test=10, input_shape=(2, 3, 3))
    check_dataset(img, (2, 3, 3), 10)
    d = load_source("synthetic")
    assert (len(d.y_train), len(d.y_test), d.input_shape) == (2048, 512, (32,))


def test_synthetic_is_learnable():
    ds = load_source("synthetic", seed=0)
    # Nearest class mean from the training set classifies the test set well above chance.
    x, y = ds.x_train, ds.y_train
    means = np.stack([x[y == k].mean(0) for k in range(ds.num_classes)])
    pred = ((ds.x_test[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == ds.y_test).mean() > 0.5


def test_unknown_source_and_missing_path():
    with pytest.raises(ConfigError, match="allowed are digits, npz"):
        load_source("imagenet")
    for name in ("npz", "cifar10", "cifar100", "mnist"):
        with pytest.raises(ConfigError, match="needs a path"):
            load_source(name)
    with pytest.raises(ConfigError, match="unknown bogus"):
        load_source("synthetic", bogus=1)


# --- npz ----------------------------------------------------------------------------------


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    f = tmp_path / "d.npz"
    arrays = dict(x_train=rng.normal(size=(20, 4, 2)), y_train=rng.integers(0, 3, 20),
                  x_test=rng.normal(size=(6, 4, 2)), y_test=np.array([0, 1, 2, 1, 0, 1]))
    np.savez(f, **arrays)
    ds = load_source("npz", f)
    check_dataset(ds, (4, 2), 3)
    assert np.allclose(ds.x_train, arrays["x_train"].astype(np.float32))
    assert np.array_equal(ds.y_train, arrays["y_train"])
    assert load_source("npz", f, num_classes=7).num_classes == 7


def test_npz_missing_array_and_bad_label(tmp_path):
    f = tmp_path / "d.npz"
    np.savez(f, x_train=np.zeros((3, 2)), y_train=np.zeros(3, int), x_test=np.zeros((1, 2)))
    with pytest.raises(ShardError, match="missing array.*y_test"):
        load_source("npz", f)
    np.savez(f, x_train=np.zeros((3, 2)), y_train=np.array([0, 1, 5]),
             x_test=np.zeros((1, 2)), y_test=np.array([0]))
    with pytest.raises(ShardError, match=r"label 5 .* out of range 0\.\.1"):
        load_source("npz", f, num_classes=2)
    with pytest.raises(ConfigError, match="no file"):
        load_source("npz", tmp_path / "absent.npz")


# --- CIFAR --------------------------------------------------------------------------------


def write_cifar_batch(path, n, label_key, seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).tolist()
    with open(path, "wb") as f:
        pickle.dump({b"data": data, label_key: labels}, f)
    return data, np.asarray(labels)


def test_cifar10_batches(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    parts = [write_cifar_batch(d / f"data_batch_{i}", 4, b"labels", i) for i in range(1, 6)]
    test_data, test_labels = write_cifar_batch(d / "test_batch", 3, b"labels", 9)
    for path in (d, tmp_path):  # the batches directory or its parent
        ds = load_source("cifar10", path)
        check_dataset(ds, (3, 32, 32), 10)
        assert len(ds.y_train) == 20
        assert np.array_equal(ds.y_train, np.concatenate([p[1] for p in parts]))
        assert np.array_equal(ds.y_test, test_labels)
    # Per-channel standardisation with training statistics.
    assert np.allclose(ds.x_train.mean(axis=(0, 2, 3)), 0, atol=1e-4)
    assert np.allclose(ds.x_train.std(axis=(0, 2, 3)), 1, atol=1e-3)
    raw = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32) / 255.0
    mean, std = raw.mean(axis=(0, 2, 3)), raw.std(axis=(0, 2, 3))
    expect = (test_data.reshape(-1, 3, 32, 32) / 255.0 - mean[:, None, None]) / std[:, None, None]
    assert np.allclose(ds.x_test, expect, atol=1e-4)


def test_cifar100_and_missing_dir(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    _, y = write_cifar_batch(d / "train", 5, b"fine_labels", 1)
    write_cifar_batch(d / "test", 2, b"fine_labels", 2)
    ds = load_source("cifar100", tmp_path)
    check_dataset(ds, (3, 32, 32), 100)
    assert np.array_equal(ds.y_train, y)
    with pytest.raises(ConfigError, match="no CIFAR batches"):
        load_source("cifar10", tmp_path)


def test_cifar_bad_batch(tmp_path):
    (tmp_path / "train").write_bytes(b"not a pickle")
    (tmp_path / "test").write_bytes(b"")
    with pytest.raises(ShardError, match="cannot read CIFAR batch .*train"):
        load_source("cifar100", tmp_path)


# --- MNIST --------------------------------------------------------------------------------


def idx_bytes(arr, magic):
    header = magic.to_bytes(4, "big") + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_mnist(d, gz, n_train=6, n_test=4):
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28))
        y = rng.integers(0, 10, size=n)
        for kind, arr, magic in (("images-idx3", x, 0x803), ("labels-idx1", y, 0x801)):
            name = f"{prefix}-{kind}-ubyte"
            data = idx_bytes(arr, magic)
            if gz:
                (d / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (d / name).write_bytes(data)
        out[prefix] = (x, y)
    return out


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz)
    ds = load_source("mnist", tmp_path)
    check_dataset(ds, (1, 28, 28), 10)
    x, y = arrays["train"]
    assert np.allclose(ds.x_train[:, 0], x / 255.0)
    assert np.array_equal(ds.y_train, y)
    assert np.array_equal(ds.y_test, arrays["t10k"][1])


def test_mnist_bad_magic_and_truncation(tmp_path):
    write_mnist(tmp_path, gz=False)
    f = tmp_path / "train-labels-idx1-ubyte"
    good = f.read_bytes()
    f.write_bytes((0x0803).to_bytes(4, "big") + good[4:])
    with pytest.raises(ShardError, match=r"train-labels-idx1-ubyte .*magic number 0x00000803, "
                                         r"expected 0x00000801"):
        load_source("mnist", tmp_path)
    f.write_bytes(good[:-2])
    with pytest.raises(ShardError, match="truncated"):
        load_source("mnist", tmp_path)
    f.unlink()
    with pytest.raises(ConfigError, match="no train-labels-idx1-ubyte"):
        load_source("mnist", tmp_path)


# --- validation ---------------------------------------------------------------------------


def test_validate_arrays():
    x = np.zeros((3, 2), np.float32)
    y = np.array([0, 1, 2])
    validate_arrays(x, y, 3, "here")
    with pytest.raises(ShardError, match="NaN or Inf in features of here"):
        validate_arrays(np.array([[0, np.nan]] * 3, np.float32), y, 3, "here")
    with pytest.raises(ShardError, match="NaN or Inf"):
        validate_arrays(np.array([[np.inf, -np.inf]] * 3, np.float32), y, 3, "here")
    with pytest.raises(ShardError, match=r"label 2 at sample 2 is out of range 0\.\.1"):
        validate_arrays(x, y, 2, "here")
    with pytest.raises(ShardError, match=r"label -1 .* out of range"):
        validate_arrays(x, np.array([0, -1, 0]), 3, "here")
    with pytest.raises(ShardError, match="empty"):
        validate_arrays(x[:0], y[:0], 3, "here")
    with pytest.raises(ShardError, match="3 feature rows but 2 labels"):
        validate_arrays(x, y[:2], 3, "here")


def test_cifar_batch_pickled_as_the_official_python2_files_loads(tmp_path):
    """Protocol 2 and numpy 1's module name, as in cifar-10-batches-py: the restricted unpickler admits it."""
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 5), ("test", 2)):
        batch = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), b"fine_labels": list(range(n)),
                 b"coarse_labels": [0] * n, b"filenames": [b"x.png"] * n, b"batch_label": b"training batch 1 of 1"}
        raw = pickle.dumps(batch, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (d / name).write_bytes(raw)
    assert b"numpy.core.multiarray\n_reconstruct" in (d / "train").read_bytes()
    ds = load_source("cifar100", tmp_path)
    assert ds.x_train.shape == (5, 3, 32, 32) and ds.y_train.tolist() == [0, 1, 2, 3, 4]


def test_cifar_unpickler_refuses_every_other_global(tmp_path):
    import io

    from hpcsgd.data.sources import CifarUnpickler

    for obj in (print, pickle.Pickler, np.random.default_rng):
        with pytest.raises(pickle.UnpicklingError, match="refusing"):
            CifarUnpickler(io.BytesIO(pickle.dumps({b"data": obj}, protocol=2)), encoding="bytes").load()
