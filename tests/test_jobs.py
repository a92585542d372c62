"""The job templates under jobs/: every command they would run parses, signals lead to requeues.

Each script has a dry-run mode (HPCSGD_DRY_RUN=1) that prints the one command line it would
run; the `hpcsgd train ...` part of that line is fed to the real argument parser and config
builder, as `hpcsgd.cli.run_train` does. The sbatch scripts run under plain bash with fake
SLURM_* variables and, for the signal and requeue logic, fake `srun` and `scontrol`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcsgd.cli import build_parser, train_overrides
from hpcsgd.config import build_config, load_toml, validate_for_world

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
BIN = Path(sys.executable).parent
TRAIN_SBATCH = JOBS / "slurm" / "train.sbatch"
SWEEP_SBATCH = JOBS / "slurm" / "sweep.sbatch"
SUBMIT_SWEEP = JOBS / "slurm" / "submit-sweep.sh"
RUN_SH = JOBS / "local" / "run.sh"
SWEEP_SH = JOBS / "local" / "sweep.sh"
SBATCH_SCRIPTS = [TRAIN_SBATCH, SWEEP_SBATCH]
SCRIPTS = sorted([*JOBS.rglob("*.sh"), *JOBS.rglob("*.sbatch")])
GRIDS = sorted((JOBS / "sweeps").glob("*.txt"))
CONFIGS = sorted((JOBS / "configs").glob("*.toml"))
SWEEP_RANKS = 4  # every grid in jobs/sweeps is for the digits experiments on 4 ranks


def _this_mpi_plugin() -> str:
    """The templates' guess for this venv's MPI: pmi2 for the mpich wheel, pmix for Open MPI."""
    from mpi4py import MPI

    return "pmix" if "Open MPI" in MPI.Get_library_version() else "pmi2"


THIS_MPI_PLUGIN = _this_mpi_plugin()

FAKE_SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "hpcsgd",
    "SLURM_ARRAY_JOB_ID": "4200",
    "SLURM_CPUS_PER_TASK": "8",
    "SLURM_NTASKS": "8",
    "SLURM_NNODES": "2",
}


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HPCSGD_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["HPCSGD_PYTHON"] = sys.executable
    env["HPCSGD_MPIEXEC"] = str(BIN / "mpiexec")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def _bash(script: Path, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script), *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=_env(**env), cwd=ROOT,
    )


def dry_run(script: Path, *args: str, **env: str) -> list[list[str]]:
    """The command lines a script prints in dry-run mode, each split as the shell would."""
    result = _bash(script, *args, HPCSGD_DRY_RUN="1", **env)
    assert result.returncode == 0, f"{script.name} {args}: {result.stderr}"
    lines = result.stdout.splitlines()
    assert lines, f"{script.name} printed nothing"
    return [shlex.split(line) for line in lines]


def parse_train(argv: list[str]):
    """Find `hpcsgd train ...` in a command line and build its config as `hpcsgd train` would."""
    starts = [i for i in range(len(argv) - 1) if argv[i : i + 2] == ["hpcsgd", "train"]]
    assert starts, f"no `hpcsgd train` in {argv}"
    i = starts[0]
    assert argv[i - 3 : i] == ["-m", "mpi4py", "-m"], f"not launched as `python -m mpi4py -m hpcsgd`: {argv}"
    args = build_parser().parse_args(["train", *argv[i + 2 :]])
    config = None
    if args.config:
        config = Path(args.config) if Path(args.config).is_absolute() else ROOT / args.config
        assert config.is_file(), config
    file_values = load_toml(config) if config else {}
    overrides = train_overrides(args)
    return build_config(file_values, overrides, source=str(config or "config"))


def grid_runs(grid: Path) -> list[str]:
    lines = [line.strip() for line in grid.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def grid_config(grid: Path) -> Path | None:
    for line in grid.read_text().splitlines():
        m = re.match(r"^#\s*config:\s*(\S+)", line)
        if m:
            return (grid.parent / m[1]).resolve()
    return None


# ---- configs and grid files ------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config):
    build_config(load_toml(config), {"data": "x", "run_dir": "y"}, source=str(config))


def test_experiment_configs_exist_and_cifar_recipe():
    names = {p.name for p in CONFIGS}
    for name in ("rps-vs-gradient-sharing.toml", "risgd-q-tau.toml", "fault-tolerance.toml",
                 "gradient-diversity.toml", "cifar10-resnet20-rps.toml", "digits-risgd.toml"):
        assert name in names, name
    cfg = build_config(load_toml(JOBS / "configs" / "cifar10-resnet20-rps.toml"), {"data": "x", "run_dir": "y"})
    assert (cfg.model, cfg.algorithm, cfg.epochs, cfg.batch_size, cfg.lr) == ("resnet20", "rps", 200, 32, 0.1)
    assert (cfg.momentum, cfg.weight_decay, cfg.lr_schedule, cfg.lr_milestones) == (0.9, 5e-4, "step", [100, 150])


def test_grid_files_cover_the_experiments():
    runs = {g.name: grid_runs(g) for g in GRIDS}
    rps = runs["rps-vs-lossy-allreduce.txt"]
    for algorithm in ("rps", "lossy-allreduce"):
        for drop in ("0", "0.01", "0.05", "0.1", "0.2", "0.4"):
            assert f"--algorithm {algorithm} --drop-rate {drop}" in rps
    risgd = runs["risgd-q-tau.txt"]
    assert len(risgd) == 10 and any("--algorithm sync" in line for line in risgd)
    for q in (1, 2, 3):
        for tau in (1, 4, 16):
            assert f"--algorithm local --q {q} --tau {tau}" in risgd
    faults = runs["fault-tolerance.txt"]
    assert sorted(faults) == sorted(["--q 1", "--q 2", "--q 1 --fail 3@230", "--q 2 --fail 3@230",
                                     "--q 2 --fail 3@230 --reweight"])


@pytest.mark.parametrize("grid", GRIDS, ids=lambda p: p.name)
def test_every_grid_line_parses(grid):
    config = grid_config(grid)
    assert config is not None and config.is_file(), f"{grid.name}: no `# config:` line naming a file"
    file_values = load_toml(config)
    runs = grid_runs(grid)
    assert runs
    for line in runs:
        args = build_parser().parse_args(["train", *shlex.split(line)])
        assert args.config is None, f"{grid.name}: {line!r} names a config; use the `# config:` line"
        overrides = train_overrides(args)
        cfg = build_config(file_values, {**overrides, "data": "x", "run_dir": "y"}, source=str(config))
        validate_for_world(cfg, SWEEP_RANKS)
        # The steps in the fault grid must fall inside the run.
        for step in cfg.faults.values():
            assert 0 < step < cfg.epochs * 23, (grid.name, line)  # digits on 4 ranks: 23 steps/epoch at b=16


# ---- Slurm templates ------------------------------------------------------------------------


@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=lambda p: p.name)
def test_sbatch_has_signal_requeue_and_mpi_detection(script):
    text = script.read_text()
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    joined = "\n".join(directives)
    for option in ("--signal=", "--requeue", "--ntasks-per-node=", "--gpus-per-task=1", "--cpus-per-task=", "--time="):
        assert option in joined, f"{script.name}: no #SBATCH {option}"
    # The PMI plugin follows the MPI (HPCSGD_SRUN_MPI overrides); no binding is assumed.
    assert "srun_mpi_plugin" in text and "HPCSGD_SRUN_MPI" in text and "HPCSGD_SRUN_ARGS" in text
    command = text[text.index("cmd=(srun"):]
    assert "--cpu-bind" not in command[:command.index("train)")]
    assert "scontrol requeue" in text and "OMP_NUM_THREADS" in text and "${HPCSGD_PYTHON:-python}" in text
    m = re.search(r"--signal=(B:)?USR1@\d+", joined)
    assert m, "the warning must be SIGUSR1 (what hpcsgd checkpoints on)"
    if m[1]:  # the batch shell gets it: it must forward it to srun
        assert "trap 'on_signal USR1' USR1" in text and 'kill -s USR1 "$srun_pid"' in text
    # The lines a user edits come before any command.
    assert text.index("EDIT") < text.index("set -euo pipefail") < text.index("cmd=(srun")


def test_train_sbatch_dry_run_parses():
    (argv,) = dry_run(TRAIN_SBATCH, **FAKE_SLURM)
    assert argv[:2] == ["srun", f"--mpi={THIS_MPI_PLUGIN}"] and not any(a.startswith("--cpu-bind") for a in argv)
    assert "--cpus-per-task=8" in argv and argv[argv.index("-m") - 1] == sys.executable
    cfg = parse_train(argv)
    assert cfg.resume and cfg.model == "resnet20" and cfg.run_dir == "runs/hpcsgd-4242"
    assert cfg.data == "data/cifar10-p8"


def _fake_python(tmp_path: Path, version: str) -> Path:
    """A python whose `-m mpi4py --mpi-lib-version` prints ``version`` (what the templates ask)."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/usr/bin/env bash\nif [[ \"$*\" == *--mpi-lib-version* ]]; then echo '{version}'; fi\n")
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=lambda p: p.name)
@pytest.mark.parametrize(
    "version, plugin",
    [
        ("Open MPI v4.1.5, package: Open MPI builder Distribution, ident: 4.1.5", "pmix"),
        ("MPICH Version:      4.2.1\nMPICH Release date: Wed Apr 17 2024", "pmi2"),
        ("MVAPICH2 Version      :\t2.3.7", "pmi2"),
        ("MPI VERSION    : CRAY MPICH version 8.1.28.4 (ANL base 3.4a2)", "cray_shasta"),
        ("Some Vendor MPI 1.0", None),  # unknown: no --mpi, the cluster's MpiDefault applies
    ],
)
def test_sbatch_picks_the_pmi_plugin_of_the_mpi_in_use(script, tmp_path, version, plugin):
    fake = _fake_python(tmp_path, version)
    (argv,) = dry_run(script, *_sbatch_args(script, tmp_path), HPCSGD_PYTHON=str(fake), SLURM_ARRAY_TASK_ID="0",
                      **FAKE_SLURM)
    assert argv[0] == "srun" and argv[argv.index("-m") - 1] == str(fake)
    mpi_flags = [a for a in argv if a.startswith("--mpi=")]
    assert mpi_flags == ([f"--mpi={plugin}"] if plugin else [])


@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=lambda p: p.name)
def test_sbatch_plugin_and_site_flags_can_be_set(script, tmp_path):
    (argv,) = dry_run(script, *_sbatch_args(script, tmp_path), HPCSGD_SRUN_MPI="pmix",
                      HPCSGD_SRUN_ARGS="--cpu-bind=cores --exclusive", SLURM_ARRAY_TASK_ID="0", **FAKE_SLURM)
    assert argv[:2] == ["srun", "--mpi=pmix"]
    assert argv.index("--cpu-bind=cores") < argv.index("--exclusive") < argv.index("-m")
    parse_train(argv)


@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=lambda p: p.name)
def test_sbatch_mpiexec_launcher_is_the_wheels_hydra(script, tmp_path):
    """HPCSGD_LAUNCHER=mpiexec: the mpiexec beside the Python that runs hpcsgd, over Slurm, one
    rank per task; anything else but srun is refused before anything starts."""
    (argv,) = dry_run(script, *_sbatch_args(script, tmp_path), HPCSGD_LAUNCHER="mpiexec", HPCSGD_PYTHON=sys.executable,
                      SLURM_ARRAY_TASK_ID="0", **FAKE_SLURM)
    assert argv[0] == str(Path(sys.prefix) / "bin" / "mpiexec")
    assert argv[1:5] == ["-launcher", "slurm", "-n", FAKE_SLURM["SLURM_NTASKS"]] and argv[5] == sys.executable
    assert not any(a.startswith("--mpi=") for a in argv)
    parse_train(argv)
    bad = _bash(script, *_sbatch_args(script, tmp_path), HPCSGD_DRY_RUN="1", HPCSGD_LAUNCHER="mpirun",
                SLURM_ARRAY_TASK_ID="0", **FAKE_SLURM)
    assert bad.returncode == 2 and "HPCSGD_LAUNCHER must be srun or mpiexec, got 'mpirun'" in bad.stderr


def test_train_sbatch_dry_run_takes_env_and_flags(tmp_path):
    (argv,) = dry_run(
        TRAIN_SBATCH, "--q", "2", "--drop-rate", "0.1", "--fail", "3@100",
        HPCSGD_CONFIG="jobs/configs/risgd-q-tau.toml", HPCSGD_DATA=str(tmp_path / "shards"),
        HPCSGD_RUN_DIR=str(tmp_path / "run dir"), **FAKE_SLURM,
    )
    cfg = parse_train(argv)
    assert (cfg.q, cfg.drop_rate, cfg.fail, cfg.tau) == (2, 0.1, ["3@100"], 4)
    assert cfg.run_dir == str(tmp_path / "run dir") and cfg.data == str(tmp_path / "shards")
    (argv,) = dry_run(TRAIN_SBATCH, HPCSGD_CONFIG="", **FAKE_SLURM)  # no config file at all
    assert parse_train(argv).algorithm == "local"


@pytest.mark.parametrize("grid", GRIDS, ids=lambda p: p.name)
def test_sweep_sbatch_dry_run_every_index_parses(grid):
    run_dirs = []
    for index, line in enumerate(grid_runs(grid)):
        (argv,) = dry_run(SWEEP_SBATCH, grid.relative_to(ROOT), SLURM_ARRAY_TASK_ID=str(index), **FAKE_SLURM)
        assert argv[:2] == ["srun", f"--mpi={THIS_MPI_PLUGIN}"]
        cfg = parse_train(argv)
        validate_for_world(cfg, SWEEP_RANKS)
        assert cfg.resume
        args = build_parser().parse_args(["train", *shlex.split(line)])
        overrides = train_overrides(args)
        expected = build_config(load_toml(grid_config(grid)), {**overrides, "data": cfg.data, "run_dir": cfg.run_dir,
                                                               "resume": True, "progress": "lines"})
        assert cfg == expected, line
        assert cfg.run_dir.startswith(f"runs/{grid.stem}/")
        run_dirs.append(cfg.run_dir)
    assert len(set(run_dirs)) == len(run_dirs), "two runs of one sweep share a run directory"


def test_sweep_sbatch_names_run_dirs_after_flags_and_checks_the_index():
    grid = "jobs/sweeps/fault-tolerance.txt"
    (argv,) = dry_run(SWEEP_SBATCH, grid, "--lr", "0.2", SLURM_ARRAY_TASK_ID="3", HPCSGD_SWEEP_DIR="out", **FAKE_SLURM)
    cfg = parse_train(argv)
    assert cfg.run_dir == "out/q=2_fail=3@230" and cfg.lr == 0.2 and cfg.faults == {3: 230}
    for index in ("5", "-1"):
        bad = _bash(SWEEP_SBATCH, grid, HPCSGD_DRY_RUN="1", SLURM_ARRAY_TASK_ID=index)
        assert bad.returncode == 2 and "array index" in bad.stderr
    assert _bash(SWEEP_SBATCH, grid, HPCSGD_DRY_RUN="1").returncode == 2  # not an array task


def test_experiments_name_runs_as_the_sweep_scripts_do():
    """tools/experiments.py skips finished runs by directory name: it must match sweep.sbatch's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("experiments", ROOT / "tools" / "experiments.py")
    experiments = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiments)
    grid = "jobs/sweeps/fault-tolerance.txt"
    for index, line in enumerate(grid_runs(ROOT / grid)):
        (argv,) = dry_run(SWEEP_SBATCH, grid, SLURM_ARRAY_TASK_ID=str(index), HPCSGD_SWEEP_DIR="out", **FAKE_SLURM)
        assert parse_train(argv).run_dir == "out/" + experiments.run_name(shlex.split(line))
    assert experiments.run_name(["--q", "2", "--reweight"]) == "q=2_reweight"
    assert experiments.run_name([]) == "defaults"


def test_submit_sweep_sets_the_array_from_the_grid():
    for grid in GRIDS:
        (argv,) = dry_run(SUBMIT_SWEEP, grid.relative_to(ROOT), "--lr", "0.2", HPCSGD_MAX_PARALLEL="3")
        assert argv[0] == "sbatch" and argv[1] == f"--array=0-{len(grid_runs(grid)) - 1}%3"
        assert argv[2] == str(SWEEP_SBATCH) and argv[3:] == [str(grid.relative_to(ROOT)), "--lr", "0.2"]


# ---- local scripts --------------------------------------------------------------------------


def test_local_run_dry_run_detects_this_mpi():
    (argv,) = dry_run(RUN_SH, "-n", "4", "jobs/configs/digits-risgd.toml", "--data", "s", "--run-dir", "r", "--q", "2")
    assert argv[0] == str(BIN / "mpiexec")
    assert argv[argv.index("-n") + 1] == "4"
    version = subprocess.run([str(BIN / "mpiexec"), "--version"], capture_output=True, text=True).stdout
    if "HYDRA" in version:  # the mpich wheel: environment passed with -genv, no --oversubscribe
        assert "-genv" in argv and "--oversubscribe" not in argv
    cfg = parse_train(argv)
    assert (cfg.q, cfg.tau, cfg.data, cfg.run_dir) == (2, 8, "s", "r")


@pytest.mark.parametrize(
    "flavor, ranks, threads, expect, absent",
    [
        ("openmpi", "512", "1", ["--oversubscribe", "--bind-to", "none", "-x", "OMP_NUM_THREADS"], ["-genv"]),
        ("openmpi", "1", "1", ["--bind-to", "core", "-x", "PYTHONPATH"], ["--oversubscribe"]),
        ("mpich", "512", "1", ["-genv", "OMP_NUM_THREADS"], ["--oversubscribe", "-x"]),
        ("other", "3", "2", [], ["-genv", "-x", "--bind-to"]),
    ],
)
def test_local_run_dry_run_flags_per_mpi(flavor, ranks, threads, expect, absent):
    (argv,) = dry_run(RUN_SH, "-n", ranks, "--data", "s", "--run-dir", "r",
                      HPCSGD_MPI_FLAVOR=flavor, OMP_NUM_THREADS=threads)
    for flag in expect:
        assert flag in argv, (flavor, argv)
    for flag in absent:
        assert flag not in argv, (flavor, argv)
    assert argv[argv.index("-n") + 1] == ranks
    if flavor == "mpich":
        assert argv[argv.index("OMP_NUM_THREADS") + 1] == threads
    parse_train(argv)


@pytest.mark.parametrize(
    "version, flag",
    [("mpirun (Open MPI) 4.1.5", "--oversubscribe"), ("mpiexec (OpenRTE) 3.1.6", "--oversubscribe"),
     ("mpiexec (Open MPI) 5.0.3", ":OVERSUBSCRIBE")],
)
def test_local_run_detects_open_mpi_versions(tmp_path, version, flag):
    fake = tmp_path / "mpiexec"
    fake.write_text(f"#!/usr/bin/env bash\necho '{version}'\n")
    fake.chmod(0o755)
    (argv,) = dry_run(RUN_SH, "-n", "512", "--data", "s", "--run-dir", "r", HPCSGD_MPIEXEC=str(fake))
    assert argv[0] == str(fake) and flag in argv and "-x" in argv and "-genv" not in argv
    parse_train(argv)


def test_local_run_needs_rank_count():
    for args in ([], ["--data", "s"], ["-n", "zero"], ["-n", "0"]):
        result = _bash(RUN_SH, *args, HPCSGD_DRY_RUN="1")
        assert result.returncode == 2 and "usage" in result.stderr


@pytest.mark.parametrize("grid", GRIDS, ids=lambda p: p.name)
def test_local_sweep_dry_run_matches_sbatch_names(grid, tmp_path):
    rel = grid.relative_to(ROOT)
    runs = grid_runs(grid)
    commands = dry_run(SWEEP_SH, "-n", "4", rel, "--data", "shards", "--out", tmp_path / "sw")
    assert len(commands) == len(runs)
    local_names = []
    for argv in commands:
        cfg = parse_train(argv)
        validate_for_world(cfg, SWEEP_RANKS)
        assert cfg.resume and cfg.data == "shards"
        local_names.append(Path(cfg.run_dir).name)
    slurm_names = []
    for index in range(len(runs)):
        (argv,) = dry_run(SWEEP_SBATCH, rel, SLURM_ARRAY_TASK_ID=str(index), **FAKE_SLURM)
        slurm_names.append(Path(parse_train(argv).run_dir).name)
    assert local_names == slurm_names
    # A finished run is skipped when the sweep is run again.
    done = tmp_path / "sw" / local_names[0]
    done.mkdir(parents=True)
    (done / "summary.json").write_text("{}")
    assert len(dry_run(SWEEP_SH, "-n", "4", rel, "--data", "shards", "--out", tmp_path / "sw")) == len(runs) - 1


# ---- shellcheck ------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean():
    assert len(SCRIPTS) >= 5
    result = subprocess.run(["shellcheck", "--shell=bash", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_strict_bash(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text and "HPCSGD_DRY_RUN" in text
    assert os.access(script, os.X_OK)


# ---- signal -> checkpoint -> requeue, with fake srun and scontrol ---------------------------

FAKE_SRUN = """#!/usr/bin/env bash
echo "srun-pid $$" >> "$FAKE_LOG"
case "$FAKE_MODE" in
    exit0) mkdir -p "$FAKE_RUN_DIR" && echo {} > "$FAKE_RUN_DIR/summary.json"; exit 0 ;;  # a finished run
    lost) exit 0 ;;  # Open MPI's mpirun after a node was lost whole: exit 0, no summary
    exit*) exit "${FAKE_MODE#exit}" ;;
esac
trap 'echo "srun got USR1" >> "$FAKE_LOG"; exit 3' USR1
trap 'echo "srun got TERM" >> "$FAKE_LOG"; exit 3' TERM
echo ready >> "$FAKE_LOG"
while :; do sleep 0.05; done
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_LOG"
"""


def _fake_bin(tmp_path: Path, srun: str) -> Path:
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("srun", srun), ("scontrol", FAKE_SCONTROL)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    return fake


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _sbatch_args(script: Path, tmp_path: Path) -> list[str]:
    if script == SWEEP_SBATCH:
        grid = tmp_path / "grid.txt"
        grid.write_text("# a one-run grid\n--q 1\n")
        return [str(grid)]
    return []


@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=lambda p: p.name)
@pytest.mark.parametrize(
    "mode, signals, restarts, rc, requeued",
    [
        ("wait", ["USR1"], "0", 0, True),          # time-limit warning: forwarded, checkpoint, requeue
        ("exit3", [], "0", 0, True),               # the steps were signalled directly (no B:)
        ("wait", ["TERM"], "0", 3, False),         # scancel / preemption: no requeue of our own
        ("wait", ["USR1"], "20", 3, False),        # requeued too often already
        ("exit0", [], "0", 0, False),              # finished
        ("exit1", [], "0", 1, False),              # crashed
        ("lost", [], "0", 1, False),               # the launcher said 0 but the run never finished
    ],
)
def test_sbatch_signal_forwarding_and_requeue(script, tmp_path, mode, signals, restarts, rc, requeued):
    fake = _fake_bin(tmp_path, FAKE_SRUN)
    log = tmp_path / "log"
    log.touch()
    env = _env(
        PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_MODE=mode,
        SLURM_RESTART_COUNT=restarts, SLURM_ARRAY_TASK_ID="0", HPCSGD_RUN_DIR=str(tmp_path / "run"),
        HPCSGD_SWEEP_DIR=str(tmp_path / "sweep"), FAKE_RUN_DIR=str(_run_dir_of(script, tmp_path)), **FAKE_SLURM,
    )
    proc = subprocess.Popen(["bash", str(script), *_sbatch_args(script, tmp_path)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if signals:
            _wait_for(lambda: "ready" in log.read_text(), 30, "the fake srun")
            srun_pid = int(re.search(r"srun-pid (\d+)", log.read_text())[1])
            for name in signals:
                proc.send_signal(getattr(signal, f"SIG{name}"))
                if name == "TERM":  # Slurm sends SIGTERM to the steps too
                    os.kill(srun_pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert proc.returncode == rc, err + text
    assert ("scontrol requeue 4242" in text) == requeued, text
    if mode == "lost":
        assert "the launcher exited 0 but the run did not finish" in err, err
    if signals == ["USR1"]:
        assert "srun got USR1" in text, "the warning did not reach srun"


# An srun whose MPI aborts after the ranks checkpointed (what srun reported before hpcsgd left
# with a plain exit 3): a complete checkpoint appears, then SIGKILL's 137. Or no checkpoint.
FAKE_SRUN_ABORT = """#!/usr/bin/env bash
echo "srun-pid $$" >> "$FAKE_LOG"
on_usr1() {
    if [[ "$FAKE_MODE" == checkpoint ]]; then
        mkdir -p "$FAKE_RUN_DIR/checkpoints/step-00000007" && touch "$FAKE_RUN_DIR/checkpoints/step-00000007/COMPLETE"
    fi
    exit 137
}
trap on_usr1 USR1
echo ready >> "$FAKE_LOG"
while :; do sleep 0.05; done
"""


def _run_dir_of(script: Path, tmp_path: Path) -> Path:
    """Where the one-run grid of _sbatch_args (or HPCSGD_RUN_DIR) puts the run."""
    return tmp_path / ("sweep/q=1" if script == SWEEP_SBATCH else "run")


@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=lambda p: p.name)
@pytest.mark.parametrize(
    "mode, stale, rc, requeued",
    [
        ("checkpoint", False, 0, True),  # the run dir says a checkpoint was written: requeue despite 137
        ("none", False, 137, False),  # no new checkpoint: a crash, not a stop
        ("none", True, 137, False),  # a checkpoint from an earlier launch does not count
    ],
)
def test_sbatch_reads_the_outcome_from_the_run_directory(script, tmp_path, mode, stale, rc, requeued):
    fake = _fake_bin(tmp_path, FAKE_SRUN_ABORT)
    log = tmp_path / "log"
    log.touch()
    run_dir = _run_dir_of(script, tmp_path)
    if stale:
        (run_dir / "checkpoints" / "step-00000003").mkdir(parents=True)
        (run_dir / "checkpoints" / "step-00000003" / "COMPLETE").touch()
        time.sleep(0.05)
    env = _env(
        PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_MODE=mode, FAKE_RUN_DIR=str(run_dir),
        SLURM_RESTART_COUNT="0", SLURM_ARRAY_TASK_ID="0", HPCSGD_RUN_DIR=str(tmp_path / "run"),
        HPCSGD_SWEEP_DIR=str(tmp_path / "sweep"), **FAKE_SLURM,
    )
    proc = subprocess.Popen(["bash", str(script), *_sbatch_args(script, tmp_path)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: "ready" in log.read_text(), 30, "the fake srun")
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert proc.returncode == rc, err + text
    assert ("scontrol requeue 4242" in text) == requeued, err + text


def test_sbatch_does_not_requeue_a_finished_run(tmp_path):
    """Exit 3 from a run that nonetheless wrote its summary (the stop came after the last step)."""
    fake = _fake_bin(tmp_path, '#!/usr/bin/env bash\nmkdir -p "$FAKE_RUN_DIR"\n'
                               'echo {} > "$FAKE_RUN_DIR/summary.json"\nexit 3\n')
    log = tmp_path / "log"
    log.touch()
    env = _env(PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_RUN_DIR=str(tmp_path / "run"),
               HPCSGD_RUN_DIR=str(tmp_path / "run"), SLURM_RESTART_COUNT="0", **FAKE_SLURM)
    result = subprocess.run(["bash", str(TRAIN_SBATCH)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3 and "requeue" not in log.read_text()
    assert "the run finished" in result.stderr


def _make_shards(out: Path, parts: int) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hpcsgd", "shard", "--source", "synthetic", "--parts", str(parts),
         "--out", str(out), "--synthetic-samples", "256"],
        capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


def test_local_run_trains_for_real(tmp_path):
    _make_shards(tmp_path / "shards", 2)
    result = _bash(RUN_SH, "-n", "2", "--data", tmp_path / "shards", "--run-dir", tmp_path / "run",
                   "--steps", "4", "--progress", "none", timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["ranks"] == 2


@pytest.mark.slow
def test_train_sbatch_usr1_checkpoints_requeues_and_resumes(tmp_path):
    """The whole chain with real hpcsgd ranks: srun is mpiexec, scontrol only records."""
    _make_shards(tmp_path / "shards", 2)
    config = tmp_path / "long.toml"
    config.write_text("steps = 3000\nmlp_hidden = [16]\nlog_every = 10\neval_every = 0\n")
    fake = _fake_bin(tmp_path, '#!/usr/bin/env bash\nwhile [[ "${1:-}" == --* ]]; do shift; done\n'
                               'exec "$FAKE_MPIEXEC" -n "$SLURM_NTASKS" "$@"\n')
    log = tmp_path / "log"
    run = tmp_path / "run"
    env = _env(
        PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_MPIEXEC=str(BIN / "mpiexec"),
        HPCSGD_CONFIG=str(config), HPCSGD_DATA=str(tmp_path / "shards"), HPCSGD_RUN_DIR=str(run),
        SLURM_JOB_ID="5151", SLURM_NTASKS="2", SLURM_CPUS_PER_TASK="1", SLURM_RESTART_COUNT="0",
    )
    metrics = run / "metrics" / "rank-0.jsonl"
    proc = subprocess.Popen(["bash", str(TRAIN_SBATCH)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: metrics.exists() and metrics.read_text().strip(), 240, "the first metric line")
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "scontrol requeue 5151" in log.read_text(), err
    assert "stopped by signal" in err and "Abort" not in err
    assert list(run.glob("checkpoints/step-*/COMPLETE")) and not (run / "summary.json").exists()
    # What the requeued job does: the same script, the same run dir, --resume.
    again = subprocess.run(["bash", str(TRAIN_SBATCH)], env={**env, "SLURM_RESTART_COUNT": "1"}, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == 3000
    assert log.read_text().count("requeue") == 1
