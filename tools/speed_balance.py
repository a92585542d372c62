"""Wall time to a target accuracy with one rank slowed 2x: equal batches vs ``balance = "speed"``.

Usage (from the checkout, after tools/setup):
    .venv/bin/python tools/speed_balance.py [--reps 5] [--target 0.9] [--ranks 2] [--out /tmp/speed-balance]
        [--record] [hpcsgd train flags]

digits over 2 ranks (iid; one core each on a 2-core machine), jobs/configs/speed-balance.toml
(local SGD, resnet20, q = 2, tau 4, rank 1 computing at half speed by ``slowdown = ["1:2"]``),
the same epochs both ways; ``balance = "speed"`` decides first after its default warm-up window
inside the first epoch (``--balance-warmup N`` to change it). Flags it does not know go to ``hpcsgd train`` (``--q 1``, ``--lr``). The runs alternate (equal,
speed, speed, equal, ...) so that the shared machine's noise falls on both alike; the figures
are medians over the repetitions. Wall time is rank 0's training wall time (``wall_s`` of the
metrics, set up excluded) at the first evaluation whose averaged model reaches the target.
``--record`` writes the table and the figure to tools/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG = ROOT / "jobs" / "configs" / "speed-balance.toml"
VARIANTS = {"equal": [], "speed": ["--balance", "speed"]}


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def shard(out: Path, ranks: int) -> Path:
    shards = out / f"shards-digits-iid-p{ranks}"
    if not (shards / "index.h5").exists():
        subprocess.run([sys.executable, "-m", "hpcsgd", "shard", "--source", "digits", "--parts", str(ranks),
                        "--partition", "iid", "--out", str(shards)], check=True, env=_env(), stdout=subprocess.DEVNULL)
    return shards


def train(run_dir: Path, shards: Path, ranks: int, flags: list[str]) -> None:
    cmd = [str(BIN / "mpiexec"), "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m", "hpcsgd", "train", str(CONFIG),
           "--data", str(shards), "--run-dir", str(run_dir), "--progress", "none", "--overwrite", *flags]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"run {run_dir.name} failed with exit code {result.returncode}")


def curve(run_dir: Path) -> list[tuple[float, float]]:
    """(wall_s, averaged model's test accuracy) at each evaluation, rank 0."""
    lines = (run_dir / "metrics" / "rank-0.jsonl").read_text().splitlines()
    return [(r["wall_s"], r["avg_test_accuracy"]) for r in map(json.loads, lines) if "avg_test_accuracy" in r]


def steps_time(run_dir: Path, step: int) -> float:
    """Seconds the slowest rank spent in training steps (data, compute, communication) up to
    ``step``: the wall time without evaluations and metrics lines, which both runs pay alike."""
    spent = []
    for path in sorted((run_dir / "metrics").glob("rank-*.jsonl")):
        record = next(r for r in map(json.loads, path.read_text().splitlines()) if r["step"] == step)
        spent.append(record["data_s"] + record["compute_s"] + record["comm_s"] + record["straggle_s"])
    return max(spent)


def figures(run_dir: Path, target: float) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = (run_dir / "metrics" / "rank-0.jsonl").read_text().splitlines()
    reached = [r for r in map(json.loads, lines) if (r.get("avg_test_accuracy") or 0) >= target]
    return {"wall_to_target": reached[0]["wall_s"] if reached else None,
            "steps_to_target": steps_time(run_dir, reached[0]["step"]) if reached else None,
            "wall_s": summary["wall_s"],
            "test_accuracy": summary["test_accuracy"], "batch_per_rank": summary["batch_per_rank"],
            "changes": len(summary["balance_changes"]),
            # the step the first decision's sizes were drawn from (None: equal batches), and the first change
            "first_decision": summary.get("balance_first_decision"),
            "first_change": next((c["step"] for c in summary["balance_changes"]), None)}


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def table(results: dict, target: float) -> str:
    rows = ["| batches | wall s to {:.0%}: median (runs) | runs that reached it | time in steps to {:.0%}, slowest "
            "rank: median | wall s, all epochs: median | test accuracy: median | final batch per rank (last run) |"
            .format(target, target), "|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        reached = [r["wall_to_target"] for r in runs]
        rows.append(f"| {name} | {_fmt(_median(reached))} ({', '.join(_fmt(r) for r in reached)}) | "
                    f"{sum(r is not None for r in reached)}/{len(runs)} | "
                    f"{_fmt(_median([r['steps_to_target'] for r in runs]))} | {_fmt(_median([r['wall_s'] for r in runs]))} | "
                    f"{_median([r['test_accuracy'] for r in runs]):.4f} | {runs[-1]['batch_per_rank']} |")
    ratios = {key: _ratio(*(_median([r[key] for r in results[k]]) for k in ("equal", "speed")))
              for key in ("wall_to_target", "steps_to_target", "wall_s")}
    pairs = [_ratio(e["wall_to_target"], s["wall_to_target"]) for e, s in zip(results["equal"], results["speed"])]
    speed = results["speed"]
    rows.append("")
    rows.append(f"balance = speed: first decision's sizes drawn from step {speed[-1]['first_decision']}; first "
                f"change at steps {', '.join(str(r['first_change']) for r in speed)}; changes per run "
                f"{', '.join(str(r['changes']) for r in speed)}.")
    rows.append(f"Ratio of medians, balance = speed / equal: wall time to {target:.0%} {_fmt(ratios['wall_to_target'], 3)}; "
                f"time in steps to {target:.0%} {_fmt(ratios['steps_to_target'], 3)}; all epochs "
                f"{_fmt(ratios['wall_s'], 3)}. Per repetition (wall to {target:.0%}): "
                f"{', '.join(_fmt(p, 2) for p in pairs)}.")
    return "\n".join(rows)


def _ratio(equal, speed):
    return speed / equal if equal and speed else None


def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def plot(results_dirs: dict, path: Path, ranks: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, dirs), color in zip(results_dirs.items(), ("tab:red", "tab:blue")):
        for i, d in enumerate(dirs):
            walls, accs = zip(*curve(d))
            ax.plot(walls, accs, color=color, alpha=0.6, label=f"{name} batches" if i == 0 else None)
    ax.set_xlabel("wall time, rank 0 (s)")
    ax.set_ylabel("test accuracy, averaged model")
    ax.set_title(f"digits, {ranks} ranks, rank 1 slowed 2x")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--out", type=Path, default=Path("/tmp/speed-balance"))
    parser.add_argument("--ranks", type=int, default=2,
                        help="processes (default 2: one core each on a 2-core machine, so that the emulated "
                             "slowdown is the only difference in speed between ranks)")
    parser.add_argument("--record", action="store_true", help="write the table and figure to tools/results/")
    args, extra = parser.parse_known_args()  # the rest goes to hpcsgd train (e.g. --epochs 6)
    shards = shard(args.out, args.ranks)
    results: dict = {name: [] for name in VARIANTS}
    dirs: dict = {name: [] for name in VARIANTS}
    for rep in range(args.reps):
        order = list(VARIANTS) if rep % 2 == 0 else list(VARIANTS)[::-1]
        for name in order:
            run_dir = args.out / f"{name}-{rep}"
            start = time.perf_counter()
            train(run_dir, shards, args.ranks, [*VARIANTS[name], *extra])
            found = figures(run_dir, args.target)
            results[name].append(found)
            dirs[name].append(run_dir)
            print(f"rep {rep} {name}: {found} ({time.perf_counter() - start:.0f} s with start-up)", flush=True)
    text = table(results, args.target)
    print(text)
    if args.record:
        results_dir = ROOT / "tools" / "results"
        (results_dir / "speed-balance-table.md").write_text(text + "\n")
        plot(dirs, results_dir / "speed-balance-accuracy_vs_wall_s.png", args.ranks)


if __name__ == "__main__":
    main()
