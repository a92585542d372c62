"""Importers: turn a data set a user already has into in-memory numpy arrays.

Every source returns a :class:`Dataset` of float32 features shaped ``(N, *input_shape)`` and
int64 labels in ``0..num_classes-1``, validated by :func:`validate_arrays`. Nothing here
downloads: ``digits`` ships with scikit-learn, ``synthetic`` is generated, and the others read
files from ``path``.
"""

from __future__ import annotations

import gzip
import math
import pickle
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcsgd.errors import ConfigError, ShardError
from hpcsgd.limits import check_bytes

SOURCES = ("digits", "npz", "cifar10", "cifar100", "mnist", "synthetic")


@dataclass(frozen=True)
class Dataset:
    """A labelled train/test split held in memory."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]


def validate_arrays(x: np.ndarray, y: np.ndarray, num_classes: int, where: str) -> None:
    """Raise :class:`ShardError` unless ``x``/``y`` are a non-empty, finite, labelled set.

    Args:
        x: features, shape ``(N, ...)``.
        y: integer labels, shape ``(N,)``.
        num_classes: labels must lie in ``0..num_classes-1``.
        where: what the arrays are (a file, a chunk), for the message.
    """
    if x.ndim < 1 or y.ndim != 1:
        raise ShardError(
            f"{where}: labels must be 1-D and features at least 1-D, "
            f"got shapes {x.shape} and {y.shape}"
        )
    if len(x) != len(y):
        raise ShardError(f"{where}: {len(x)} feature rows but {len(y)} labels")
    if len(y) == 0:
        raise ShardError(f"{where}: no samples (empty arrays)")
    if not np.issubdtype(y.dtype, np.integer):
        raise ShardError(f"{where}: labels must be integers, got dtype {y.dtype}")
    if np.issubdtype(x.dtype, np.floating):
        if x.dtype.itemsize <= 4:
            # A float64 sum of finite float32 values cannot overflow, and NaN/Inf propagate
            # through it: a finiteness check without a temporary array the size of x.
            with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is expected here
                finite = bool(np.isfinite(x.sum(dtype=np.float64)))
        else:
            finite = bool(np.isfinite(x).all())
        if not finite:
            raise ShardError(f"NaN or Inf in features of {where}")
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ShardError(
            f"{where}: label {int(y[i])} at sample {i} is out of range 0..{num_classes - 1} "
            f"(num_classes={num_classes})"
        )


def load_source(name: str, path: str | None = None, seed: int = 0, **options) -> Dataset:
    """Load data set ``name`` (one of :data:`SOURCES`).

    Args:
        name: the source, e.g. ``"digits"`` or ``"cifar10"``.
        path: file or directory for ``npz``, ``cifar10``, ``cifar100`` and ``mnist``.
        seed: only ``synthetic`` depends on it; real data sets have fixed splits.
        **options: source-specific options (``synthetic``: n_train, n_test, num_classes,
            features or input_shape, noise; ``npz``: num_classes).
    """
    loader = _LOADERS.get(name)
    if loader is None:
        raise ConfigError(f"unknown data source {name!r}: allowed are {', '.join(SOURCES)}")
    if name in NEEDS_PATH and path is None:
        raise ConfigError(f"source {name!r} needs a path (--path): {NEEDS_PATH[name]}")
    allowed = _OPTIONS[name]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"source {name!r} takes options {', '.join(allowed) or '(none)'}, "
            f"got unknown {', '.join(unknown)}"
        )
    if name not in NEEDS_PATH and path is not None:
        warnings.warn(f"source {name!r} reads no files: --path {path} is ignored", stacklevel=2)
    ds = loader(path=None if path is None else Path(path), seed=seed, **options)
    validate_arrays(ds.x_train, ds.y_train, ds.num_classes, f"{name} training set")
    validate_arrays(ds.x_test, ds.y_test, ds.num_classes, f"{name} test set")
    return ds


# --- digits -------------------------------------------------------------------------------


def _load_digits(path: Path | None, seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    # The split ignores `seed` on purpose: test accuracy must stay comparable across runs
    # that only reshuffle the shards.
    rng = np.random.default_rng(0)
    test_parts = []
    for k in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == k))
        test_parts.append(idx[: round(0.2 * len(idx))])
    test = np.zeros(len(y), dtype=bool)
    test[np.concatenate(test_parts)] = True
    return Dataset("digits", x[~test], y[~test], x[test], y[test], 10, (1, 8, 8))


# --- npz ----------------------------------------------------------------------------------


def _load_npz(path: Path, seed: int, num_classes: int | None = None) -> Dataset:
    if not path.is_file():
        raise ConfigError(f"npz source: no file at {path}")
    arrays = _read_npz(path)
    need = ("x_train", "y_train", "x_test", "y_test")
    missing = [k for k in need if k not in arrays]
    if missing:
        raise ShardError(
            f"npz source {path}: missing array(s) {', '.join(missing)} "
            f"(needs {', '.join(need)}; found {', '.join(sorted(arrays)) or 'none'})"
        )
    ys = {k: _as_labels(arrays[k], f"{k} in {path}") for k in ("y_train", "y_test")}
    for k in ("x_train", "x_test"):
        _check_features(arrays[k], f"{k} in {path}")
    if num_classes is None and "num_classes" in arrays:
        num_classes = _stored_classes(arrays["num_classes"], path)
    if num_classes is None:
        num_classes = int(max(ys["y_train"].max(initial=0), ys["y_test"].max(initial=0))) + 1
        _check_inferred_classes(ys["y_train"], num_classes, path)
    if num_classes < 1:
        raise ConfigError(f"npz source {path}: num_classes must be >= 1, got {num_classes}")
    # Class counts (int64 per class) of the index and of each chunk: refused before the arrays are copied.
    check_bytes(f"npz source {path}: num_classes {num_classes} (its class counts)", 3 * 8 * num_classes)
    x_train = np.ascontiguousarray(arrays["x_train"], dtype=np.float32)
    x_test = np.ascontiguousarray(arrays["x_test"], dtype=np.float32)
    if x_train.ndim < 2 or x_train.shape[1:] != x_test.shape[1:]:
        raise ShardError(
            f"npz source {path}: x_train and x_test must be (N, ...) with the same sample "
            f"shape, got {x_train.shape} and {x_test.shape}"
        )
    return Dataset(
        "npz", x_train, ys["y_train"], x_test, ys["y_test"], num_classes,
        tuple(int(s) for s in x_train.shape[1:]),
    )


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of a .npz archive, numeric only: object arrays would need unpickling."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            npy = fh.read(6) == b"\x93NUMPY"
        hint = " (it is a single .npy array: save the four arrays with np.savez)" if npy else ""
        raise ShardError(f"npz source: {path} is not a .npz archive (a zip of .npy arrays, as np.savez writes){hint}")
    arrays = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            for key in z.files:
                try:
                    arrays[key] = z[key]
                except ValueError as e:
                    if "pickle" not in str(e) and "Object arrays" not in str(e):
                        raise
                    raise ShardError(
                        f"npz source {path}: array {key!r} holds Python objects (dtype=object); hpcsgd never "
                        f"unpickles data files: store numeric arrays"
                    ) from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ShardError(f"npz source: cannot read {path} as a .npz archive: {e}") from None
    return arrays


def _check_features(x: np.ndarray, where: str) -> None:
    """Features must be real numbers: float32 of strings fails, of complex numbers drops the imaginary part."""
    if x.dtype.kind == "c":
        raise ShardError(f"{where}: features are complex ({x.dtype}); float32 would drop their imaginary part: "
                         f"store real numbers (e.g. real and imaginary parts as two features)")
    if x.dtype.kind not in "biuf":
        raise ShardError(f"{where}: features must be numbers, got dtype {x.dtype} ({_KINDS.get(x.dtype.kind, 'not numeric')})")


_KINDS = {"U": "text", "S": "bytes", "V": "raw records", "M": "dates", "m": "time spans", "O": "Python objects"}


def _stored_classes(value: np.ndarray, path: Path) -> int:
    """The ``num_classes`` array of a .npz file: one whole number >= 1."""
    value = np.asarray(value)
    if value.size != 1 or value.dtype.kind not in "iuf" or not np.isfinite(value).all() or value.reshape(()) % 1:
        raise ShardError(f"npz source {path}: num_classes must be one whole number, got {value!r:.100}")
    return int(value.reshape(()))


def _check_inferred_classes(y_train: np.ndarray, num_classes: int, path: Path) -> None:
    """With num_classes taken from the largest label, every class must have training samples.

    1-based labels would otherwise make an empty class 0, and ids such as 999990 a million
    classes; a file that means to have empty classes says so with a ``num_classes`` array.
    """
    present = np.unique(y_train)
    if len(present) == num_classes or not present.size:  # no samples: validate_arrays names that
        return
    low = int(present.min())
    if low > 0:
        first = f"labels start at {low}, so class{'es 0..' + str(low - 1) if low > 1 else ' 0'} would have no sample"
        fix = f"labels must be 0-based class indices: subtract {low}"
    else:
        empty = int(np.setdiff1d(np.arange(num_classes), present)[0])
        first = (f"training labels use {len(present)} of the {num_classes} classes 0..{num_classes - 1} "
                 f"(class {empty} has no sample)")
        fix = "labels must be class indices 0..K-1: remap them"
    raise ShardError(f"npz source {path}: {first}; {fix}, or store a num_classes array in the file to keep "
                     f"empty classes on purpose")


def _as_labels(y: np.ndarray, where: str) -> np.ndarray:
    """Labels as int64; floats are accepted only when they hold whole numbers."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if np.issubdtype(y.dtype, np.integer) or (
            np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y))):
        labels = y.astype(np.int64)
    else:
        raise ShardError(f"{where}: labels must be whole numbers, got dtype {y.dtype}")
    if labels.ndim == 1 and labels.size and labels.min() < 0:
        i = int(np.argmax(labels < 0))
        raise ShardError(f"{where}: label {int(labels[i])} at sample {i} is negative; labels are class indices 0..K-1")
    return labels


# --- CIFAR --------------------------------------------------------------------------------


def _cifar_dir(path: Path, subdir: str, marker: str) -> Path:
    """Accept the batches directory itself or the directory that contains it."""
    for d in (path, path / subdir):
        if (d / marker).is_file():
            return d
    raise ConfigError(
        f"no CIFAR batches at {path}: expected {path}/{marker} or {path}/{subdir}/{marker} "
        f"(the python version of the data set, already downloaded)"
    )


class CifarUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR batch holds and nothing else.

    The official batches are pickles (protocol 2, from Python 2) of a dict of bytes, lists of
    ints and bytes, and one uint8 numpy array. Plain containers and scalars need no imports;
    the array needs numpy's reconstruction function, ``ndarray`` and ``dtype`` (under
    numpy 1's and 2's module names), and a re-pickled batch may use ``_codecs.encode`` for
    its bytes. Any other global (``os.system``, ``builtins.eval``, ...) is refused, so a
    crafted batch cannot run code while it is read.
    """

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing {module}.{name}: a CIFAR batch holds only a dict of bytes, lists and a uint8 numpy array"
            )
        return super().find_class(module, name)


def _read_cifar_batch(file: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    if not file.is_file():
        raise ShardError(f"CIFAR batch file {file} is missing")
    try:
        with open(file, "rb") as f:
            d = CifarUnpickler(f, encoding="bytes").load()
        if not isinstance(d, dict):
            raise TypeError(f"the pickle holds a {type(d).__name__}, not a dict")
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[label_key], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError,
            IndexError, ImportError) as e:
        raise ShardError(
            f"cannot read CIFAR batch {file} (needs keys b'data' and {label_key!r}): {e}"
        ) from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ShardError(
            f"CIFAR batch {file}: data must be (N, 3072) with N labels, "
            f"got {data.shape} and {labels.shape}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 -> [0, 1] float32, then per-channel standardize with training statistics."""
    x_train = x_train.astype(np.float32) / 255.0
    x_test = x_test.astype(np.float32) / 255.0
    mean = x_train.mean(axis=(0, 2, 3), dtype=np.float64).astype(np.float32)[:, None, None]
    std = x_train.std(axis=(0, 2, 3), dtype=np.float64).astype(np.float32)[:, None, None]
    std = np.where(std > 0, std, np.float32(1.0))  # a constant channel stays at zero
    x_train -= mean
    x_train /= std
    x_test -= mean
    x_test /= std
    return x_train, x_test


def _load_cifar10(path: Path, seed: int) -> Dataset:
    d = _cifar_dir(path, "cifar-10-batches-py", "data_batch_1")
    parts = [_read_cifar_batch(d / f"data_batch_{i}", b"labels") for i in range(1, 6)]
    x_test, y_test = _read_cifar_batch(d / "test_batch", b"labels")
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_train, x_test = _standardize(x_train, x_test)
    return Dataset("cifar10", x_train, y_train, x_test, y_test, 10, (3, 32, 32))


def _load_cifar100(path: Path, seed: int) -> Dataset:
    d = _cifar_dir(path, "cifar-100-python", "train")
    x_train, y_train = _read_cifar_batch(d / "train", b"fine_labels")
    x_test, y_test = _read_cifar_batch(d / "test", b"fine_labels")
    x_train, x_test = _standardize(x_train, x_test)
    return Dataset("cifar100", x_train, y_train, x_test, y_test, 100, (3, 32, 32))


# --- MNIST (IDX files) --------------------------------------------------------------------

_IDX_IMAGES = 0x00000803  # unsigned bytes, 3 dimensions (N, rows, cols)
_IDX_LABELS = 0x00000801  # unsigned bytes, 1 dimension (N,)


def _find_idx(root: Path, stem: str) -> Path:
    # Some mirrors write "train-images.idx3-ubyte"; accept both spellings, gzipped or not.
    alt = stem.replace("-idx", ".idx")
    for d in (root, root / "MNIST" / "raw", root / "raw"):
        for name in (stem, stem + ".gz", alt, alt + ".gz"):
            if (d / name).is_file():
                return d / name
    raise ConfigError(f"mnist source: no {stem}[.gz] in {root}")


def _read_idx(file: Path, magic: int) -> np.ndarray:
    """Parse one IDX file of unsigned bytes, checking its magic number and length."""
    opener: Callable = gzip.open if file.suffix == ".gz" else open
    try:
        with opener(file, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ShardError(f"cannot read IDX file {file}: {e}") from e
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ShardError(f"IDX file {file} is truncated: {len(raw)} bytes, header needs {header}")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ShardError(
            f"{file} is not an IDX file of the expected kind: magic number 0x{found:08x}, "
            f"expected 0x{magic:08x}"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = math.prod(dims)
    if len(raw) - header != size:
        raise ShardError(
            f"IDX file {file} holds {len(raw) - header} data bytes, its header {dims} "
            f"promises {size}: the file is truncated or corrupted"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_mnist(path: Path, seed: int) -> Dataset:
    if not path.is_dir():
        raise ConfigError(f"mnist source: {path} is not a directory of IDX files")

    def split(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        x = _read_idx(_find_idx(path, f"{prefix}-images-idx3-ubyte"), _IDX_IMAGES)
        y = _read_idx(_find_idx(path, f"{prefix}-labels-idx1-ubyte"), _IDX_LABELS)
        if len(x) != len(y):
            raise ShardError(f"mnist {prefix}: {len(x)} images but {len(y)} labels in {path}")
        x = (x.astype(np.float32) / 255.0)[:, None, :, :]
        return x, y.astype(np.int64)

    x_train, y_train = split("train")
    x_test, y_test = split("t10k")
    shape = tuple(int(s) for s in x_train.shape[1:])
    if x_test.shape[1:] != shape:
        raise ShardError(f"mnist: train images are {shape}, test images {x_test.shape[1:]}")
    return Dataset("mnist", x_train, y_train, x_test, y_test, 10, shape)


# --- synthetic ----------------------------------------------------------------------------


def synthetic_bytes(n_train: int, n_test: int, num_classes: int, features: int) -> int:
    """Peak memory of :func:`_load_synthetic`: float64 class means, then per split a float64
    draw, its means and the float32 result."""
    return 8 * num_classes * features + 20 * (n_train + n_test) * features


def _load_synthetic(
    path: Path | None,
    seed: int,
    n_train: int = 2048,
    n_test: int = 512,
    num_classes: int = 10,
    features: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    noise: float = 1.0,
) -> Dataset:
    """Gaussian classes around random means: learnable, but not perfectly separable."""
    for key, v in (("n_train", n_train), ("n_test", n_test), ("num_classes", num_classes)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ConfigError(f"synthetic source: {key} must be an integer >= 1, got {v!r}")
    if input_shape is None:
        input_shape = (32 if features is None else features,)
    input_shape = tuple(int(s) for s in input_shape)
    if any(s < 1 for s in input_shape) or not input_shape:
        raise ConfigError(
            f"synthetic source: input_shape must be positive sizes, got {input_shape}"
        )
    d = math.prod(input_shape)
    if features is not None and features != d:
        raise ConfigError(
            f"synthetic source: features={features} disagrees with input_shape={input_shape}"
        )
    if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise > 0):
        raise ConfigError(f"synthetic source: noise must be > 0, got {noise!r}")
    check_bytes(f"synthetic source: {n_train} + {n_test} samples of {d} features in {num_classes} classes",
                synthetic_bytes(n_train, n_test, num_classes, d))
    rng = np.random.default_rng(seed)
    # Mean spread 0.5 per coordinate: with 32 features and unit noise, classes overlap a
    # little, so accuracy curves have somewhere to go.
    means = rng.normal(0.0, 0.5, size=(num_classes, d))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.arange(n) % num_classes).astype(np.int64)  # balanced classes
        x = means[y] + rng.normal(0.0, noise, size=(n, d))
        return x.astype(np.float32).reshape((n, *input_shape)), y

    x_train, y_train = draw(int(n_train))
    x_test, y_test = draw(int(n_test))
    return Dataset("synthetic", x_train, y_train, x_test, y_test, int(num_classes), input_shape)


_LOADERS: dict[str, Callable[..., Dataset]] = {
    "digits": _load_digits,
    "npz": _load_npz,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "mnist": _load_mnist,
    "synthetic": _load_synthetic,
}
_OPTIONS: dict[str, tuple[str, ...]] = {
    "digits": (),
    "npz": ("num_classes",),
    "cifar10": (),
    "cifar100": (),
    "mnist": (),
    "synthetic": ("n_train", "n_test", "num_classes", "features", "input_shape", "noise"),
}
NEEDS_PATH = {
    "npz": "a .npz file with arrays x_train, y_train, x_test, y_test",
    "cifar10": "the cifar-10-batches-py directory or its parent",
    "cifar100": "the cifar-100-python directory or its parent",
    "mnist": "a directory with the four MNIST IDX files (optionally .gz)",
}
