"""The figures of a compare or sweep, drawn from its numbers (so :func:`~lightning_fed.experiments.outputs.replot`
can draw them again from results.json): dot plots and model × test-set heat-maps of a compare, its confusion
matrices, and a sweep's line plots and metric-against-bytes plots.

Every figure is at most ``MAX_FIGURE_INCHES`` (about a laptop screen) and never wider than ``MAX_ASPECT`` times its
height; value axes are fitted to the data so that the differences between models fill the plot.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from lightning_fed.experiments.grid import Point, short_key
from lightning_fed.experiments.summaries import (
    Confusions,
    Stats,
    Summary,
    SweepRow,
    axis_label,
    column_title,
    model_title,
)

MAX_FIGURE_INCHES = (10.0, 5.0)  # at 110 dpi: at most 1100 x 550 pixels, a laptop screen or a paper column
MAX_ASPECT = 3.0  # no figure wider than 3:1: a wider strip shrinks to unreadable on a page
_MARKERS = "osD^vP*Xhp<>"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed on a cluster node
    import matplotlib.pyplot as plt

    return plt


def _min_height(width: float) -> float:
    """The least height (inches) that keeps a figure ``width`` wide within ``MAX_ASPECT`` (whole pixels included)."""
    return width / MAX_ASPECT + 0.05


def _save(plt: Any, fig: Any, path: Path) -> Path:
    width, height = fig.get_size_inches()
    if width > MAX_ASPECT * height:  # a last guard: every figure here is laid out within it already
        fig.set_size_inches(width, _min_height(width))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fitted_limits(
    lows: Sequence[float], highs: Sequence[float], pad: float = 0.08, floor: float = 0.02
) -> tuple[float, float]:
    """A value axis around the data (error bars included) with ``pad`` of its span on each side, never narrower
    than ``floor``: the differences between models fill the plot, not the distance from zero."""
    lo, hi = min(lows), max(highs)
    span = max(hi - lo, floor)
    middle = (lo + hi) / 2
    return middle - span * (0.5 + pad), middle + span * (0.5 + pad)


def dot_plots(
    summary: Summary, metrics: Sequence[str], columns: Sequence[str], models: Sequence[str], out: Path, title: str
) -> list[Path]:
    """``<metric>.png``: one column of dots per test set, one dot per model (error bar = std over repetitions), the
    value axis fitted to the data, the legend beside the plot."""
    plt = _pyplot()
    paths = []
    for metric in metrics:
        points = {m: [summary.get(m, {}).get(c, {}).get(metric) for c in columns] for m in models}
        values = [s for stats in points.values() for s in stats if s]
        if not values:
            continue
        fig, ax = plt.subplots(figsize=(min(MAX_FIGURE_INCHES[0], 3.2 + 0.75 * len(columns)), 3.6))
        spread = 0.6 / max(1, len(models))
        for i, model in enumerate(models):
            xs = [j + (i - (len(models) - 1) / 2) * spread for j, st in enumerate(points[model]) if st]
            stats = [st for st in points[model] if st]
            if stats:
                ax.errorbar(
                    xs,
                    [st["mean"] for st in stats],
                    yerr=[st["std"] for st in stats],
                    fmt=_MARKERS[i % len(_MARKERS)],
                    ms=5,
                    capsize=2,
                    lw=1,
                    label=model_title(model),
                )
        ax.set_ylim(*fitted_limits([v["mean"] - v["std"] for v in values], [v["mean"] + v["std"] for v in values]))
        ax.set_xticks(
            range(len(columns)),
            [axis_label(c) for c in columns],
            rotation=20 if len(columns) > 4 else 0,
            ha="right" if len(columns) > 4 else "center",
        )
        for j in range(1, len(columns)):
            ax.axvline(j - 0.5, color="0.9", lw=0.8, zorder=0)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylabel(metric)
        ax.set_title(f"{title}: {metric} on each test set (mean ± std)", fontsize=9)
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left", frameon=False)
        paths.append(_save(plt, fig, out / f"{metric}.png"))
    return paths


def model_site_matrix(
    summary: Summary, metric: str, models: Sequence[str], columns: Sequence[str]
) -> list[list[Optional[float]]]:
    """Mean ``metric`` of every model (rows) on every test set (columns); ``None`` where a model was not tested."""
    return [[(summary.get(m, {}).get(c, {}).get(metric) or {}).get("mean") for c in columns] for m in models]


def heat_maps(
    summary: Summary, metrics: Sequence[str], columns: Sequence[str], models: Sequence[str], out: Path, title: str
) -> list[Path]:
    """``<metric>_models_by_site.png``: every model (rows: pooled, local, each site only, federated) tested on every
    site (columns), each cell its mean over repetitions.

    Drawn only where at least two models have values for the metric. One model's values on every test set are a
    single row: the same numbers as the dot plot ``<metric>.png`` (which also shows their std) and the metric's
    table in results.md; as a heat-map that row is a strip many times wider than tall whose colour bar is too short
    for its labels, and colour adds nothing to a comparison of one model with itself. With few rows the cells grow
    taller, so that the figure stays within ``MAX_ASPECT`` and the colour bar keeps room for its labels."""
    plt = _pyplot()
    import numpy as np

    paths = []
    for metric in metrics:
        matrix = model_site_matrix(summary, metric, models, columns)
        if sum(any(v is not None for v in row) for row in matrix) < 2:
            continue
        grid = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
        width = min(MAX_FIGURE_INCHES[0], 2.4 + 0.85 * len(columns))
        height = max(min(MAX_FIGURE_INCHES[1], 1.0 + 0.36 * len(models)), _min_height(width))
        fig, ax = plt.subplots(figsize=(width, height))
        image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto")
        middle = np.nanmean(grid)
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                if value is not None:
                    ax.text(
                        j,
                        i,
                        f"{value:.3f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="black" if value > middle else "white",
                    )
        ax.set_xticks(
            range(len(columns)),
            [axis_label(c) for c in columns],
            rotation=20 if len(columns) > 4 else 0,
            ha="right" if len(columns) > 4 else "center",
            fontsize=8,
        )
        ax.set_yticks(range(len(models)), [model_title(m) for m in models], fontsize=8)
        ax.set_xlabel("test set")
        fig.colorbar(image, ax=ax, fraction=0.04, label=metric)
        ax.set_title(f"{title}: {metric}, every model on every test set", fontsize=9)
        paths.append(_save(plt, fig, out / f"{metric}_models_by_site.png"))
    return paths


_PANEL_INCHES = (2.3, 2.2)  # one confusion matrix


def _panel_lines(columns: int, models: int) -> int:
    """How many lines each model's confusion matrices take so that the figure stays within ``MAX_ASPECT`` (one
    line, a row per model, whenever that fits)."""
    lines = 1
    while _PANEL_INCHES[0] * math.ceil(columns / lines) > MAX_ASPECT * _PANEL_INCHES[1] * models * lines:
        lines += 1
    return lines


def confusion_plot(
    totals: Confusions,
    models: Sequence[str],
    columns: Sequence[str],
    out: Path,
    label_names: Optional[Sequence[str]] = None,
) -> Optional[Path]:
    """``confusion_matrices.png``: a row per model, a column per test set, counts summed over repetitions. When one
    row per model would be wider than ``MAX_ASPECT`` (one or two models, many sites), each model's test sets wrap
    onto several lines, every matrix then titled with its test set."""
    plt = _pyplot()
    shown = [m for m in models if m in totals]
    if not shown:
        return None
    lines = _panel_lines(len(columns), len(shown))
    across = math.ceil(len(columns) / lines)
    rows = len(shown) * lines
    fig, axes = plt.subplots(rows, across, figsize=(_PANEL_INCHES[0] * across, _PANEL_INCHES[1] * rows), squeeze=False)
    place = {(i, j): (i * lines + j // across, j % across) for i in range(len(shown)) for j in range(len(columns))}
    used = set(place.values())
    for row in range(rows):
        for col in range(across):
            if (row, col) not in used:
                axes[row][col].axis("off")  # the end of a wrapped model's last line
    for i, model in enumerate(shown):
        for j, column in enumerate(columns):
            row, col = place[i, j]
            ax = axes[row][col]
            bottom = (row + 1, col) not in used  # nothing drawn below: this panel names the predicted classes
            matrix = totals[model].get(column)
            names = (
                list(label_names)
                if label_names and matrix and len(label_names) == len(matrix)
                else [""] * len(matrix or [])
            )
            ax.set_xticks(range(len(names)), names if bottom else [""] * len(names), fontsize=6)
            ax.set_yticks(range(len(names)), names if col == 0 else [""] * len(names), fontsize=6)
            if matrix is None:
                ax.axis("off")
                continue
            ax.imshow(matrix, cmap="Blues")
            for r, values in enumerate(matrix):
                for c, value in enumerate(values):
                    ax.text(c, r, str(value), ha="center", va="center", fontsize=8)
            if i == 0 or lines > 1:
                ax.set_title(column_title(column), fontsize=8)
            if col == 0:
                ax.set_ylabel(f"{model_title(model)}\ntrue", fontsize=8)
            if bottom:
                ax.set_xlabel("predicted", fontsize=8)
    return _save(plt, fig, out / "confusion_matrices.png")


def line_plots(
    rows: Sequence[SweepRow], keys: Sequence[str], metrics: Sequence[str], out: Path, column: str
) -> list[Path]:
    """``<metric>.png`` for a sweep: the first grid key on the x axis, one line per other grid values × model."""
    if not keys:
        return []
    plt = _pyplot()
    x_key = keys[0]
    tied = [k for k in keys[1:] if moves_with(rows, x_key, k)]  # zipped with the x axis: not a line of its own
    rest = [k for k in keys[1:] if k not in tied]
    paths = []
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(8.0, 3.8))
        lines: dict[tuple[str, ...], list[tuple[Any, Optional[Stats]]]] = {}
        lows: list[float] = []
        highs: list[float] = []
        for row in rows:
            lines.setdefault((row["model"], *[json.dumps(row["point"][k]) for k in rest]), []).append(
                (row["point"][x_key], row["metrics"].get(metric))
            )
        for line, found in lines.items():
            points = [(x, s) for x, s in found if s]
            if not points:
                continue
            label = ", ".join([model_title(line[0]), *[f"{short_key(k)}={v}" for k, v in zip(rest, line[1:])]])
            xs = [x if isinstance(x, (int, float)) else str(x) for x, _ in points]
            ax.errorbar(
                xs,
                [s["mean"] for _, s in points],
                yerr=[s["std"] for _, s in points],
                marker="o",
                ms=4,
                capsize=2,
                lw=1,
                label=label,
            )
            lows += [s["mean"] - s["std"] for _, s in points]
            highs += [s["mean"] + s["std"] for _, s in points]
        if lows:
            ax.set_ylim(*fitted_limits(lows, highs))
        ax.set_xlabel(short_key(x_key) + (f" ({', '.join(map(short_key, tied))} with it)" if tied else ""))
        ax.set_ylabel(f"{metric} ({axis_label(column)})")
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left", frameon=False)
        ax.grid(alpha=0.3)
        paths.append(_save(plt, fig, out / f"{metric}.png"))
    return paths


def point_title(point: Point) -> str:
    """A short name for a grid point: the last part of each key, dict values flattened (``compression=topk,
    fraction=0.1``); keys left at None are left out, unless all are."""
    parts = []
    for key, value in point.items():
        if isinstance(value, dict):
            parts += [f"{k}={v}" for k, v in value.items()]
        elif value is not None:
            parts.append(f"{short_key(key).rsplit('.', 1)[-1]}={value}")
    if not parts and point:
        key = next(iter(point))
        parts.append(f"{short_key(key).rsplit('.', 1)[-1]}=None")
    return ", ".join(parts) or "recipe"


def bytes_plots(rows: Sequence[SweepRow], metrics: Sequence[str], out: Path, column: str) -> list[Path]:
    """``<metric>_vs_bytes.png`` for a sweep whose federated runs sent different amounts: the metric against the MB a
    site sends per round (log scale), one point per grid point, named in the legend."""
    measured = [r for r in rows if r.get("traffic")]
    if len({round(r["traffic"]["sent"]["mean"]) for r in measured}) < 2:
        return []
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    paths = []
    for metric in metrics:
        found = [
            (r["traffic"]["sent"]["mean"] / 1e6, r["metrics"].get(metric), point_title(r["point"])) for r in measured
        ]
        points = [(x, s, label) for x, s, label in found if s]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(8.0, 3.6))
        for x, stats, label in points:
            ax.errorbar([x], [stats["mean"]], yerr=[stats["std"]], marker="o", ms=5, capsize=2, lw=1, label=label)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(
            *fitted_limits([s["mean"] - s["std"] for _, s, _ in points], [s["mean"] + s["std"] for _, s, _ in points])
        )
        ax.set_xlabel("MB a site sends per round (federated, log scale)")
        ax.set_ylabel(f"{metric} ({axis_label(column)})")
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left", frameon=False)
        ax.grid(alpha=0.3, which="both")
        paths.append(_save(plt, fig, out / f"{metric}_vs_bytes.png"))
    return paths


def moves_with(rows: Sequence[SweepRow], x_key: str, key: str) -> bool:
    """``key`` takes one value per value of ``x_key`` (a ``--zip`` partner of the x axis) and more than one overall."""
    pairs = {(json.dumps(r["point"][x_key]), json.dumps(r["point"][key])) for r in rows}
    return len(pairs) == len({x for x, _ in pairs}) and len({v for _, v in pairs}) > 1
