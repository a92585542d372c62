"""The ``hpcsgd shard`` subcommand: import a data set and write its HDF5 shards.

Runs on one process; no MPI is needed. ``hpcsgd/cli.py`` wires :func:`add_arguments` and
:func:`run` into its subparser; ``python -m hpcsgd.data.shard_cli`` runs it alone.
"""

from __future__ import annotations

import argparse
import sys

from hpcsgd.argtypes import nonempty
from hpcsgd.data.partition import parse_partition
from hpcsgd.data.shards import ShardIndex, write_shards
from hpcsgd.data.sources import NEEDS_PATH, SOURCES, load_source, synthetic_bytes
from hpcsgd.errors import ConfigError, HpcsgdError
from hpcsgd.limits import check_bytes


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {v}")
    return v


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..2**64-1, got {text!r}") from None
    if not 0 <= v < 2**64:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..2**64-1, got {v}")
    return v


def _partition(text: str) -> str:
    try:
        parse_partition(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``shard`` flags to ``parser``."""
    parser.add_argument("--source", required=True, choices=SOURCES,
                        help="data set to import: digits (bundled with scikit-learn), npz "
                             "(x_train, y_train, x_test, y_test arrays), cifar10, cifar100, "
                             "mnist (files you already have) or synthetic (generated)")
    parser.add_argument("--path", default=None, type=nonempty,
                        help="the .npz file, or the directory of the CIFAR batches / MNIST IDX "
                             "files (required for npz, cifar10, cifar100, mnist)")
    parser.add_argument("--parts", required=True, type=_positive_int, metavar="P",
                        help="number of chunks P: one per rank of the training job")
    parser.add_argument("--partition", default="iid", type=_partition,
                        metavar="{iid,label,dirichlet:ALPHA}",
                        help="how to cut the training set: iid (random, equal sizes), label "
                             "(sorted by label, strongly non-i.i.d.) or dirichlet:ALPHA (label "
                             "skew, smaller ALPHA = more skew); default: iid")
    parser.add_argument("--out", required=True, metavar="SHARD_DIR", type=nonempty,
                        help="directory to write index.h5 and chunk-NNNNN.h5 into (new, empty "
                             "or an earlier shard directory, which is overwritten)")
    parser.add_argument("--seed", type=_seed, default=0, metavar="S",
                        help="seed of the partition (and of the synthetic data); default: 0")
    parser.add_argument("--synthetic-samples", type=_positive_int, default=None, metavar="N",
                        help="synthetic: number of training samples (default 2048)")
    parser.add_argument("--synthetic-classes", type=_positive_int, default=None, metavar="K",
                        help="synthetic: number of classes (default 10)")
    parser.add_argument("--synthetic-features", type=_positive_int, default=None, metavar="F",
                        help="synthetic: features per sample (default 32)")


def run(args: argparse.Namespace) -> int:
    """Import ``args.source``, write the shards and print a summary; returns the exit code."""
    synthetic = {
        "n_train": args.synthetic_samples,
        "num_classes": args.synthetic_classes,
        "features": args.synthetic_features,
    }
    options = {k: v for k, v in synthetic.items() if v is not None}
    if options and args.source != "synthetic":
        raise ConfigError(
            f"--synthetic-* flags apply only to --source synthetic, not {args.source}"
        )
    path = args.path
    if path is not None and args.source not in NEEDS_PATH:
        print(f"hpcsgd shard: warning: --path does nothing with --source {args.source} (it reads no files)",
              file=sys.stderr)
        path = None
    if args.source == "synthetic":
        n, k, d = options.get("n_train", 2048), options.get("num_classes", 10), options.get("features", 32)
        check_bytes(f"--synthetic-samples {n} x --synthetic-features {d} (in --synthetic-classes {k})",
                    synthetic_bytes(n, 512, k, d))
    dataset = load_source(args.source, path, seed=args.seed, **options)
    print(f"loaded {dataset.name}: {len(dataset.y_train)} train / {len(dataset.y_test)} test "
          f"samples, {dataset.num_classes} classes, input shape {dataset.input_shape}")
    index = write_shards(dataset, args.parts, args.partition, args.out, args.seed)
    print(summary(index))
    return 0


def summary(index: ShardIndex) -> str:
    """A few lines on what was written: chunks, their sizes and classes per chunk."""
    sizes = index.chunk_sizes
    classes = [sum(1 for n in row if n > 0) for row in index.class_counts]
    lines = [
        f"wrote {index.parts} chunks ({index.partition}, seed {index.seed}) to {index.path}",
        f"  chunk sizes: min {min(sizes)}, max {max(sizes)}, total {sum(sizes)}; "
        f"test set: {index.test_size}",
        f"  classes per chunk: min {min(classes)}, max {max(classes)} "
        f"of {index.num_classes}",
    ]
    if index.parts <= 16:
        lines.append("  chunk  size  classes")
        lines += [f"  {c:5d}  {n:4d}  {k:7d}" for c, (n, k) in enumerate(zip(sizes, classes))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hpcsgd shard", description="Import a data set and write its HDF5 shards."
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except HpcsgdError as e:  # stand-alone use only; hpcsgd/cli.py has its own handler
        print(f"hpcsgd shard: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
