"""The HDF5 shard format: one file per chunk, so a rank opens only the chunks it holds.

Layout of ``SHARD_DIR`` (format_version 1)::

    SHARD_DIR/index.h5
        attrs    format_version = 1, parts (P), partition (spec), seed, source,
                 num_classes, input_shape (int array), chunk_sizes (int64[P]),
                 chunk_checksums (str[P]), test_checksum (str), created_by (str)
        x_test   float32 (N_test, *input_shape)
        y_test   int64 (N_test,)
        class_counts  int64 (P, num_classes): samples of each class in each chunk
    SHARD_DIR/chunk-00000.h5 ... chunk-{P-1:05d}.h5
        attrs    format_version, chunk (index c), checksum, num_classes, class_counts
        x        float32 (chunk_sizes[c], *input_shape)
        y        int64 (chunk_sizes[c],)

A checksum is the SHA-256 hex digest of the little-endian float32 bytes of ``x`` followed by
the little-endian int64 bytes of ``y``; the index is the authority a chunk is checked against.

Every file is written under a temporary name in the same directory, fsynced and then renamed
with ``os.replace``, so a crash never leaves a half-written file under a final name. The index
is removed first and written last: a directory with an index is a complete shard set.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from hpcsgd import __version__
from hpcsgd.data.partition import parse_partition, partition_indices
from hpcsgd.data.sources import Dataset, validate_arrays
from hpcsgd.errors import ConfigError, ShardError
from hpcsgd.limits import check_bytes

FORMAT_VERSION = 1
INDEX_NAME = "index.h5"
_CHUNK_RE = re.compile(r"^chunk-(\d{5,})\.h5$")
_TMP_RE = re.compile(r"^\..+\.tmp-\d+$")
_INDEX_ATTRS = (
    "format_version", "parts", "partition", "seed", "source", "num_classes", "input_shape",
    "chunk_sizes", "chunk_checksums", "test_checksum", "created_by",
)


def chunk_name(c: int) -> str:
    """File name of chunk ``c`` inside a shard directory."""
    return f"chunk-{c:05d}.h5"


@dataclass(frozen=True)
class ShardIndex:
    """What ``index.h5`` says about a shard directory (read without loading any data)."""

    path: Path
    format_version: int
    parts: int
    partition: str
    seed: int
    source: str
    num_classes: int
    input_shape: tuple[int, ...]
    chunk_sizes: tuple[int, ...]
    chunk_checksums: tuple[str, ...]
    test_size: int
    test_checksum: str = ""
    class_counts: tuple[tuple[int, ...], ...] = ()
    created_by: str = ""

    def chunk_path(self, c: int) -> Path:
        """Path of chunk ``c``'s file."""
        return self.path / chunk_name(c)

    @property
    def train_size(self) -> int:
        """Number of training samples over all chunks."""
        return sum(self.chunk_sizes)

    def duplicate_chunks(self) -> list[tuple[int, ...]]:
        """Groups of chunks with the same checksum: the same samples in the same order.

        A partition never writes that (its chunks are disjoint), so it means a chunk file was
        copied over another and the index re-signed. Not refused: a data set of repeated
        samples can do it honestly; training warns.
        """
        groups: dict[str, list[int]] = {}
        for c, digest in enumerate(self.chunk_checksums):
            groups.setdefault(digest, []).append(c)
        return [tuple(g) for g in groups.values() if len(g) > 1]


def checksum(x: np.ndarray, y: np.ndarray) -> str:
    """SHA-256 hex digest of ``x`` (as little-endian float32) then ``y`` (little-endian int64)."""
    h = hashlib.sha256()
    # Fixed byte order keeps checksums identical across platforms.
    for array, dtype in ((x, "<f4"), (y, "<i8")):
        array = np.ascontiguousarray(array, dtype=dtype)
        if array.size:  # a zero-size view cannot be cast to bytes (an empty chunk)
            h.update(memoryview(array).cast("B"))
    return h.hexdigest()


# --- writing ------------------------------------------------------------------------------


def write_shards(
    dataset: Dataset,
    parts: int,
    partition: str,
    out_dir: str | os.PathLike,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> ShardIndex:
    """Partition ``dataset`` into ``parts`` chunks and write them to ``out_dir``.

    Args:
        dataset: the data set to shard (validated here).
        parts: number of chunks P, one per rank.
        partition: ``"iid"``, ``"label"`` or ``"dirichlet:ALPHA"``.
        out_dir: a new, empty or existing shard directory; anything else is refused.
        seed: seed of the partition.
        progress: called as ``progress(done, total)`` after each file (P chunks + index).

    Returns:
        The index of the written directory, as :func:`read_index` reads it back.
    """
    kind, alpha = parse_partition(partition)
    spec = kind if alpha is None else f"dirichlet:{alpha!r}"
    K = int(dataset.num_classes)
    shape = tuple(int(s) for s in dataset.input_shape)
    _validate_dataset(dataset, K, shape)
    pieces = partition_indices(dataset.y_train, parts, spec, seed)
    P = len(pieces)
    # The class counts (P x K int64, in the index and one row per chunk): before any file is made.
    check_bytes(f"num_classes {K} of {dataset.name} over {P} chunks (their class counts)", 8 * K * (P + 2))

    out = Path(out_dir)
    # The outermost directory this call creates (None: out exists): a failed first write
    # removes it, so no empty directory is left behind (what is in it is ours alone).
    made = next((a for a in reversed([out, *out.parents]) if not a.exists()), None)
    try:
        _prepare_dir(out)
        return _write_all(out, dataset, pieces, spec, seed, shape, progress)
    except BaseException:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise


def _write_all(out: Path, dataset: Dataset, pieces: list[np.ndarray], spec: str, seed: int,
               shape: tuple[int, ...], progress: Callable[[int, int], None] | None) -> ShardIndex:
    """The chunks, then the index, into a prepared ``out``."""
    K, P = int(dataset.num_classes), len(pieces)
    # Without an index the directory reads as incomplete until the new index lands.
    (out / INDEX_NAME).unlink(missing_ok=True)
    _fsync_dir(out)

    sizes, sums, counts = [], [], []
    for c, idx in enumerate(pieces):
        x = np.ascontiguousarray(dataset.x_train[idx], dtype=np.float32)
        y = np.ascontiguousarray(dataset.y_train[idx], dtype=np.int64)
        cs, cc = _write_chunk(out, c, x, y, K)
        sizes.append(len(y))
        sums.append(cs)
        counts.append(cc)
        if progress is not None:
            progress(c + 1, P + 1)

    # Chunks left over from an earlier sharding with more parts.
    for p in out.iterdir():
        m = _CHUNK_RE.match(p.name)
        if m and int(m.group(1)) >= P:
            p.unlink()

    _write_index(out, dataset, spec, seed, shape, sizes, sums, counts)
    if progress is not None:
        progress(P + 1, P + 1)
    return read_index(out)


def _validate_dataset(dataset: Dataset, K: int, shape: tuple[int, ...]) -> None:
    """Both splits' arrays are well-formed and their samples have the declared shape."""
    for split, x, y in (("training", dataset.x_train, dataset.y_train),
                        ("test", dataset.x_test, dataset.y_test)):
        where = f"the {split} set of {dataset.name}"
        validate_arrays(x, y, K, where)
        if tuple(x.shape[1:]) != shape:
            raise ShardError(f"{where}: samples have shape {x.shape[1:]}, input_shape is {shape}")


def _write_chunk(out: Path, c: int, x: np.ndarray, y: np.ndarray, K: int) -> tuple[str, np.ndarray]:
    """Chunk ``c``'s file, atomically; returns its checksum and class counts."""
    cs = checksum(x, y)
    cc = np.bincount(y, minlength=K).astype(np.int64)
    # libver v108+ stores a large class_counts attribute densely (many classes), as in the index.
    with _atomic_h5(out / chunk_name(c), libver=("v108", "latest")) as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["chunk"] = c
        f.attrs["checksum"] = cs
        f.attrs["num_classes"] = K
        f.attrs["class_counts"] = cc
        f.create_dataset("x", data=x)
        f.create_dataset("y", data=y)
    return cs, cc


def _write_index(out: Path, dataset: Dataset, spec: str, seed: int, shape: tuple[int, ...],
                 sizes: list[int], sums: list[str], counts: list[np.ndarray]) -> None:
    """The index (attributes, test split, class counts), atomically: written last, it completes the directory."""
    x_test = np.ascontiguousarray(dataset.x_test, dtype=np.float32)
    y_test = np.ascontiguousarray(dataset.y_test, dtype=np.int64)
    # libver v108+ stores large attribute arrays densely (no 64 KiB header limit) for big P.
    with _atomic_h5(out / INDEX_NAME, libver=("v108", "latest")) as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["parts"] = len(sizes)
        f.attrs["partition"] = spec
        f.attrs["seed"] = int(seed)
        f.attrs["source"] = dataset.name
        f.attrs["num_classes"] = int(dataset.num_classes)
        f.attrs["input_shape"] = np.asarray(shape, dtype=np.int64)
        f.attrs["chunk_sizes"] = np.asarray(sizes, dtype=np.int64)
        f.attrs["chunk_checksums"] = sums
        f.attrs["test_checksum"] = checksum(x_test, y_test)
        f.attrs["created_by"] = f"hpcsgd {__version__}"
        f.create_dataset("x_test", data=x_test)
        f.create_dataset("y_test", data=y_test)
        f.create_dataset("class_counts", data=np.stack(counts))


def _prepare_dir(out: Path) -> None:
    """Create ``out``, or check it is empty or a shard directory we may overwrite."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"shard output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    names = [p.name for p in out.iterdir()]
    if not names or INDEX_NAME in names:
        return
    # No index: accept only what an interrupted write_shards leaves behind.
    foreign = [n for n in names if not (_CHUNK_RE.match(n) or _TMP_RE.match(n))]
    if foreign:
        raise ConfigError(
            f"refusing to write shards into {out}: it is not empty and is not a shard "
            f"directory (no {INDEX_NAME}; found {foreign[0]!r}); choose a new or empty directory"
        )


@contextmanager
def _atomic_h5(path: Path, **kwargs) -> Iterator[h5py.File]:
    """Write an HDF5 file under a temporary name; fsync and rename it into place on success."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w", **kwargs) as f:
            yield f
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    """Make renames and unlinks in ``d`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- reading ------------------------------------------------------------------------------


def read_index(shard_dir: str | os.PathLike) -> ShardIndex:
    """Read ``SHARD_DIR/index.h5`` (attributes and shapes only, no training data)."""
    d = Path(shard_dir)
    f = d / INDEX_NAME
    if not f.is_file():
        raise ShardError(f"no shard index at {f}: run `hpcsgd shard` first")
    try:
        with h5py.File(f, "r") as h:
            attrs = {k: h.attrs[k] for k in h.attrs}
            missing = [k for k in ("x_test", "y_test", "class_counts") if k not in h]
            if missing:
                raise ShardError(f"shard index {f} lacks dataset(s) {', '.join(missing)}")
            test_size = int(h["y_test"].shape[0])
            x_test_shape = tuple(h["x_test"].shape)
            class_counts = np.asarray(h["class_counts"][()], dtype=np.int64)
    except OSError as e:
        raise ShardError(
            f"cannot read shard index {f}: the file is truncated, corrupted or not HDF5 ({e})"
        ) from e
    version = attrs.get("format_version")
    if version is None or int(version) != FORMAT_VERSION:
        raise ShardError(
            f"shard index {f} has format_version {version}, this hpcsgd reads "
            f"{FORMAT_VERSION}: re-run `hpcsgd shard`"
        )
    missing = [k for k in _INDEX_ATTRS if k not in attrs]
    if missing:
        raise ShardError(f"shard index {f} lacks attribute(s) {', '.join(missing)}")
    index = ShardIndex(
        path=d,
        format_version=int(version),
        parts=int(attrs["parts"]),
        partition=str(attrs["partition"]),
        seed=int(attrs["seed"]),
        source=str(attrs["source"]),
        num_classes=int(attrs["num_classes"]),
        input_shape=tuple(int(s) for s in np.atleast_1d(attrs["input_shape"])),
        chunk_sizes=tuple(int(s) for s in np.atleast_1d(attrs["chunk_sizes"])),
        chunk_checksums=tuple(str(s) for s in np.atleast_1d(attrs["chunk_checksums"])),
        test_size=test_size,
        test_checksum=str(attrs["test_checksum"]),
        class_counts=tuple(tuple(int(v) for v in row) for row in class_counts),
        created_by=str(attrs["created_by"]),
    )
    _check_index(f, index, class_counts.shape, x_test_shape)
    return index


def _check_index(f: Path, index: ShardIndex, counts_shape: tuple, x_test_shape: tuple) -> None:
    """The index's sizes, checksums, class counts and test split agree with its part count."""
    P = index.parts
    if P < 1 or len(index.chunk_sizes) != P or len(index.chunk_checksums) != P:
        raise ShardError(
            f"shard index {f} is inconsistent: parts={P} but {len(index.chunk_sizes)} chunk "
            f"sizes and {len(index.chunk_checksums)} checksums"
        )
    if counts_shape != (P, index.num_classes):
        raise ShardError(
            f"shard index {f}: class_counts has shape {counts_shape}, "
            f"expected ({P}, {index.num_classes})"
        )
    if x_test_shape != (index.test_size, *index.input_shape):
        raise ShardError(
            f"shard index {f}: x_test has shape {x_test_shape}, "
            f"expected ({index.test_size}, {', '.join(map(str, index.input_shape))})"
        )


def load_chunk(index: ShardIndex, c: int, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Load chunk ``c`` (opening only its file) and check it against the index.

    Args:
        index: from :func:`read_index`.
        c: chunk number in ``0..P-1``.
        verify: check the SHA-256 checksum (on by default; costs one pass over the bytes).

    Returns:
        ``(x, y)``: float32 features ``(n, *input_shape)`` and int64 labels ``(n,)``.
    """
    if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < index.parts:
        raise ConfigError(f"chunk must be in 0..{index.parts - 1} (P={index.parts}), got {c!r}")
    c = int(c)
    f = index.chunk_path(c)
    where = f"chunk {c} in {f}"
    if not f.is_file():
        raise ShardError(f"chunk {c} file {f} is missing: the shard directory is incomplete")
    x, y, attrs = _read_xy(f, "x", "y", where)
    if "chunk" in attrs and int(attrs["chunk"]) != c:
        raise ShardError(f"{where} says it is chunk {int(attrs['chunk'])}: files were mixed up")
    _check_arrays(index, x, y, index.chunk_sizes[c], where)
    if verify and checksum(x, y) != index.chunk_checksums[c]:
        raise ShardError(f"{where} fails its checksum: the file is corrupted or was changed")
    validate_arrays(x, y, index.num_classes, where)
    return x, y


def load_test(index: ShardIndex, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Load the test split stored in the index file, checked like a chunk."""
    f = index.path / INDEX_NAME
    where = f"the test set in {f}"
    if not f.is_file():
        raise ShardError(f"no shard index at {f}: run `hpcsgd shard` first")
    x, y, _ = _read_xy(f, "x_test", "y_test", where)
    _check_arrays(index, x, y, index.test_size, where)
    if verify and checksum(x, y) != index.test_checksum:
        raise ShardError(f"{where} fails its checksum: the file is corrupted or was changed")
    validate_arrays(x, y, index.num_classes, where)
    return x, y


def load_chunk_rows(index: ShardIndex, c: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Read only ``rows`` (sorted, unique) of chunk ``c``: an evaluation sample.

    No checksum (that needs the whole chunk); sizes, NaN and label range are still checked.
    """
    f = index.chunk_path(c)
    where = f"chunk {c} in {f}"
    if not f.is_file():
        raise ShardError(f"chunk {c} file {f} is missing: the shard directory is incomplete")
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows[0] < 0 or rows[-1] >= index.chunk_sizes[c] or np.any(np.diff(rows) <= 0)):
        raise ConfigError(f"rows of {where} must be sorted, unique and in 0..{index.chunk_sizes[c] - 1}")
    try:
        with h5py.File(f, "r") as h:
            x = h["x"][rows] if rows.size else h["x"][:0]
            y = h["y"][rows] if rows.size else h["y"][:0]
    except (OSError, KeyError) as e:
        raise ShardError(f"cannot read {where}: the file is truncated or corrupted ({e})") from e
    if rows.size:
        validate_arrays(x, y, index.num_classes, where)
    return x, y


def _read_xy(f: Path, xkey: str, ykey: str, where: str) -> tuple[np.ndarray, np.ndarray, dict]:
    try:
        with h5py.File(f, "r") as h:
            missing = [k for k in (xkey, ykey) if k not in h]
            if missing:
                raise ShardError(f"{where}: dataset(s) {', '.join(missing)} missing")
            x = h[xkey][()]
            y = h[ykey][()]
            attrs = {k: h.attrs[k] for k in h.attrs}
    except OSError as e:
        raise ShardError(f"cannot read {where}: the file is truncated or corrupted ({e})") from e
    return x, y, attrs


def _check_arrays(index: ShardIndex, x: np.ndarray, y: np.ndarray, n: int, where: str) -> None:
    """Sizes, shapes and dtypes must be what the index promises."""
    if y.shape != (n,):
        raise ShardError(f"{where} holds labels of shape {y.shape}; the index says {n} samples")
    if x.shape != (n, *index.input_shape):
        raise ShardError(
            f"{where} holds features of shape {x.shape}; the index says "
            f"({n}, {', '.join(map(str, index.input_shape))})"
        )
    if x.dtype != np.float32 or y.dtype != np.int64:
        raise ShardError(f"{where}: expected float32 features and int64 labels, "
                         f"got {x.dtype} and {y.dtype}")
