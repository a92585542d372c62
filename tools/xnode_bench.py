"""hpcsgd bench across the nodes of a namespace cluster on shaped links (issue 23).

Usage (as root, from the checkout; `tools/bench --xnode ...` runs this):
    .venv/bin/python tools/xnode_bench.py [--gbps 1,10] [--reps 10] [--quick] [--params N]
                                          [--only SECTION ...] [--json FILE] [--keep]

For each link speed it brings up its own cluster, 2 nodes x 2 ranks with tbf-shaped links
(`tools/cluster up 2 2 --gbps G`, under HPCSGD_CLUSTER, default `xnode-bench`), runs
`hpcsgd bench` across it through `tools/cluster run` (rows keyed `xnode_*`, each with the bytes
its call sent over the links), reads the links' counters around the run, and tears the cluster
down (`--keep` leaves the last one up). It then predicts the exchange rows for 2 x 2 two ways
(hpcsgd/bench/costmodel.py's project_across_nodes), with the error of each: from the link's
nominal speed (the part inside a node from the cost model fitted to this machine's scaling
table, as `hpcsgd bench --project` prints it for the same fabric), and calibrated on the link
probe the exchange section measures first (one stream, all ranks of a node streaming at once,
the library's Allreduce and Iallreduce, at 1/4 and 1/2 of the rows' buffer: never the rows
it is checked on). The load average is recorded beside the figures: ratios of one run are robust on a loaded
machine, absolute times are not. Exit 77 where namespaces cannot be made (not root).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = ROOT / ".venv" / "bin" / "python"
CLUSTER = ROOT / "tools" / "cluster"
SKIP = 77
SECTIONS = ("exchange", "ddp", "overlap")  # the rows issue 23 names
# The rows the issue names, in the order of the summary it prints.
HEADLINE = ("xnode_link_sendrecv", "xnode_avg_vs_allreduce", "xnode_avg_nonblocking_vs_allreduce", "xnode_rps01_vs_allreduce",
            "xnode_rps01_alltoallv_vs_allreduce",
            "xnode_overlap_hidden_local", "xnode_overlap_hidden_rps", "xnode_sync_vs_ddp_mlp")


def cluster(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(CLUSTER), *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode == SKIP:
        print(f"tools/xnode_bench.py: skipped: {proc.stderr.strip()}", file=sys.stderr)
        sys.exit(SKIP)
    if check and proc.returncode != 0:
        raise SystemExit(f"tools/cluster {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def link_totals() -> dict:
    return json.loads(cluster("counters", "--json").stdout)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def shared_cores_wait() -> list[str]:
    """``HPCSGD_WAIT=sleep`` where the cluster's ranks outnumber this machine's cores (unless set).

    The nodes of a namespace cluster share this machine's cores, which no node can see: each
    sees its own ranks on all the cores and would wait by spinning (hpcsgd/comm/waiting.py),
    taking the core that a rank of the other node needs. With all 4 ranks on one node hpcsgd
    decides ``sleep`` itself; this tells it the same. A real node has its own cores.
    """
    if "HPCSGD_WAIT" in os.environ:
        return [f"HPCSGD_WAIT={os.environ['HPCSGD_WAIT']}"]
    return ["HPCSGD_WAIT=sleep"] if 4 > (os.cpu_count() or 1) else []


def bench_once(gbps: float, args: argparse.Namespace, out: Path) -> list[dict]:
    """One cluster at ``gbps``, one `hpcsgd bench` across it; its rows with the run's context."""
    cluster("up", "2", "2", "--gbps", f"{gbps:g}")
    before, load_before = link_totals(), load()
    flags = [f for s in args.only for f in ("--only", s)] + ["--reps", str(args.reps), "--json", str(out)]
    flags += ["--quick"] if args.quick else []
    flags += ["--params", str(args.params)] if args.params else []
    # DDP's gloo group talks over the nodes' links too (its address is node0's, from /etc/hosts).
    wait = shared_cores_wait()
    cmd = [str(CLUSTER), "run", "--", "env", "GLOO_SOCKET_IFNAME=eth0", *wait, str(PY), "-m", "mpi4py", "-m", "hpcsgd",
           "bench", *flags]
    print(f"== {gbps:g} Gb/s: {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"hpcsgd bench across the cluster failed with exit code {proc.returncode}")
    after, load_after = link_totals(), load()
    sent = sum(after[n]["tx_bytes"] - before[n]["tx_bytes"] for n in after)
    rows = json.loads(out.read_text())
    context = {"link_gbps": gbps, "load_before": load_before, "load_after": load_after, "run_link_bytes": sent,
               "hpcsgd_wait": wait[0].split("=")[1] if wait else "default"}
    return [{**r, **context} for r in rows]


def projection(rows: list[dict], gbps: float, latency_us: float) -> list[dict]:
    """The cost model's errors on the exchange rows; `hpcsgd bench --project` prints its fit and fabric."""
    sys.path.insert(0, str(ROOT))
    from hpcsgd.bench.costmodel import TABLE, fit_cost_model, project_across_nodes, read_table

    subprocess.run([str(PY), "-m", "hpcsgd", "bench", "--project", "--fabric-gbps", f"{gbps:g}",
                    "--fabric-latency-us", f"{latency_us:g}"], check=True, stdout=sys.stderr)
    table = read_table(Path(str(TABLE)))
    return project_across_nodes(rows, gbps, latency_us, fit_cost_model(table) if table else None)


def summary(rows: list[dict], projected: list[dict]) -> str:
    """The issue's rows as a markdown table, with bytes over the links and the model's error."""
    errors = {p["key"]: p for p in projected}
    lines = ["| key | ratio | target | met | median ms | link MB per call (ref) | model ms (error), nominal link "
             "| model ms (error), calibrated on the link probe |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["key"] not in HEADLINE and r["key"] not in errors and not r["key"].startswith("xnode_probe_"):
            continue
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        met = "" if r["target"] is None or r["ratio"] is None else (
            "yes" if (r["ratio"] >= r["target"]) == r["higher_is_better"] or r["ratio"] == r["target"] else "no")
        mb = "-" if "link_bytes" not in r else f"{r['link_bytes'] / 1e6:.1f}" + (
            f" ({r['link_bytes_ref'] / 1e6:.1f})" if "link_bytes_ref" in r else "")
        p = errors.get(r["key"])
        nominal = "-" if p is None else f"{p['predicted_s'] * 1e3:.0f} ({p['error']:+.0%})"
        fit = "-" if p is None or "calibrated_s" not in p else (
            f"{p['calibrated_s'] * 1e3:.0f} ({p['calibrated_error']:+.0%})")
        lines.append(f"| `{r['key']}` | {ratio} | {'' if r['target'] is None else r['target']} | {met} | "
                     f"{r['seconds'] * 1e3:.1f} | {mb} | {nominal} | {fit} |")
    worst = [abs(p["calibrated_error"]) for p in projected if "calibrated_s" in p]
    if worst:
        lines.append(f"\ncalibrated model: largest error {max(worst):.0%} over {len(worst)} rows (target <= 25%)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gbps", default="1,10", help="link speeds in Gbit/s, comma-separated (default 1,10)")
    parser.add_argument("--reps", type=int, default=10, help="interleaved rounds per measurement (default 10)")
    parser.add_argument("--quick", action="store_true", help="hpcsgd bench --quick (smaller models)")
    parser.add_argument("--params", type=int, help="the exchange rows' model size (hpcsgd bench --params)")
    parser.add_argument("--only", action="append", choices=("exchange", "ddp", "local", "api", "overlap", "data"),
                        help=f"bench sections (repeatable; default {' '.join(SECTIONS)})")
    parser.add_argument("--latency-us", type=float, default=50.0, help="the model's per-message latency (default 50)")
    parser.add_argument("--json", type=Path, help="write every row, with its link speed and the model's errors")
    parser.add_argument("--keep", action="store_true", help="leave the last cluster up")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one bench run may take")
    args = parser.parse_args(argv)
    args.only = args.only or list(SECTIONS)
    try:
        speeds = [float(g) for g in args.gbps.split(",")]
    except ValueError:
        speeds = []
    if not speeds or not all(0 < g < 1e4 for g in speeds) or args.reps < 1:
        parser.error("--gbps needs positive link speeds and --reps a count >= 1")
    os.environ.setdefault("HPCSGD_CLUSTER", "xnode-bench")  # never another helper's or the tests' cluster
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    everything = []
    try:
        with tempfile.TemporaryDirectory(prefix="xnode-bench-") as tmp:
            for gbps in speeds:
                rows = bench_once(gbps, args, Path(tmp) / f"{gbps:g}.json")
                projected = projection(rows, gbps, args.latency_us)
                errors = {p["key"]: p for p in projected}
                rows = [{**r, **({"model": errors[r["key"]]} if r["key"] in errors else {})} for r in rows]
                print(f"\n### {gbps:g} Gb/s, 2 nodes x 2 ranks, load {rows[0]['load_before']} -> {rows[0]['load_after']}, "
                      f"{rows[0]['run_link_bytes'] / 1e9:.2f} GB over the links in the run\n")
                print(summary(rows, projected), flush=True)
                everything += rows
    finally:
        if not args.keep:
            cluster("down", check=False)
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
