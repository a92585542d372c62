"""PNG figures comparing runs, one message per figure.

Runs that differ only in their seed are one group: a figure draws the group's mean as a line
and its spread as a band (min-max over the seeds, or the mean ± one sample std), and says which
in the legend. A group of one run is a plain line, as a single run always was. Colours go by
group; with many groups the legend moves beside the axes, in columns.

matplotlib is imported inside the functions (it is an optional extra) and only through
``matplotlib.figure.Figure``, which renders with Agg without touching pyplot's global backend.
A figure no run has data for is skipped with a note instead of drawn empty.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .output import save_figure
from .runs import (
    FINISHED, Band, Group, Run, aggregate, differing_keys, diversity, format_value, group_curve, group_runs,
)

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
BANDS = {"minmax": "min-max over seeds", "std": "mean ± 1 sample std over seeds"}
LEGEND_WIDTH = 48  # characters per legend line
LEGEND_INSIDE_MAX = 6  # more entries than this go beside the axes, off the curves
LEGEND_ROWS = 22  # entries per legend column beside the axes
OWN_CURVES_MAX = 8  # above this many groups the accuracy figure leaves out the own-model curves
BAND_ALPHA = 0.2


@dataclass
class Figure:
    """A figure written to ``path``, or skipped (``path`` None) for the reason in ``note``."""

    name: str
    title: str
    path: Path | None
    note: str = ""  # why it was skipped; for a figure of panels, what they show
    legend: list[str] = field(default_factory=list)  # the legend's entries, as drawn


def _new_figure(width: float = 7.0, height: float = 4.5, ncols: int | None = None):
    """A figure and its axes: one Axes, or a row of ``ncols`` of them."""
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), dpi=120)
    return fig, (fig.subplots() if ncols is None else fig.subplots(1, ncols, squeeze=False)[0])


def _colors(n: int) -> list:
    """n distinct colours: the qualitative tab10/tab20 while they last, then a sampled ramp
    (groups are sorted by their keys, so neighbours in the ramp are neighbours in the sweep)."""
    from matplotlib import colormaps

    if n <= 20:
        cmap = colormaps["tab10" if n <= 10 else "tab20"]
        return [cmap(i) for i in range(n)]
    cmap = colormaps["turbo"]
    return [cmap(0.05 + 0.9 * i / (n - 1)) for i in range(n)]


def _legend_label(group: Group) -> str:
    label = group.legend
    if group.status != FINISHED:
        label += " (unfinished)" if group.n == 1 else f" ({group.status})"
    # Many differing keys make long labels: wrap them rather than let the legend outgrow the plot.
    return "\n".join(textwrap.wrap(label, LEGEND_WIDTH, break_long_words=False)) or label


def _band_handle(groups: list[Group], band: str):
    """A legend entry saying what the shaded bands are, when some group has a band."""
    from matplotlib.patches import Patch

    if not any(g.n > 1 for g in groups):
        return []
    return [Patch(facecolor="0.5", alpha=BAND_ALPHA * 1.5, label=f"line: mean; band: {BANDS[band]}")]


def _legend(ax, handles: list, loc: str = "best", inside_max: int = LEGEND_INSIDE_MAX) -> list[str]:
    """Inside the axes when short; beside them in columns of :data:`LEGEND_ROWS` when long.

    Returns the entries' labels.
    """
    labels = [h.get_label() for h in handles]
    if not handles:
        return labels
    if len(handles) <= inside_max:
        ax.legend(handles=handles, fontsize=9, loc=loc, framealpha=0.85)
        return labels
    fontsize = 9 if len(handles) <= 12 else 8 if len(handles) <= 30 else 7
    ax.legend(
        handles=handles, fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.01, 1.0),
        frameon=False, ncol=math.ceil(len(handles) / LEGEND_ROWS),
    )
    return labels


def _finish(fig, ax, path: Path, title: str, xlabel: str, ylabel: str) -> Path:
    ax.set_title(title, fontsize=12)
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.grid(True, alpha=0.3)
    return save_figure(fig, path)


def _spread(band: Band, kind: str, log: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper edge of the band; a std band on a log axis stays inside min-max."""
    if kind == "minmax":
        return band.lo, band.hi
    lower, upper = band.mean - band.std, band.mean + band.std
    return (np.maximum(lower, band.lo) if log else lower), upper


def _draw(ax, band: Band, color, kind: str, label: str | None = None, style: str = "-",
          marker: str | None = None, log: bool = False, linewidth: float = 1.5):
    """The mean line of a group and, where two or more runs have the point, its band."""
    # A single point (a run with one evaluation) is invisible as a line: mark it.
    marker = "o" if len(band.x) == 1 else marker
    (line,) = ax.plot(band.x, band.mean, style, color=color, label=label, linewidth=linewidth,
                      marker=marker, markersize=4)
    several = band.count > 1
    if several.any():
        lower, upper = _spread(band, kind, log)
        if len(band.x) == 1:  # a band one point wide has no area: an error bar shows the spread
            yerr = np.maximum(0.0, [band.mean - lower, upper - band.mean])  # never below 0: matplotlib refuses
            ax.errorbar(band.x, band.mean, yerr=yerr, fmt="none",
                        ecolor=color, capsize=4, linewidth=1.2)
        else:
            ax.fill_between(band.x, lower, upper, where=several, color=color, alpha=BAND_ALPHA,
                            linewidth=0, interpolate=False)
    return line


def _bands(groups: list[Group], key: str, x: str, evaluation: bool = False) -> list[tuple[int, Group, Band]]:
    """(colour index, group, band) for the groups that have ``key`` against ``x``."""
    out = []
    for i, group in enumerate(groups):
        band = group_curve(group, key, x, evaluation=evaluation)
        if len(band.x):
            out.append((i, group, band))
    return out


def plot_loss(groups: list[Group], out_dir: Path, x: str, band: str = "minmax") -> Figure:
    """Rank-mean training loss against ``x``.

    Prefers ``train_loss_own`` (each rank's own model on a sample of the whole training set,
    logged at eval steps): on skewed partitions a rank's local batch loss looks good exactly
    when its model has drifted onto its own chunk. Falls back to the local batch loss.
    """
    name, title = f"loss_vs_{x}", f"Training loss vs {X_LABELS[x]}"
    key, ylabel = "train_loss_own", "training-set loss, own model (rank mean)"
    data = _bands(groups, key, x)
    if not data:
        key, ylabel = "loss", "training-batch loss, last log window (rank mean)"
        data = _bands(groups, key, x)
    if not data:
        return Figure(name, title, None, f"skipped: no run logged a training loss against {x}")
    fig, ax = _new_figure()
    colors = _colors(len(groups))
    marker = "." if key != "loss" else None
    handles = [_draw(ax, b, colors[i], band, _legend_label(g), marker=marker) for i, g, b in data]
    legend = _legend(ax, handles + _band_handle([g for _, g, _ in data], band))
    path = _finish(fig, ax, out_dir / f"{name}.png", title, X_LABELS[x], ylabel)
    return Figure(name, title, path, legend=legend)


def plot_accuracy(groups: list[Group], out_dir: Path, x: str, band: str = "minmax") -> Figure:
    """Test accuracy of the averaged model (solid) and the ranks' own models (dashed).

    The curves end with the end-of-run evaluation of summary.json, so a run shorter than
    ``eval_every`` (no evaluation logged during training) still shows its one point. Above
    :data:`OWN_CURVES_MAX` groups the dashed own-model curves are left out: twice the lines
    would bury both.
    """
    name, title = f"accuracy_vs_{x}", f"Test accuracy vs {X_LABELS[x]}"
    avg = _bands(groups, "avg_test_accuracy", x, evaluation=True)
    own = _bands(groups, "test_accuracy", x, evaluation=True)
    if not avg and not own:
        return Figure(
            name, title, None,
            "skipped: no test accuracy yet: no run has evaluated the test split (runs evaluate "
            "every eval_every epochs and once at the end, into summary.json)",
        )
    from matplotlib.lines import Line2D

    fig, ax = _new_figure()
    colors = _colors(len(groups))
    show_own = len(groups) <= OWN_CURVES_MAX
    handles: dict[int, object] = {}
    for style, data in (("-", avg), ("--", own if show_own else [])):
        for i, group, b in data:
            _draw(ax, b, colors[i], band, style=style, marker=".")
            handles.setdefault(i, Line2D([], [], color=colors[i], label=_legend_label(group)))
    # The colour names the group; these entries say what solid and dashed mean.
    keys = [Line2D([], [], color="0.3", ls="-", label="averaged model")]
    if show_own:
        keys.append(Line2D([], [], color="0.3", ls="--", label="own model, rank mean"))
    elif own:
        note = f"(own-model curves left out above {OWN_CURVES_MAX} groups)"
        keys.append(Line2D([], [], color="none", label=note))
    ax.set_ylim(top=min(1.02, ax.get_ylim()[1]))  # no room above a perfect score
    drawn = [g for _, g, _ in avg + own]
    entries = [handles[i] for i in sorted(handles)] + keys + _band_handle(drawn, band)
    # Accuracy curves fill the top of the axes, where a legend would go: only a short one inside.
    legend = _legend(ax, entries, inside_max=4)
    path = _finish(fig, ax, out_dir / f"{name}.png", title, X_LABELS[x], "test accuracy (whole test split)")
    return Figure(name, title, path, legend=legend)


def plot_consensus(groups: list[Group], out_dir: Path, x: str, band: str = "minmax") -> Figure:
    """Rank-mean consensus distance (how far replicas drifted apart) against ``x``."""
    name, title = f"consensus_vs_{x}", f"Consensus distance vs {X_LABELS[x]}"
    data = _bands(groups, "consensus_distance", x)
    if not data:
        return Figure(name, title, None, "skipped: no run logged a consensus distance")
    fig, ax = _new_figure()
    # Periodic averaging resets the distance to exactly 0, which a log axis cannot show.
    log = all(np.all(b.lo > 0) for *_, b in data)
    colors = _colors(len(groups))
    handles = [_draw(ax, b, colors[i], band, _legend_label(g), log=log, linewidth=1.2) for i, g, b in data]
    if log:
        ax.set_yscale("log")
    legend = _legend(ax, handles + _band_handle([g for _, g, _ in data], band))
    ylabel = "consensus distance" + (" (log scale)" if log else "")
    path = _finish(fig, ax, out_dir / f"{name}.png", title, X_LABELS[x], ylabel)
    return Figure(name, title, path, legend=legend)


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


def _group_time(group: Group, band: str) -> tuple[dict[str, float], tuple[float, float]] | None:
    """Mean seconds per part over the group's runs, and the spread of their totals
    (below and above the mean total, as the band: min-max or one std)."""
    per_run = [p for r in group.runs if (p := _time_parts(r)) is not None]
    if not per_run:
        return None
    parts = {k: float(np.mean([p[k] for p in per_run])) for k in per_run[0]}
    mean, std, lo, hi = aggregate([sum(p.values()) for p in per_run])
    return parts, ((mean - lo, hi - mean) if band == "minmax" else (std, std))


def plot_time_breakdown(groups: list[Group], out_dir: Path, band: str = "minmax") -> Figure:
    """Where the wall time went: stacked compute/comm/data/straggle seconds per group."""
    name, title = "time_breakdown", "Time breakdown (rank mean, at the last logged step)"
    data = [(g, t) for g in groups if (t := _group_time(g, band)) is not None]
    if not data:
        return Figure(name, title, None, "skipped: no run logged timers")
    row = 0.45 if len(data) <= 20 else 0.28  # inches per bar: 50 groups still fit a page
    fig, ax = _new_figure(7.5, max(2.5, 1.0 + row * len(data)))
    labels = [_legend_label(g) for g, _ in data]
    ypos = np.arange(len(data))
    left = np.zeros(len(data))
    part_names = list(data[0][1][0])
    colors = _colors(len(part_names) - 1) + ["0.8"]
    for part, color in zip(part_names, colors):
        widths = np.array([parts[part] for _, (parts, _) in data])
        ax.barh(ypos, widths, left=left, color=color, label=part, height=0.6)
        left += widths
    handles, _ = ax.get_legend_handles_labels()
    if any(g.n > 1 for g, _ in data):
        err = np.maximum(0.0, np.array([spread for _, (_, spread) in data]).T)
        ax.errorbar(left, ypos, xerr=err, fmt="none", ecolor="0.2", capsize=3, linewidth=1)
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="0.2", marker="|", ls="none", label=f"total: {BANDS[band]}"))
    ax.set_yticks(ypos, labels, fontsize=9 if len(data) <= 20 else 7)
    ax.set_ylim(len(data) - 0.5, -0.5)  # first group on top, as in the table; no empty margin
    ax.legend(handles=handles, fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    xlabel = "seconds" + (" (mean over seeds)" if any(g.n > 1 for g, _ in data) else "")
    path = _finish(fig, ax, out_dir / f"{name}.png", title, xlabel, "")
    return Figure(name, title, path, legend=labels + [h.get_label() for h in handles])


DIVERSITY_TITLES = {
    "intra": "intra: per-sample gradients of one rank's batch",
    "inter": "inter: the ranks' gradients",
}


def plot_grad_diversity(groups: list[Group], out_dir: Path, band: str = "minmax") -> Figure:
    """Mean gradient diversity against the redundancy q, one panel per measure logged
    (intra- and inter-gradient diversity), one line per setting of the other keys."""
    name, title = "grad_diversity_vs_q", "Gradient diversity vs redundancy q"
    runs = [r for g in groups for r in g.runs if isinstance(r.config.get("q"), int)]
    measures = [m for m in ("intra", "inter") if any(diversity(r, m) is not None for r in runs)]
    if not measures:
        return Figure(name, title, None, "skipped: no run logged a gradient diversity")
    others = [k for k in differing_keys(runs) if k not in ("q", "seed")]
    fig, axes = _new_figure(6.0 * len(measures), 4.5, ncols=len(measures))
    several = False
    for ax, measure in zip(axes, measures):
        several |= _diversity_panel(ax, runs, measure, others, band)
        ax.set_title(f"{title}\n({DIVERSITY_TITLES[measure]})", fontsize=11)
    handles, _ = axes[-1].get_legend_handles_labels()
    if several:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="0.3", marker="|", ls="none", label=f"bars: {BANDS[band]}"))
    legend = _legend(axes[-1], handles) if others or several else []
    save_figure(fig, out_dir / f"{name}.png")
    panels = [DIVERSITY_TITLES[m] for m in measures]
    return Figure(name, title, out_dir / f"{name}.png", note="; ".join(panels), legend=legend)


def _diversity_panel(ax, runs: list[Run], measure: str, others: list[str], band: str) -> bool:
    """One measure against q; returns whether some point has more than one run (a bar)."""
    series: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        value = diversity(run, measure)
        if value is not None:
            label = ", ".join(f"{k}={format_value(run.config.get(k))}" for k in others) or "all runs"
            series.setdefault(label, {}).setdefault(run.config["q"], []).append(value)
    several = False
    for color, (label, points) in zip(_colors(len(series)), series.items()):
        qs = sorted(points)
        stats = np.array([aggregate(points[q]) for q in qs])
        mean = stats[:, 0]
        err = (mean - stats[:, 2], stats[:, 3] - mean) if band == "minmax" else (stats[:, 1], stats[:, 1])
        ax.errorbar(qs, mean, yerr=np.maximum(0.0, np.array(err)), fmt="o-", color=color, label=label, capsize=3)
        several |= any(len(points[q]) > 1 for q in qs)
    ax.set_xticks(sorted({q for points in series.values() for q in points}))
    ax.set_xlabel("redundancy q (chunks per rank)", fontsize=11)
    ax.set_ylabel("gradient diversity (mean over run)", fontsize=11)
    ax.grid(True, alpha=0.3)
    return several


def make_figures(
    runs: list[Run], out_dir: str | Path, x: str = "epoch", band: str = "minmax"
) -> list[Figure]:
    """Every figure for ``runs`` in ``out_dir``; ``x`` is the x axis of accuracy and consensus.

    Runs that differ only in their seed are drawn as one group (mean line, ``band``:
    ``"minmax"`` or ``"std"``). Returns one :class:`Figure` per figure, skipped ones included
    (with their note). Without matplotlib every figure is skipped.
    """
    if x not in X_LABELS:
        raise ValueError(f"x must be one of {', '.join(X_LABELS)}, got {x!r}")
    if band not in BANDS:
        raise ValueError(f"band must be one of {', '.join(BANDS)}, got {band!r}")
    out_dir = Path(out_dir)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        note = "skipped: matplotlib is not installed (pip install hpcsgd[plot])"
        return [Figure("figures", "Figures", None, note)]
    groups = group_runs(runs)
    figures = [plot_loss(groups, out_dir, xs, band) for xs in dict.fromkeys(("epoch", "wall_s", "rounds", x))]
    figures.append(plot_accuracy(groups, out_dir, x, band))
    figures.append(plot_consensus(groups, out_dir, x, band))
    figures.append(plot_time_breakdown(groups, out_dir, band))
    figures.append(plot_grad_diversity(groups, out_dir, band))
    return figures
