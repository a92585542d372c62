"""PNG figures comparing runs, one message per figure.

matplotlib is imported inside the functions (it is an optional extra) and only through
``matplotlib.figure.Figure``, which renders with Agg without touching pyplot's global backend.
A figure no run has data for is skipped with a note instead of drawn empty.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .runs import FINISHED, Run, differing_keys, format_value

X_LABELS = {
    "epoch": "epoch",
    "step": "step",
    "wall_s": "wall time (s)",
    "rounds": "communication rounds",
}
TIME_PARTS = (
    ("compute_s", "compute"),
    ("comm_s", "communication"),
    ("data_s", "data loading"),
    ("straggle_s", "straggler wait"),
)
LEGEND_WIDTH = 48  # characters per legend line
LEGEND_INSIDE_MAX = 6  # more entries than this go beside the axes, off the curves


@dataclass
class Figure:
    """A figure written to ``path``, or skipped (``path`` None) for the reason in ``note``."""

    name: str
    title: str
    path: Path | None
    note: str = ""


def _new_figure(width: float = 7.0, height: float = 4.5):
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), dpi=120)
    return fig, fig.subplots()


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _legend_label(run: Run) -> str:
    label = run.label if run.status == FINISHED else f"{run.label} (unfinished)"
    # Many differing keys make long labels: wrap them rather than let the legend outgrow the plot.
    return "\n".join(textwrap.wrap(label, LEGEND_WIDTH, break_long_words=False)) or label


def _finish(fig, ax, path: Path, title: str, xlabel: str, ylabel: str, legend: bool = True) -> Path:
    ax.set_title(title, fontsize=12)
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.grid(True, alpha=0.3)
    if legend:
        handles, _ = ax.get_legend_handles_labels()
        if len(handles) > LEGEND_INSIDE_MAX:
            ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        elif handles:
            ax.legend(fontsize=9, loc="best", framealpha=0.85)
    fig.savefig(path, bbox_inches="tight")
    return path


def _curves(runs: list[Run], key: str, x: str) -> list[tuple[int, Run, np.ndarray, np.ndarray]]:
    """(color index, run, x, y) for the runs that have ``key`` against ``x``."""
    out = []
    for i, run in enumerate(runs):
        xs, ys = run.curve(key, x=x)
        if len(ys):
            out.append((i, run, xs, ys))
    return out


def plot_loss(runs: list[Run], out_dir: Path, x: str) -> Figure:
    """Rank-mean training loss against ``x``.

    Prefers ``train_loss_own`` (each rank's own model on a sample of the whole training set,
    logged at eval steps): on skewed partitions a rank's local batch loss looks good exactly
    when its model has drifted onto its own chunk. Falls back to the local batch loss.
    """
    name, title = f"loss_vs_{x}", f"Training loss vs {X_LABELS[x]}"
    key, ylabel = "train_loss_own", "training-set loss, own model (rank mean)"
    data = _curves(runs, key, x)
    if not data:
        key, ylabel = "loss", "local batch loss (rank mean)"
        data = _curves(runs, key, x)
    if not data:
        return Figure(name, title, None, f"skipped: no run logged a training loss against {x}")
    fig, ax = _new_figure()
    colors = _colors(len(runs))
    for i, run, xs, ys in data:
        ax.plot(xs, ys, color=colors[i], label=_legend_label(run), linewidth=1.5, marker="." if key != "loss" else None)
    path = _finish(fig, ax, out_dir / f"{name}.png", title, X_LABELS[x], ylabel)
    return Figure(name, title, path)


def plot_accuracy(runs: list[Run], out_dir: Path, x: str) -> Figure:
    """Test accuracy of the averaged model (solid) and the ranks' own models (dashed)."""
    name, title = f"accuracy_vs_{x}", f"Test accuracy vs {X_LABELS[x]}"
    avg, own = _curves(runs, "avg_test_accuracy", x), _curves(runs, "test_accuracy", x)
    if not avg and not own:
        return Figure(name, title, None, "skipped: no run logged a test accuracy (eval_every = 0?)")
    from matplotlib.lines import Line2D

    fig, ax = _new_figure()
    colors = _colors(len(runs))
    labelled: set[int] = set()
    for style, data in (("-", avg), ("--", own)):
        for i, run, xs, ys in data:
            label = None if i in labelled else _legend_label(run)
            labelled.add(i)
            ax.plot(xs, ys, style, color=colors[i], label=label, linewidth=1.5, marker=".", markersize=4)
    # The colour names the run; these two entries say what solid and dashed mean.
    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="0.3", ls="-"), Line2D([], [], color="0.3", ls="--")]
    labels += ["averaged model", "own model, rank mean"]
    ax.set_ylim(top=min(1.02, ax.get_ylim()[1]))  # no room above a perfect score
    if len(handles) > LEGEND_INSIDE_MAX + 2:
        ax.legend(handles, labels, fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    else:
        ax.legend(handles, labels, fontsize=9, loc="lower right", framealpha=0.85)
    path = _finish(fig, ax, out_dir / f"{name}.png", title, X_LABELS[x], "test accuracy", legend=False)
    return Figure(name, title, path)


def plot_consensus(runs: list[Run], out_dir: Path, x: str) -> Figure:
    """Rank-mean consensus distance (how far replicas drifted apart) against ``x``."""
    name, title = f"consensus_vs_{x}", f"Consensus distance vs {X_LABELS[x]}"
    data = _curves(runs, "consensus_distance", x)
    if not data:
        return Figure(name, title, None, "skipped: no run logged a consensus distance")
    fig, ax = _new_figure()
    colors = _colors(len(runs))
    for i, run, xs, ys in data:
        ax.plot(xs, ys, color=colors[i], label=_legend_label(run), linewidth=1.2)
    # Periodic averaging resets the distance to exactly 0, which a log axis cannot show.
    positive = all(np.all(ys > 0) for *_, ys in data)
    if positive:
        ax.set_yscale("log")
    ylabel = "consensus distance" + (" (log scale)" if positive else "")
    path = _finish(fig, ax, out_dir / f"{name}.png", title, X_LABELS[x], ylabel)
    return Figure(name, title, path)


def _time_parts(run: Run) -> dict[str, float] | None:
    """Rank-mean cumulative seconds per part at the last logged step, plus the rest of wall."""
    last = run.last_records()
    parts = {}
    for key, label in TIME_PARTS:
        values = [float(r[key]) for r in last if isinstance(r.get(key), (int, float))]
        parts[label] = float(np.mean(values)) if values else 0.0
    walls = [float(r["wall_s"]) for r in last if isinstance(r.get("wall_s"), (int, float))]
    if not walls and not any(parts.values()):
        return None
    # Evaluation, logging and whatever else no timer covers: the bars then add up to wall_s.
    parts["other (untimed)"] = max(0.0, float(np.mean(walls)) - sum(parts.values())) if walls else 0.0
    return parts


def plot_time_breakdown(runs: list[Run], out_dir: Path) -> Figure:
    """Where the wall time went: stacked compute/comm/data/straggle seconds per run."""
    name, title = "time_breakdown", "Time breakdown (rank mean, at the last logged step)"
    data = [(run, parts) for run in runs if (parts := _time_parts(run)) is not None]
    if not data:
        return Figure(name, title, None, "skipped: no run logged timers")
    fig, ax = _new_figure(7.5, max(2.5, 1.0 + 0.45 * len(data)))
    labels = [_legend_label(run) for run, _ in data]
    ypos = np.arange(len(data))
    left = np.zeros(len(data))
    part_names = list(data[0][1])
    colors = _colors(len(part_names) - 1) + ["0.8"]
    for part, color in zip(part_names, colors):
        widths = np.array([parts[part] for _, parts in data])
        ax.barh(ypos, widths, left=left, color=color, label=part, height=0.6)
        left += widths
    ax.set_yticks(ypos, labels, fontsize=9)
    ax.invert_yaxis()  # first run on top, as in the table
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    path = _finish(fig, ax, out_dir / f"{name}.png", title, "seconds", "", legend=False)
    return Figure(name, title, path)


DIVERSITY_MEASURES = (("grad_diversity_intra", "intra-worker", "o-"), ("grad_diversity_inter", "inter-worker", "s--"))


def plot_grad_diversity(runs: list[Run], out_dir: Path) -> Figure:
    """Mean gradient diversity against the redundancy q: both measures, one line per other setting.

    Intra-worker (per-sample gradients of one batch, the RI-SGD paper's measure) solid,
    inter-worker (the ranks' mini-batch gradients) dashed; older runs logged only the
    inter-worker one, as ``grad_diversity``.
    """
    name, title = "grad_diversity_vs_q", "Gradient diversity vs redundancy q"
    measures = [*DIVERSITY_MEASURES, ("grad_diversity", "inter-worker", "s--")]
    have = [run for run in runs if any(run.has(m) for m, _, _ in measures) and isinstance(run.config.get("q"), int)]
    if not have:
        return Figure(name, title, None, "skipped: no run logged gradient diversity")
    others = [k for k in differing_keys(have) if k != "q"]
    series: dict[tuple[str, str, str], list[tuple[int, float]]] = {}
    for run in have:
        label = ", ".join(f"{k}={format_value(run.config.get(k))}" for k in others) or "all runs"
        for metric, measure, style in measures:
            if run.has(metric):
                _, ys = run.curve(metric, x="step")
                series.setdefault((label, measure, style), []).append((run.config["q"], float(np.nanmean(ys))))
    fig, ax = _new_figure()
    labels = list(dict.fromkeys(label for label, _, _ in series))
    colors = dict(zip(labels, _colors(len(labels))))
    for (label, measure, style), points in series.items():
        qs, values = zip(*sorted(points))
        ax.plot(qs, values, style, color=colors[label], label=f"{measure}, {label}" if others else measure)
    all_q = sorted({q for points in series.values() for q, _ in points})
    ax.set_xticks(all_q)
    xlabel, ylabel = "redundancy q (chunks per rank)", "gradient diversity (mean over run)"
    path = _finish(fig, ax, out_dir / f"{name}.png", title, xlabel, ylabel, legend=True)
    return Figure(name, title, path)


def make_figures(runs: list[Run], out_dir: str | Path, x: str = "epoch") -> list[Figure]:
    """Every figure for ``runs`` in ``out_dir``; ``x`` is the x axis of accuracy and consensus.

    Returns one :class:`Figure` per figure, skipped ones included (with their note). Without
    matplotlib every figure is skipped.
    """
    if x not in X_LABELS:
        raise ValueError(f"x must be one of {', '.join(X_LABELS)}, got {x!r}")
    out_dir = Path(out_dir)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        note = "skipped: matplotlib is not installed (pip install hpcsgd[plot])"
        return [Figure("figures", "Figures", None, note)]
    figures = [plot_loss(runs, out_dir, xs) for xs in dict.fromkeys(("epoch", "wall_s", "rounds", x))]
    figures.append(plot_accuracy(runs, out_dir, x))
    figures.append(plot_consensus(runs, out_dir, x))
    figures.append(plot_time_breakdown(runs, out_dir))
    figures.append(plot_grad_diversity(runs, out_dir))
    return figures
