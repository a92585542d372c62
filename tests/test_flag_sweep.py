"""Every flag of `hpcsgd shard`, `train` and `bench` swept with bad values: never a traceback.

The flags are read from the command line's argparse parsers, so a new flag is swept without a
line here. Each flag gets NaN, infinities, a negative, zero, a huge and a tiny number, the
empty string and a malformed number (plus the values in EXTRA), and each case ends one of two
ways:

- refused: exit 2 and exactly one line saying ``error:``, which names the flag (its option or
  config key; for a path, the path);
- accepted: then (flag, value) must be in ACCEPTED with the reason: a value the flag takes
  (a directory may be called ``nan``), or one whose no-op a warning names.

A case runs in-process, as far as the command goes before MPI: for train the config, then
what the run's assembly checks against the shards and a world of 4 ranks (shard index, fit to
the world, link rules, network, the model); for bench the argument check (and --project,
which needs no MPI); for shard the whole command. tests/test_cli_errors.py launches a few of
these cases under ``mpiexec -n 4`` to show the message reaches the user once.

``hpcsgd report`` is swept at parse level only: its values are checked by its own tests.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from hpcsgd import cli
from hpcsgd.errors import HpcsgdError

WORLD = 4  # the ranks the train checks assume

VALUES = {
    "nan": "nan", "inf": "inf", "-inf": "-inf", "negative": "-1", "zero": "0",
    "huge": "99999999999999999999999", "huge-float": "1e300", "tiny": "1e-300",
    "empty": "", "malformed": "1..2",
}

# Values of a flag's own syntax, and the cases of the README's bad-input table.
_RULES = ["2->2=0.5", "2->3=1..2", "to:9=0.5", "to:1=1e300", "from:1=.", "to:1=nan", "1-2=0.5"]
EXTRA: dict[str, list] = {
    "shard --partition": ["dirichlet:nan", "dirichlet:-1", "dirichlet:0", "dirichlet:1e300", "dirichlet:"],
    "shard --path": ["neg.npz", "str.npz", "complex.npz", "classes.npz", "two-classes.npz", "text.npz"],
    "shard --synthetic-features": ["100000000"],
    "train --straggle": ["1@2:99999999999999999999999", "1@2:1..2", "1@2:.", "1@5-2:0.5", "1@2:nan", "9@2:0.5"],
    "train --fail": ["-1@5", "1@", "9@1", "1@99999999999999999999999", "1@2 1@3", "0@1 1@1 2@1 3@1"],
    "train --link-drop": _RULES,
    "train --link-latency": _RULES,
    "train --link-bandwidth": _RULES + ["to:1=1e-9"],
    "train --lr-milestones": ["-1 5", "5"],
    "train --mlp-hidden": ["1000000000000", "100000 100000"],
    "train --model": ["nosuch.mod:make", "x:", "resnet20"],
    "train --threads": ["100000"],
    "train --link-drop-file": ["matrix.csv", "text.csv", "p4"],
    "train --config": ["bad.toml", "."],
    "train --epochs": ["1e18", "1e19"],
    "bench --table": ["bad.json", "dict.json", "rows.json", "one.json"],
    "bench --json": ["nodir/out.json", "."],
}

# Accepted values, each with its reason. A kind of VALUES or a literal value of EXTRA.
_ANY = set(VALUES) - {"empty"}
_NONNEG = {"zero", "tiny"}  # >= 0 and finite
ACCEPTED: dict[str, set[str]] = {
    # A directory may have any non-empty name (created, or read from, relative to the cwd).
    "train --run-dir": _ANY,
    "shard --out": _ANY,
    "bench --json": _ANY,  # a file of that name in the cwd
    # Zero is the documented "off", "all" or "automatic" of these; tiny is a small legal value.
    **{f"train --{f}": _NONNEG for f in (
        "momentum", "warmup-epochs", "drop-rate", "drop-rate-phase1", "drop-rate-phase2", "fail-rate",
        "link-latency-ms")},
    "train --lr-milestones": _NONNEG | {"5"},  # warned: milestones under the constant schedule do nothing
    "train --collective-timeout": {"zero", "tiny"},  # 0: off; tiny: every collective times out (exit 4, named)
    "train --eval-every": {"zero", "tiny"},  # 0 and below one step: evaluate at the end only
    "train --epochs": {"tiny", "1e18"},  # tiny: one step; 1e18 epochs of one step fit a 64-bit step count
    "train --bucket-mb": {"tiny", "huge", "huge-float"},  # one parameter per bucket / one bucket
    **{f"train --{f}": {"zero"} for f in (
        "steps", "log-every", "checkpoint-every", "threads", "eval-train-samples", "seed",
        "ranks-per-node", "balance-warmup")},  # ranks_per_node 0: detected from the ranks sharing memory;
    # balance_warmup 0: the default window (a quarter of an epoch, at least 3 steps)
    "shard --seed": {"zero"},
    # Warned: no message takes the link from a rank to itself.
    **{f"train --{f}": {"2->2=0.5"} for f in ("link-drop", "link-latency", "link-bandwidth")},
    "train --link-drop-file": {"matrix.csv", "empty"},  # warned: drop rates do nothing under local; "": no file
    # mu = 0 is local SGD; a tiny mu holds one sample of the next chunk. Spread 0: every rank mu.
    "train --redundancy": {"zero", "tiny"},
    "train --redundancy-spread": {"zero", "tiny"},
    "train --link-gbps": {"zero", "huge"},  # 0: unlimited; 1e23 Gb/s: as good as unlimited
    "train --lr": {"huge"},  # 1e23 fits float32: the loss diverges and the run stops with its own message
    "train --weight-decay": {"zero", "huge"},  # as --lr; a tiny one rounds to 0 in float32: refused
    "shard --partition": {"dirichlet:1e300"},  # ALPHA -> infinity: every chunk gets each class's share
    "bench --fabric-gbps": {"huge"},  # a fast fabric: the latency term is left
    "bench --fabric-latency-us": {"zero", "tiny"},  # no latency: the bandwidth term is left
    "train --fail": {"1@99999999999999999999999"},  # warned: after the run's last step, it never happens
    # No table at that path: the projection says so and uses the model's form only (as without
    # the packaged hpcsgd/bench/scaling.json); an unreadable or malformed table is refused.
    "bench --table": _ANY,
}

# Accepted cases whose no-op a warning must name (a fragment of it).
WARNED = {
    "train --lr-milestones 5": "lr_milestones apply to lr_schedule 'step' only",
    "train --lr-milestones zero": "lr_milestones apply to lr_schedule 'step' only",
    "train --link-drop 2->2=0.5": "link_drop rule '2->2=0.5' names the link from rank 2 to itself",
    "train --link-latency 2->2=0.5": "link_latency rule '2->2=0.5' names the link from rank 2 to itself",
    "train --link-bandwidth 2->2=0.5": "link_bandwidth rule '2->2=0.5' names the link from rank 2 to itself",
    "train --link-drop-file matrix.csv": "drop rates apply to rps and lossy-allreduce only",
    "train --fail 1@99999999999999999999999": "is at or after the run's last step",
    "train --average-optimizer-state present": "average_optimizer_state does nothing with momentum 0",
}


def _long(action: argparse.Action) -> str:
    longs = [o for o in action.option_strings if o.startswith("--")]
    return longs[0] if longs else f"--{action.dest}"


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _swept_actions(command: str) -> list[argparse.Action]:
    return [a for a in _subparsers()[command]._actions if not isinstance(a, argparse._HelpAction)]


def _cases():
    for command in ("shard", "train", "bench", "report"):
        for action in _swept_actions(command):
            flag = _long(action)
            values = [(kind, value) for kind, value in VALUES.items()]
            values += [(value, value) for value in EXTRA.get(f"{command} {flag}", [])]
            if action.nargs == 0:  # a switch: given alone, and given a value it cannot take
                values = [("present", None), ("nan", "=nan")]
            for kind, value in values:
                yield pytest.param(command, flag, kind, value, id=f"{command} {flag} {kind}")


# --- the fixture: shards, data files and tables the cases name, in a working directory ------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from hpcsgd.data import load_source, write_shards

    root = tmp_path_factory.mktemp("sweep")
    write_shards(load_source("synthetic", seed=0, n_train=128, n_test=32, num_classes=4, features=8), WORLD, "iid",
                 root / "p4", seed=0)
    x, y = np.zeros((20, 3), np.float32), np.arange(20) % 2
    np.savez(root / "good.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    np.savez(root / "neg.npz", x_train=x, y_train=np.r_[-1, y[1:]], x_test=x, y_test=y)
    np.savez(root / "str.npz", x_train=x.astype(str), y_train=y, x_test=x, y_test=y)
    np.savez(root / "complex.npz", x_train=x + 1j, y_train=y, x_test=x, y_test=y)
    np.savez(root / "classes.npz", x_train=x, y_train=y, x_test=x, y_test=y, num_classes=np.array(10**12))
    np.savez(root / "two-classes.npz", x_train=x, y_train=y, x_test=x, y_test=y, num_classes=np.array([2, 3]))
    (root / "text.npz").write_text("not a zip")
    np.savetxt(root / "matrix.csv", np.full((WORLD, WORLD), 0.1), delimiter=",")
    (root / "text.csv").write_text("a,b\n")
    (root / "bad.toml").write_text("lr = \n")
    (root / "bad.json").write_text("{")
    (root / "dict.json").write_text("{}")
    (root / "rows.json").write_text(json.dumps([{"ranks": "x"}]))
    (root / "one.json").write_text(json.dumps([{"ranks": 2, "bytes": 4, "allreduce_s": 1e-5, "alltoall_s": 1e-5}]))
    return root


def _cwd(workdir: Path, command: str) -> Path:
    """A working directory per command with the fixture's files: what `shard --out nan` writes is
    no shard directory `train --data nan` could find."""
    cwd = workdir / "cwd" / command
    if not cwd.exists():
        cwd.mkdir(parents=True)
        for name in os.listdir(workdir):
            if name != "cwd":
                (cwd / name).symlink_to(workdir / name)
    return cwd


# --- running one case in-process ----------------------------------------------------------


def _train_checks(args: argparse.Namespace) -> None:
    """What `hpcsgd train` checks before its first step, without MPI: config, shards, world, links, model."""
    from hpcsgd.train.assembly import duplicate_chunks, link_rates, model_for
    from hpcsgd.faults.netem import LinkNetwork
    from hpcsgd.config import validate_for_world
    from hpcsgd.data import read_index
    from hpcsgd.train.schedule import Schedule, pointless_settings

    cfg = cli.config_from_args(args)
    index = read_index(cfg.data)
    validate_for_world(cfg, WORLD, index.chunk_sizes)
    schedule = Schedule.from_config(cfg, index.train_size, WORLD)
    for message in pointless_settings(cfg, schedule.total_steps) + duplicate_chunks(index):
        print(f"hpcsgd: warning: {message}", file=sys.stderr)
    link_rates(cfg, WORLD)
    LinkNetwork.build(WORLD, cfg.link_latency_ms, cfg.link_gbps, cfg.link_latency, cfg.link_bandwidth)
    model_for(cfg, index)


def _bench_checks(args: argparse.Namespace) -> None:
    from hpcsgd import bench

    for message in bench.check_arguments(args):
        print(f"hpcsgd bench: warning: {message}", file=sys.stderr)
    if args.project:  # the only mode without MPI
        bench.run(args)


CHECKS = {"shard": lambda args: args.func(args), "train": _train_checks, "bench": _bench_checks,
          "report": lambda args: None}


def _argv(command: str, flag: str, value: str | None, workdir: Path) -> list[str]:
    base = {
        "shard": ["--source", "synthetic", "--parts", "2", "--out", "out"],
        "train": ["--data", str(workdir / "p4"), "--run-dir", "run"],
        "bench": [],
        "report": ["runs", "--out", "report"],
    }[command]
    if command == "shard" and flag == "--path":
        base = ["--source", "npz", "--parts", "2", "--out", "out"]
    if command == "bench" and flag in ("--table", "--fabric-gbps", "--fabric-latency-us", "--json"):
        base = ["--project", "--table", str(workdir / "none.json")] if flag != "--table" else ["--project"]
    if flag in base:  # the swept value replaces the base's
        i = base.index(flag)
        base = base[:i] + base[i + 2:]
    if flag == "--config":  # the positional CONFIG of train
        return [command, *([] if value is None else [value]), *base]
    if flag == "--runs":  # the positional RUN_DIR of report
        return [command, *([] if value is None else [value]), "--out", "report"]
    if value is not None and value.startswith("="):  # --switch=VALUE
        return [command, flag + value, *base]
    words = [] if value is None else (value.split(" ") if " " in value else [value])
    return [command, flag, *words, *base]


def _run(argv: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of ``hpcsgd ARGV`` through the command line's parser and checks."""
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        try:
            args = cli.build_parser().parse_args(argv)
            CHECKS[argv[0]](args)
            code = 0
        except SystemExit as exc:
            code = exc.code
        except HpcsgdError as exc:  # the command line's own handler prints it
            code = cli._report_error(exc)
    return code, err.getvalue()


def _names_the_flag(line: str, command: str, flag: str, value: str | None) -> bool:
    key = flag[2:].replace("-", "_")
    names = {flag, key, flag[2:]}
    if flag in ("--data", "--path", "--out", "--json", "--table", "--link-drop-file", "--config", "--runs") and value:
        names.add(value)  # a path: the message names the file
    return any(n in line for n in names)


@pytest.mark.parametrize("command,flag,kind,value", list(_cases()))
def test_every_flag_refuses_bad_values_in_one_line(command, flag, kind, value, workdir, monkeypatch):
    monkeypatch.chdir(_cwd(workdir, command))
    for name in cli._RANK_VARIABLES + cli._SIZE_VARIABLES:  # a serial command, whatever launched pytest
        monkeypatch.delenv(name, raising=False)
    argv = _argv(command, flag, value, workdir)
    code, err = _run(argv)  # an exception other than SystemExit / HpcsgdError fails the test with its traceback
    assert "Traceback" not in err, err
    if command == "report":
        assert code in (0, 2), err  # parse level only: report's values are checked by its own tests
        return
    if code == 0:
        accepted = ACCEPTED.get(f"{command} {flag}", set())
        assert kind in accepted or kind == "present", (
            f"hpcsgd {' '.join(argv)} was accepted: refuse it with a message naming {flag}, or list it in ACCEPTED "
            f"with the reason\n{err}")
        warning = WARNED.get(f"{command} {flag} {kind}")
        assert warning is None or warning in err, err
        return
    assert code == 2, (code, err)
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1, err
    assert _names_the_flag(errors[0], command, flag, value), err


def test_the_sweep_covers_every_flag_of_every_command():
    """Every option of shard, train, bench and report yields cases (a new flag is swept by itself)."""
    cases = list(_cases())
    swept = {(p.values[0], p.values[1]) for p in cases}
    for command in ("shard", "train", "bench", "report"):
        flags = {_long(a) for a in _swept_actions(command)}
        assert flags and {(command, f) for f in flags} <= swept
    assert len({p.id for p in cases}) == len(cases)
    assert len(cases) > 700
