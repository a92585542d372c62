"""The `hpcsgd shard` subcommand's flags and summary."""

import argparse

import pytest

from hpcsgd.data import shard_cli
from hpcsgd.data.shards import read_index
from hpcsgd.errors import ConfigError


def parse(argv):
    parser = argparse.ArgumentParser(prog="hpcsgd shard")
    shard_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_shard_synthetic(tmp_path, capsys):
    out = tmp_path / "s"
    args = parse(["--source", "synthetic", "--parts", "3", "--partition", "label", "--out",
                  str(out), "--seed", "2", "--synthetic-samples", "90",
                  "--synthetic-classes", "3", "--synthetic-features", "4"])
    assert shard_cli.run(args) == 0
    index = read_index(out)
    assert (index.parts, index.partition, index.seed, index.input_shape) == (3, "label", 2, (4,))
    assert index.chunk_sizes == (30, 30, 30)
    text = capsys.readouterr().out
    assert "wrote 3 chunks (label, seed 2)" in text and "classes per chunk: min 1, max 1" in text


def test_defaults_and_flag_errors(tmp_path):
    args = parse(["--source", "digits", "--parts", "2", "--out", str(tmp_path)])
    assert (args.partition, args.seed, args.path) == ("iid", 0, None)
    for bad in (["--parts", "0"], ["--partition", "dirichlet:-1"], ["--source", "imagenet"]):
        argv = ["--source", "digits", "--parts", "2", "--out", str(tmp_path)] + bad
        with pytest.raises(SystemExit):
            parse(argv)
    args = parse(["--source", "digits", "--parts", "2", "--out", str(tmp_path),
                  "--synthetic-samples", "10"])
    with pytest.raises(ConfigError, match="only to --source synthetic"):
        shard_cli.run(args)
