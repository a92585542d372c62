"""The MPI-free cost model: a latency-bandwidth fit to a scaling table, projected to 16-1024 ranks."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np

from .timing import write_json

# Package data (setup.cfg), so an installed hpcsgd finds it too; tools/bench --scaling rewrites it.
TABLE = resources.files(__package__) / "scaling.json"


def _features(kind: str, P: np.ndarray, nbytes: np.ndarray, cores: np.ndarray | None = None) -> np.ndarray:
    """Columns of the latency-bandwidth model: time = (alpha * f(P) + beta * bytes * g(P)) * s.

    ``s = max(1, P / cores)`` is the oversubscription of the measuring node (ranks sharing a
    core each get a share of it); on a cluster with a core or more per rank it is 1.
    """
    if kind == "allreduce":  # reduce-scatter + allgather (ring/Rabenseifner)
        f, g = 2 * np.log2(np.maximum(P, 1)), 2 * (P - 1) / P
    else:  # alltoall of d/P blocks: P-1 messages, (P-1)/P of the bytes
        f, g = P - 1, (P - 1) / P
    share = np.ones_like(P) if cores is None else np.maximum(1.0, P / cores)
    return np.stack([f * share, nbytes * g * share], axis=1)


def fit_cost_model(rows: list[dict]) -> dict:
    """Least-squares alpha, beta per collective; relative error on the measurements."""
    fitted = {}
    multi = [r for r in rows if r["ranks"] > 1]
    P = np.array([r["ranks"] for r in multi], dtype=float)
    nbytes = np.array([r["bytes"] for r in multi], dtype=float)
    cores = np.array([r.get("cores", 10**6) for r in multi], dtype=float)
    for kind in ("allreduce", "alltoall"):
        t = np.array([r[f"{kind}_s"] for r in multi])
        A = _features(kind, P, nbytes, cores)
        w = 1 / t  # relative least squares: small and large messages count alike
        coef, *_ = np.linalg.lstsq(A * w[:, None], t * w, rcond=None)
        coef = np.maximum(coef, 0)
        pred = A @ coef
        err = np.abs(pred - t) / t
        fitted[kind] = {"alpha_s": float(coef[0]), "beta_s_per_byte": float(coef[1]),
                        "median_rel_error": float(np.median(err)), "max_rel_error": float(err.max())}
    return fitted


def project(fabric_gbps: float, latency_us: float) -> list[dict]:
    """Per-round times at 16-1024 ranks on the stated fabric, with the fitted model's form."""
    alpha, beta = latency_us * 1e-6, 8 / (fabric_gbps * 1e9)
    models = {"ResNet-110 (1.7M)": 1_727_962, "100M-parameter model": 100_000_000}
    out = []
    for label, params in models.items():
        nbytes = 4.0 * params
        for P in (16, 64, 256, 1024):
            Pa, nb = np.array([P], float), np.array([nbytes])
            allreduce = (_features("allreduce", Pa, nb) @ np.array([alpha, beta])).item()
            alltoall = (_features("alltoall", Pa, nb) @ np.array([alpha, beta])).item()
            out.append({"model": label, "ranks": P, "averaging_round_s": allreduce,
                        "rps_round_s": 2 * alltoall,  # scatter, then gather of the averages
                        "ddp_step_comm_s": allreduce})  # one gradient Allreduce per step, before overlap
    return out


def node_link_bytes(kind: str, nodes: int, ranks_per_node: int, nbytes: float, drop: float = 0.0) -> float:
    """Bytes one node sends over its link in one round of ``kind`` on ``nodes`` x ``ranks_per_node``.

    ``allreduce``: node-aware (MPICH's default for a multi-node communicator: a reduction
    inside the node, an Allreduce among one leader per node, a broadcast inside the node), so
    a node sends 2(n-1)/n of the buffer whatever its rank count. ``rps``: RPS's exchange as
    two flat Alltoallv (scatter of blocks, gather of block averages): each rank sends its
    block for every rank on another node, ``1 - drop`` of them kept, in both phases.
    ``rps-node``: the node-aware exchange, whose node adds its ranks' rows of a block before
    they cross (one message per block on another node, sent unless all ``ranks_per_node`` rows
    were dropped) and sends each of its averages once per other node (unless no rank there gets
    it); a node of ``2^m`` ranks is one subtree of the summation tree, as assumed here.
    """
    P = nodes * ranks_per_node
    if kind == "allreduce":
        return 2 * (nodes - 1) / nodes * nbytes
    if kind == "rps-node":
        return 2 * (1 - drop ** ranks_per_node) * nbytes * (P - ranks_per_node) / P
    return 2 * (1 - drop) * ranks_per_node * nbytes * (P - ranks_per_node) / P


# The xnode rows the model predicts: (what the round is, drop rate). ``allreduce``: the library's
# blocking Allreduce; ``nonblocking``: its Iallreduce; ``stream``: one stream each way; ``rps``:
# RPS's block exchange.
XNODE_KINDS = {"xnode_allreduce_raw": ("allreduce", 0.0), "xnode_avg_vs_allreduce": ("allreduce", 0.0),
               "xnode_rps0_vs_allreduce": ("allreduce", 0.0), "xnode_rps01_alltoallv_vs_allreduce": ("rps", 0.1),
               "xnode_avg_nonblocking_vs_allreduce": ("nonblocking", 0.0), "xnode_link_sendrecv": ("stream", 0.0)}
# Which probe (hpcsgd/bench/links.py) calibrates each kind's link part.
_PROBE_OF = {"allreduce": "allreduce", "nonblocking": "iallreduce", "stream": "one_stream", "rps": "node_streams",
             "rps-node": "node_streams"}


def probe_fit(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """{probe name: (seconds, seconds per byte)} of each ``xnode_probe_*`` row: the time per byte
    by least squares through its sizes and the origin, no latency.

    At the probe's sizes a latency is below the noise, and a line through two noisy points,
    extrapolated to twice the larger, triples their noise; through the origin it does not.
    """
    out = {}
    for r in rows:
        key = r.get("key", "")
        if key.startswith("xnode_probe_") and r.get("probe_bytes"):
            b, t = np.asarray(r["probe_bytes"], float), np.asarray(r["probe_s"], float)
            out[key[len("xnode_probe_"):]] = (0.0, float(b @ t / (b @ b)))
    return out


def project_across_nodes(rows: list[dict], gbps: float, latency_us: float, fitted: dict | None) -> list[dict]:
    """The cost model's round times for bench rows measured across nodes, and their errors.

    Two predictions per row of :data:`XNODE_KINDS`. ``predicted_s``, from the nominal link: the
    part inside the node, from the model ``fitted`` to this machine's one-node scaling table
    (none without a table), plus the bytes a node sends (:func:`node_link_bytes`) at ``gbps``,
    plus one ``latency_us`` per message step. ``calibrated_s``, from the run's link probe
    (``xnode_probe_*`` rows: the same calls at smaller sizes, hpcsgd/bench/links.py): a
    latency and a time per byte through the probe's two sizes, extrapolated to the row's bytes.
    The Allreduce rows take the library's Allreduce (its composition across nodes, which the
    byte count alone misses), the nonblocking row its Iallreduce, the stream row one stream;
    an RPS round takes the part inside the node as above plus its node's link bytes at the rate
    a node's ranks got sending at once, one probe latency per phase. Each with its error
    relative to the measurement, and predicted vs counted bytes.
    """
    kinds = dict(XNODE_KINDS)
    probes = probe_fit(rows)
    out = []
    for r in rows:
        key = r.get("key")
        if key == "xnode_rps01_vs_allreduce" and r.get("path") in ("alltoallv", "node-aware"):
            # The flat path sends every row across; the node-aware one a node's sum per block.
            kinds[key] = ("rps-node" if r["path"] == "node-aware" else "rps", 0.1)
        if key not in kinds or "bytes" not in r:
            continue
        kind, drop = kinds[key]
        n, k = r["nodes"], r["ranks_per_node"]
        rps = kind in ("rps", "rps-node")
        link = node_link_bytes(kind if rps else "allreduce", n, k, r["bytes"], drop)
        inside = 0.0 if kind == "stream" else _inside_node("rps" if rps else "allreduce", k, r["bytes"], fitted)
        steps = 2 * (n * k - k) if rps else 2 * np.log2(n) if kind != "stream" else 1
        predicted = inside + latency_us * 1e-6 * steps + link * 8 / (gbps * 1e9)
        counted = r.get("link_bytes")
        entry = {"key": key, "measured_s": r["seconds"], "predicted_s": predicted,
                 "error": (predicted - r["seconds"]) / r["seconds"], "inside_node_s": inside,
                 "predicted_link_bytes": link * n, "link_bytes": counted,
                 "bytes_error": None if not counted or kind == "stream" else (link * n - counted) / counted}
        probe = probes.get(_PROBE_OF[kind])
        if probe is not None:
            seconds, per_byte = probe
            # The RPS probe: each of a node's k ranks sent the probe's bytes at once.
            entry["calibrated_s"] = (inside + 2 * seconds + link * per_byte / k if rps
                                     else seconds + per_byte * r["bytes"])
            entry["calibrated_error"] = (entry["calibrated_s"] - r["seconds"]) / r["seconds"]
        out.append(entry)
    return out


def _inside_node(kind: str, ranks: int, nbytes: float, fitted: dict | None) -> float:
    """Seconds of a round's part among one node's ``ranks``, from the one-node fit (0 without one)."""
    if fitted is None or ranks < 2:
        return 0.0
    which = "allreduce" if kind == "allreduce" else "alltoall"
    shape = _features(which, np.array([ranks], float), np.array([float(nbytes)]))
    coef = np.array([fitted[which]["alpha_s"], fitted[which]["beta_s_per_byte"]])
    return (shape @ coef).item() * (1 if kind == "allreduce" else 2)  # RPS: two exchanges


_TABLE_KEYS = ("ranks", "bytes", "allreduce_s", "alltoall_s")


def read_table(path: Path) -> list[dict]:
    """The scaling table ``tools/bench --scaling`` writes, checked row by row ([] when there is none)."""
    from ..errors import ConfigError

    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"--table {path} is not a readable JSON file: {exc}") from None
    if not isinstance(rows, list):
        raise ConfigError(f"--table {path} must hold a JSON list of rows, got a {type(rows).__name__}")
    for i, r in enumerate(rows):
        bad = [k for k in _TABLE_KEYS if not (isinstance(r, dict) and _positive(r.get(k)))]
        if isinstance(r, dict) and "cores" in r and not _positive(r["cores"]):
            bad.append("cores")
        if bad:
            raise ConfigError(f"--table {path}: row {i} needs positive finite numbers for {', '.join(bad)} "
                              f"(keys {', '.join(_TABLE_KEYS)}), got {r!r:.200}")
    if len({(r["ranks"], r["bytes"]) for r in rows if r["ranks"] > 1}) < 2:
        raise ConfigError(f"--table {path}: the fit needs measurements of 2 or more sizes at more than 1 rank")
    return rows


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")


def print_projection(args) -> int:
    rows = read_table(Path(args.table))
    if rows:
        fitted = fit_cost_model(rows)
        print(f"cost model fitted to {len(rows)} measurements in {args.table} (time = (alpha*f(P) + beta*bytes*g(P)) * max(1, P/cores)):")
        for kind, f in fitted.items():
            print(f"  {kind:<9} alpha {f['alpha_s'] * 1e6:8.2f} us  beta {f['beta_s_per_byte'] * 1e9:7.3f} ns/byte  "
                  f"error median {f['median_rel_error']:.0%}, max {f['max_rel_error']:.0%}")
    else:
        print(f"no scaling table at {args.table}: run tools/bench --scaling (or give --table) first; "
              f"projecting with the model form only")
    print(f"\nprojection on a {args.fabric_gbps:g} Gb/s, {args.fabric_latency_us:g} us fabric (per round, before overlap):")
    print(f"{'model':<22} {'ranks':>6} {'averaging ms':>13} {'RPS round ms':>13} {'DDP step comm ms':>17}")
    projected = project(args.fabric_gbps, args.fabric_latency_us)
    for r in projected:
        print(f"{r['model']:<22} {r['ranks']:>6} {r['averaging_round_s'] * 1e3:>13.2f} {r['rps_round_s'] * 1e3:>13.2f} "
              f"{r['ddp_step_comm_s'] * 1e3:>17.2f}")
    print("\nlocal SGD / RI-SGD pay the averaging round once per tau steps; RPS pays its round once per tau steps;\n"
          "sync SGD and DDP pay the gradient Allreduce every step (hidden only as far as backward overlaps it).")
    write_json(args.json, [{**r, "fabric_gbps": args.fabric_gbps, "fabric_latency_us": args.fabric_latency_us}
                           for r in projected])
    return 0


__all__ = ["TABLE", "XNODE_KINDS", "fit_cost_model", "node_link_bytes", "print_projection", "probe_fit", "project",
           "project_across_nodes", "read_table"]
