"""The papers' experiments at small scale: one command each, then `hpcsgd report`.

Usage (from the checkout, after tools/setup):
    .venv/bin/python tools/experiments.py {rps,risgd,faults,diversity,network,redundancy,all} [--out experiments/]

Each experiment is a grid file in jobs/sweeps/ (the same file the Slurm array job runs) on the
embedded digits data set, label-skewed over 4 ranks: its runs go through mpiexec one after the
other, a table of final figures is printed, and `hpcsgd report` writes tables and PNG figures to
OUT/NAME/report. Finished runs are kept and skipped when the command is run again.

`network --cluster-gbps G` (root) runs experiment (e) on real links instead of hpcsgd's network
emulation: a namespace cluster of 2 nodes x 2 ranks with tbf-shaped G Gbit/s links
(tools/cluster, under HPCSGD_CLUSTER, default `xnode-bench`), brought up for it and torn down
after; the grid's runs at `--link-gbps G` without their emulation flags, launched through
`tools/cluster run`, into OUT/network-xnode-Ggbps. Where the 4 ranks outnumber this machine's
cores, HPCSGD_WAIT=sleep (unless set): the nodes share the cores, which no node can see.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SWEEPS = ROOT / "jobs" / "sweeps"

COMMON_COLUMNS = ("train_loss", "test_accuracy", "train_loss_rank_mean", "test_accuracy_rank_mean")
# The figures of each experiment that tools/results/EXPERIMENTS.md shows (--record copies them).
FIGURES = {
    "rps": ("loss_vs_epoch", "consensus_vs_epoch", "accuracy_vs_epoch"),
    "risgd": ("loss_vs_epoch", "loss_vs_rounds"),
    "faults": ("accuracy_vs_epoch", "loss_vs_epoch"),
    "diversity": ("grad_diversity_vs_q", "consensus_vs_epoch"),
    "network": ("accuracy_vs_wall_s", "loss_vs_wall_s"),
    "redundancy": ("accuracy_vs_epoch", "loss_vs_epoch"),
}
EXPERIMENTS = {
    # name: (grid file, extra columns of the printed table)
    "rps": ("rps-vs-lossy-allreduce.txt", ("consensus_distance", "arrival_realised", "bytes_sent")),
    "risgd": ("risgd-q-tau.txt", ("rounds", "wall_s")),
    "faults": ("fault-tolerance.txt", ("live_ranks", "coverage", "lost_class_accuracy")),
    "diversity": ("gradient-diversity.txt", ("grad_diversity_intra", "grad_diversity_inter", "consensus_distance")),
    "network": ("emulated-network.txt", ("rounds", "wall_s", "wall_s_to_85", "network_emulated_s", "network_held_s")),
    "redundancy": ("risgd-mu-tau.txt", ("redundancy", "rounds", "rounds_to_85")),
}
# `hpcsgd report` options per experiment (default: none).
REPORT_ARGS = {"network": ["--target", "0.85", "--x", "wall_s"], "redundancy": ["--target", "0.85"]}
TARGET_ACCURACY = 0.85


def read_grid(path: Path) -> tuple[Path, list[list[str]]]:
    """The grid's config (from its `# config:` line) and one flag list per run."""
    config, runs = None, []
    for line in path.read_text().splitlines():
        m = re.match(r"#\s*config:\s*(\S+)", line)
        if m:
            config = (path.parent / m[1]).resolve()
        elif line.strip() and not line.lstrip().startswith("#"):
            runs.append(shlex.split(line))
    if config is None:
        raise SystemExit(f"{path} names no '# config:' file")
    return config, runs


def run_name(flags: list[str]) -> str:
    """The run directory name jobs/local/sweep.sh and sweep.sbatch give: `--q 2 --reweight` -> q=2_reweight."""
    name, state = "", "start"
    for token in flags:
        if token.startswith("--"):
            name += token[2:] if state == "start" else "_" + token[2:]
            state = "flag"
        elif state == "flag":
            name, state = name + "=" + token, "value"
        elif state == "start":
            name, state = name + token, "value"
        else:
            name += "," + token
    return re.sub(r"[^A-Za-z0-9._=@,+-]", "-", name) or "defaults"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def shard(out: Path, ranks: int) -> Path:
    shards = out / f"shards-digits-label-p{ranks}"
    if not (shards / "index.h5").exists():
        subprocess.run([sys.executable, "-m", "hpcsgd", "shard", "--source", "digits", "--parts", str(ranks),
                        "--partition", "label", "--out", str(shards)], check=True, env=_env(), stdout=subprocess.DEVNULL)
    return shards


def train(run_dir: Path, config: Path, shards: Path, ranks: int, flags: list[str], extra: list[str],
          launcher: list[str] | None = None) -> float:
    """One run under mpiexec (or ``launcher``); returns wall seconds (0 when it had already finished)."""
    if (run_dir / "summary.json").exists():
        return 0.0
    # --resume: an unfinished run (interrupted, crashed) continues from its checkpoint, or starts afresh.
    launch = launcher if launcher is not None else [str(BIN / "mpiexec"), "-n", str(ranks)]
    cmd = [*launch, sys.executable, "-m", "mpi4py", "-m", "hpcsgd", "train",
           str(config), "--data", str(shards), "--run-dir", str(run_dir), "--progress", "none", "--resume",
           *flags, *extra]
    start = time.perf_counter()
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"run {run_dir.name} failed with exit code {result.returncode}")
    return time.perf_counter() - start


def derived(summary: dict, run_dir: Path, shards: Path) -> dict:
    """Figures the summary does not hold: accuracy on the classes of a lost chunk."""
    out = dict(summary)
    out["wall_s_to_85"] = _wall_to_accuracy(run_dir, TARGET_ACCURACY)
    out["rounds_to_85"] = _wall_to_accuracy(run_dir, TARGET_ACCURACY, "rounds")
    failed = [int(r) for r in summary.get("failures", {})]
    if failed and summary.get("per_class_accuracy"):
        out["lost_class_accuracy"] = _accuracy_on_classes_only_in(failed, summary, shards)
    return out


def _wall_to_accuracy(run_dir: Path, target: float, key: str = "wall_s") -> float | None:
    """Rank 0's training wall time (or ``key``) at the first evaluation whose averaged model reached ``target``."""
    metrics = run_dir / "metrics" / "rank-0.jsonl"
    if not metrics.exists():
        return None
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if (record.get("avg_test_accuracy") or 0) >= target:
            return record[key]
    return None


def _accuracy_on_classes_only_in(chunks: list[int], summary: dict, shards: Path) -> float | None:
    """Mean test accuracy over the classes that appear only in the failed ranks' own chunks."""
    sys.path.insert(0, str(ROOT))
    from hpcsgd.data import read_index

    counts = read_index(shards).class_counts
    keep = [c for c in range(len(counts)) if c not in chunks]
    lost = [k for k in range(len(counts[0])) if all(counts[c][k] == 0 for c in keep)]
    accs = [summary["per_class_accuracy"][k] for k in lost if summary["per_class_accuracy"][k] is not None]
    return sum(accs) / len(accs) if accs else None


CLUSTER = ROOT / "tools" / "cluster"
EMULATION_FLAGS = ("--link-gbps", "--link-latency-ms")  # each takes one value


def on_cluster(runs: list[list[str]], gbps: float) -> list[list[str]]:
    """The grid's runs at ``--link-gbps gbps``, without hpcsgd's emulation flags (the links are real)."""
    kept = []
    for flags in runs:
        if "--link-gbps" not in flags or float(flags[flags.index("--link-gbps") + 1]) != gbps:
            continue
        out, skip = [], False
        for token in flags:
            if skip:
                skip = False
            elif token in EMULATION_FLAGS:
                skip = True
            else:
                out.append(token)
        kept.append(out)
    if not kept:
        raise SystemExit(f"--cluster-gbps {gbps:g}: the grid has no run at --link-gbps {gbps:g}")
    return kept


def cluster(*args: str) -> None:
    proc = subprocess.run([sys.executable, str(CLUSTER), *args], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise SystemExit(f"tools/cluster {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")


def run_experiment(name: str, out_root: Path, ranks: int, extra: list[str], record: Path | None,
                   cluster_gbps: float | None = None) -> None:
    grid, columns = EXPERIMENTS[name]
    config, runs = read_grid(SWEEPS / grid)
    launcher = None
    if cluster_gbps is not None:  # experiment (e) on a namespace cluster's shaped links
        runs, name = on_cluster(runs, cluster_gbps), f"{name}-xnode-{cluster_gbps:g}gbps"
        launcher = [sys.executable, str(CLUSTER), "run", "--"]
        columns = tuple(c for c in columns if not c.startswith("network_"))
    out = out_root / name
    out.mkdir(parents=True, exist_ok=True)
    shards = shard(out_root, ranks)
    names = [run_name(flags) for flags in runs]
    for i, (run, flags) in enumerate(zip(names, runs), 1):
        seconds = train(out / run, config, shards, ranks, flags, extra, launcher)
        print(f"[{name} {i}/{len(runs)}] {run}: {f'{seconds:.0f}s' if seconds else 'already done'}",
              file=sys.stderr, flush=True)
    cols = COMMON_COLUMNS + columns
    width = max(len(n) for n in names) + 2
    print(f"\n## {name}: {grid} with {config.relative_to(ROOT)}\n")
    table = ["| run | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for run in names:
        s = derived(json.loads((out / run / "summary.json").read_text()), out / run, shards)
        table.append(f"| {run:<{width}} | " + " | ".join(_fmt(s.get(c)) for c in cols) + " |")
    print("\n".join(table))
    report = out / "report"
    subprocess.run([sys.executable, "-m", "hpcsgd", "report", *[str(out / n) for n in names], "--out", str(report),
                    *REPORT_ARGS.get(name.split("-xnode-")[0], [])],
                   env=_env(), check=True, stdout=subprocess.DEVNULL)
    print(f"\nreport: {report}/report.md", file=sys.stderr)
    if record is not None:
        record.mkdir(parents=True, exist_ok=True)
        (record / f"{name}-table.md").write_text("\n".join(table) + "\n")
        for figure in FIGURES[name.split("-xnode-")[0]]:
            shutil.copyfile(report / f"{figure}.png", record / f"{name}-{figure}.png")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=[*EXPERIMENTS, "all"])
    parser.add_argument("--out", type=Path, default=ROOT / "experiments", help="where runs and reports go")
    parser.add_argument("--ranks", type=int, default=4, help="MPI ranks (default 4: the grids assume it)")
    parser.add_argument("--record", type=Path, help="copy the tables and key figures here (tools/results)")
    parser.add_argument("--cluster-gbps", type=float, metavar="G",
                        help="network only: run on a 2 x 2 namespace cluster with G Gbit/s shaped links (root)")
    parser.add_argument("extra", nargs="*", help="more train flags for every run, after --")
    args = parser.parse_args(argv)
    if args.cluster_gbps is not None:
        if args.experiment != "network" or args.ranks != 4 or not args.cluster_gbps > 0:
            parser.error("--cluster-gbps G (> 0) runs the network experiment on 2 x 2 ranks only")
        os.environ.setdefault("HPCSGD_CLUSTER", "xnode-bench")
        if (os.cpu_count() or 1) < 4:  # the nodes share this machine's cores (tools/xnode_bench.py: shared_cores_wait)
            os.environ.setdefault("HPCSGD_WAIT", "sleep")
        cluster("up", "2", "2", "--gbps", f"{args.cluster_gbps:g}")
        try:
            run_experiment("network", args.out, args.ranks, args.extra, args.record, args.cluster_gbps)
        finally:
            cluster("down")
        return 0
    for name in EXPERIMENTS if args.experiment == "all" else [args.experiment]:
        run_experiment(name, args.out, args.ranks, args.extra, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
