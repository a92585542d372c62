"""Whole jobs: the demo launched as a user would, with the default environment vs OMP_NUM_THREADS=1."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from .timing import format_rows, row, write_json

ENV_RANKS = 4
# The demo's config, jobs/configs/digits-risgd.toml (a test keeps the two equal), written for each
# launch: an installed hpcsgd has no jobs/ folder to read it from.
DEMO_CONFIG = {"algorithm": "local", "model": "mlp", "mlp_hidden": [256, 128], "tau": 8, "epochs": 20,
               "batch_size": 16, "lr": 0.1, "seed": 0, "eval_every": 5}
_LAUNCHER_VARIABLES = ("PMI_", "PMIX_", "MPI_LOCAL", "OMPI_", "HYDRA_")


def _clean_env(**extra: str) -> dict:
    """This environment without thread settings or a launcher's variables, plus ``extra``."""
    from ..comm.threads import THREAD_VARIABLES

    env = {k: v for k, v in os.environ.items()
           if k not in THREAD_VARIABLES and not k.endswith("_NUM_THREADS") and not k.startswith(_LAUNCHER_VARIABLES)}
    env.update(extra)
    return env


def _launch_demo(shards: Path, run_dir: Path, env: dict, epochs: float) -> dict:
    """One 4-rank demo run: seconds to the first step line, training loop (summary wall_s), process."""
    import shutil
    import subprocess

    shutil.rmtree(run_dir, ignore_errors=True)
    mpiexec = Path(sys.executable).parent / "mpiexec"
    from ..metrics import atomic_write_text, toml_text

    config = run_dir.parent / "digits-risgd.toml"
    atomic_write_text(config, toml_text(DEMO_CONFIG, "the demo's config (jobs/configs/digits-risgd.toml)"))
    cmd = [str(mpiexec if mpiexec.exists() else "mpiexec"), "-n", str(ENV_RANKS), sys.executable, "-m", "mpi4py",
           "-m", "hpcsgd", "train", str(config), "--data", str(shards), "--run-dir", str(run_dir), "--q", "2",
           "--epochs", str(epochs), "--progress", "lines"]
    t0 = time.perf_counter()
    first_step = float("nan")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if first_step != first_step and line.startswith("step "):
            first_step = time.perf_counter() - t0
    proc.wait()
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"demo run failed (exit {proc.returncode}):\n{''.join(lines[-20:])}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"first_step_s": first_step, "loop_s": summary["wall_s"], "process_s": total,
            "train_loss": summary["train_loss"]}


def env_rows(reps: int, quick: bool) -> list[dict]:
    """The demo with the default environment vs OMP_NUM_THREADS=1, alternating; best run of each side."""
    import shutil

    from ..data import load_source, write_shards

    tmp = Path(tempfile.mkdtemp(prefix="hpcsgd-bench-env-"))
    try:
        write_shards(load_source("digits"), ENV_RANKS, "label", tmp / "s", seed=0)
        epochs = 5 if quick else 20  # the demo runs 20
        sides = {"default": _clean_env(), "omp1": _clean_env(OMP_NUM_THREADS="1")}
        runs: dict[str, list[dict]] = {name: [] for name in sides}
        for i in range(reps):
            for name, env in (sides.items() if i % 2 == 0 else reversed(list(sides.items()))):
                runs[name].append(_launch_demo(tmp / "s", tmp / f"run-{name}", env, epochs))
                print(f"  {name:<8} loop {runs[name][-1]['loop_s']:6.2f}s  first step {runs[name][-1]['first_step_s']:6.2f}s"
                      f"  process {runs[name][-1]['process_s']:6.2f}s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if len({r["train_loss"] for rs in runs.values() for r in rs}) != 1:
        raise RuntimeError("the demo's result depends on the environment: " + repr(runs))
    # Best of N: the other jobs of a shared machine only ever add time to a whole 4-rank job
    # (here from 3 s to 9 s within one session), so each side's fastest run is the closest to
    # its own cost; every run is printed above to show the spread.
    best = {name: {k: min(r[k] for r in rs) for k in ("loop_s", "first_step_s", "process_s")}
            for name, rs in runs.items()}
    print(f"demo: digits, label shards, q=2, tau 8, {ENV_RANKS} ranks, {epochs:g} epochs; best of {reps} runs per side",
          flush=True)
    return [
        row("demo training loop, default environment / OMP_NUM_THREADS=1", best["default"]["loop_s"],
             best["default"]["loop_s"] / best["omp1"]["loop_s"], 1.05, key="demo_default_vs_omp1"),
        row("demo whole process, default environment / OMP_NUM_THREADS=1", best["default"]["process_s"],
             best["default"]["process_s"] / best["omp1"]["process_s"], None, key="demo_process_default_vs_omp1"),
        row("demo launch to first step line, default environment", best["default"]["first_step_s"], None, None,
             key="demo_launch_to_first_step_s"),
    ]


def run_env(args: argparse.Namespace) -> int:
    """``hpcsgd bench --env``: launches mpiexec itself, so it must not run under one."""
    if any(k.startswith(("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")) for k in os.environ):
        from ..errors import ConfigError

        raise ConfigError("hpcsgd bench --env launches its own mpiexec jobs: run it without mpiexec")
    reps = args.reps or (1 if args.quick else 3)
    print(f"hpcsgd bench --env: {reps} run(s) per side, alternated", flush=True)
    rows = env_rows(reps, args.quick)
    print(format_rows(rows), flush=True)
    write_json(args.json, rows)
    return 0


__all__ = ["env_rows", "run_env"]
