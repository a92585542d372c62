"""The papers' experiments at small scale: one command each, then `hpcsgd report`.

Usage (from the checkout, after tools/setup):
    .venv/bin/python tools/experiments.py rps [--out experiments/] [--ranks 4] [--quick]

Each experiment shards the embedded digits data set (label-skewed), runs its grid of
`hpcsgd train` jobs under mpiexec, prints a table of the final figures and writes the report
(tables and PNG figures) to OUT/NAME/report. Finished runs are kept and skipped on a rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Shared by every experiment: the label-skewed digits set and a small MLP.
BASE = ["--model", "mlp", "--batch-size", "16", "--lr", "0.1", "--progress", "none"]

ARRIVALS = (1.0, 0.99, 0.95, 0.9, 0.8, 0.6)


def rps_grid(quick: bool) -> list[tuple[str, list[str]]]:
    """RPS vs gradient sharing over the same lossy links, arrival 100% .. 60%."""
    epochs = "10" if quick else "20"
    runs = []
    for algorithm in ("rps", "lossy-allreduce"):
        for arrival in ARRIVALS:
            drop = round(1 - arrival, 4)
            name = f"{algorithm}-arrival{int(round(arrival * 100))}"
            runs.append((name, ["--algorithm", algorithm, "--tau", "1", "--drop-rate", str(drop),
                                "--epochs", epochs, "--lr-schedule", "cosine", "--eval-every", "2"]))
    return runs


EXPERIMENTS = {
    "rps": (rps_grid, "label", ("train_loss_rank_mean", "train_loss", "test_accuracy_rank_mean", "test_accuracy",
                                "consensus_distance", "arrival_realised", "bytes_sent")),
}


def shard(out: Path, ranks: int, partition: str) -> Path:
    shards = out / f"shards-digits-{partition}-p{ranks}"
    if not (shards / "index.h5").exists():
        subprocess.run([sys.executable, "-m", "hpcsgd", "shard", "--source", "digits", "--parts", str(ranks),
                        "--partition", partition, "--out", str(shards)], check=True, env=_env())
    return shards


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def train(run_dir: Path, shards: Path, ranks: int, flags: list[str]) -> float:
    """One run under mpiexec; returns wall seconds (0 when it was already finished)."""
    if (run_dir / "summary.json").exists():
        return 0.0
    cmd = [str(BIN / "mpiexec"), "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m", "hpcsgd", "train",
           "--data", str(shards), "--run-dir", str(run_dir), *BASE, *flags]
    start = time.perf_counter()
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"run {run_dir.name} failed with exit code {result.returncode}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--out", type=Path, default=ROOT / "experiments", help="where runs and reports go")
    parser.add_argument("--ranks", type=int, default=4, help="MPI ranks (default 4)")
    parser.add_argument("--quick", action="store_true", help="fewer epochs: a smoke run")
    args = parser.parse_args(argv)

    grid, partition, columns = EXPERIMENTS[args.experiment]
    out = args.out / args.experiment
    out.mkdir(parents=True, exist_ok=True)
    shards = shard(args.out, args.ranks, partition)
    runs = grid(args.quick)
    for i, (name, flags) in enumerate(runs, 1):
        seconds = train(out / name, shards, args.ranks, flags)
        note = f"{seconds:.0f}s" if seconds else "already done"
        print(f"[{i}/{len(runs)}] {name}: {note}", file=sys.stderr, flush=True)

    print(f"\n{'run':<28}" + "".join(f"{c:>24}" for c in columns))
    for name, _ in runs:
        summary = json.loads((out / name / "summary.json").read_text())
        cells = "".join(f"{_fmt(summary.get(c)):>24}" for c in columns)
        print(f"{name:<28}{cells}")
    report = out / "report"
    subprocess.run([sys.executable, "-m", "hpcsgd", "report", *[str(out / n) for n, _ in runs], "--out", str(report)],
                   env=_env(), check=True, stdout=subprocess.DEVNULL)
    print(f"\nreport: {report}/report.md", file=sys.stderr)
    return 0


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


if __name__ == "__main__":
    sys.exit(main())
