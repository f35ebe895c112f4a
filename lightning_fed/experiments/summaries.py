"""The numbers a compare or sweep reports, over repetitions, and their markdown: mean ± std of every model on every
test set (:func:`summarize`), summed confusion matrices, the federated runs' traffic, and the names models and test
sets go by in tables and figures."""

from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence, TypedDict

from lightning_fed.experiments.grid import Point
from lightning_fed.experiments.runs import MERGED, METRICS, Run, StartupReport, column_values


class Stats(TypedDict):
    """A metric over repetitions: ``std`` is the sample standard deviation (0 for one value)."""

    mean: float
    std: float
    n: int
    values: list[float]


Summary = dict[str, dict[str, dict[str, Stats]]]  # model -> column (test set) -> metric -> stats
Confusions = dict[str, dict[str, list[list[int]]]]  # model -> column -> confusion matrix summed over repetitions
Traffic = dict[str, Stats]  # "sent" | "received" | "update" -> bytes per site and round


class SweepRow(TypedDict):
    """One row of a sweep's table: one model at one grid point, its metrics in the sweep's column."""

    point: Point
    model: str
    metrics: dict[str, Optional[Stats]]
    traffic: Traffic  # the federated model's; empty for the others


TRAFFIC = {"sent": "MB sent", "received": "MB received", "update": "MB of update"}


def model_order(labels: Sequence[str], sites: Sequence[str]) -> list[str]:
    """Models in table order: pooled, local, each site's own local model, federated, then any others."""
    order = ["pooled", "local", *[f"local:{s}" for s in sites], "federated"]
    return [m for m in order if m in labels] + sorted(set(labels) - set(order))


def summarize(
    runs: Sequence[Run], metrics: Sequence[str] = METRICS, mean_over: Optional[Sequence[str]] = None
) -> Summary:
    """``{model: {column: {metric: {"mean", "std", "n", "values"}}}}`` over repetitions; columns are the sites,
    ``mean(<sites>)`` when ``mean_over`` is given (the mean of those sites' values in each repetition), and
    ``federated`` (all sites' test data merged). ``std`` is the sample standard deviation (0 for one value)."""
    collected: dict[str, dict[str, dict[str, list[float]]]] = {}
    for run in runs:
        for model, rows in run.evaluations.items():
            columns = dict(rows)
            if mean_over:
                columns[mean_label(mean_over)] = column_values(rows, mean_over)
            for column, values in columns.items():
                for metric in metrics:
                    value = values.get(metric)
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        collected.setdefault(model, {}).setdefault(column, {}).setdefault(metric, []).append(
                            float(value)
                        )
    return {
        model: {
            column: {metric: stats_of(values) for metric, values in by_metric.items()}
            for column, by_metric in by_column.items()
        }
        for model, by_column in collected.items()
    }


def mean_label(sites: Sequence[str]) -> str:
    """The column of the mean over ``sites``: ``mean(a,b,c)``."""
    return f"mean({','.join(sites)})"


def stats_of(values: list[float]) -> Stats:
    """Mean, sample std (0 for one value), count and the values themselves."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": values,
    }


def confusion_totals(runs: Sequence[Run]) -> Confusions:
    """Confusion matrices per model and site (and merged), summed over repetitions."""
    totals: Confusions = {}
    for run in runs:
        for model, rows in run.evaluations.items():
            for column, values in rows.items():
                matrix = values.get("confusion_matrix")
                if not matrix:
                    continue
                current = totals.setdefault(model, {}).get(column)
                totals[model][column] = (
                    matrix if current is None else [[a + b for a, b in zip(r1, r2)] for r1, r2 in zip(current, matrix)]
                )
    return totals


def traffic_summary(runs: Sequence[Run]) -> Traffic:
    """``{"sent"|"received"|"update": stats}`` of the federated runs' bytes per site and round (empty without any)."""
    measured = [r.traffic for r in runs if r.traffic]
    return {kind: stats_of([t[kind] for t in measured]) for kind in TRAFFIC} if measured else {}


def traffic_table(summary: Traffic) -> str:
    """The communication of the federated model: MB per site and round."""
    cells = " | ".join(f"{summary[k]['mean'] / 1e6:.4f}" for k in TRAFFIC)
    return "\n".join(
        [
            "### communication (federated, per site and round)",
            "",
            "| " + " | ".join(TRAFFIC.values()) + " |",
            "|" + "---|" * len(TRAFFIC),
            f"| {cells} |",
        ]
    )


def megabytes(traffic: Optional[Traffic]) -> str:
    """MB a site sent per round, for a sweep table cell (``-``: not measured)."""
    return f"{traffic['sent']['mean'] / 1e6:.4f}" if traffic else "-"


def cell(stats: Optional[Stats]) -> str:
    """``mean ± std`` (just the mean for one repetition; ``-`` for none)."""
    if not stats:
        return "-"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}" if stats["n"] > 1 else f"{stats['mean']:.3f}"


def markdown_tables(summary: Summary, metrics: Sequence[str], columns: Sequence[str], models: Sequence[str]) -> str:
    """One markdown table per metric: a row per model, a column per test set."""
    parts = []
    for metric in metrics:
        header = f"| {metric} | " + " | ".join(column_title(c) for c in columns) + " |"
        rule = "|---|" + "---|" * len(columns)
        body = [
            f"| {model_title(m)} | "
            + " | ".join(cell(summary.get(m, {}).get(c, {}).get(metric)) for c in columns)
            + " |"
            for m in models
        ]
        parts.append("\n".join([f"### {metric}", "", header, rule, *body]))
    return "\n\n".join(parts)


def startup_line(startup: StartupReport, wall: float) -> str:
    """The closing line of results.md: wall time, cold and warm start-ups, and what reusing workers saved."""
    line = f"Wall time {wall:.0f} s. Site start-up: {startup['cold_runs']} run(s) with new site processes"
    if startup["cold_mean_seconds"] is not None:
        line += f" ({startup['cold_mean_seconds']:.1f} s each)"
    if startup["warm_runs"]:
        line += f", {startup['warm_runs']} run(s) on warm sites ({startup['warm_mean_seconds']:.1f} s each)"
    if startup.get("estimated_saving_seconds") is not None:
        line += (
            f"; {startup['worker_processes_reused']} worker process start(s) avoided by reusing warm ones, an estimated "
            f"{startup['estimated_saving_seconds']:.0f} s saved (measure it exactly with --no-reuse)"
        )
    return line + "."


def column_title(column: str) -> str:
    """A test set's name in a table: the merged column is ``all sites (merged)``."""
    return "all sites (merged)" if column == MERGED else column


def axis_label(column: str) -> str:
    """A test set's name on a figure axis: a long ``mean(a,b,c,...)`` becomes ``mean of N sites``."""
    if column.startswith("mean(") and len(column) > 16:
        return f"mean of {column.count(',') + 1} sites"
    return column_title(column)


def model_title(model: str) -> str:
    """A model's name in tables and legends: ``local:X`` is ``X only``."""
    if model == "local":
        return "local (each site's own model)"
    if model.startswith("local:"):
        return f"{model.split(':', 1)[1]} only"
    return model
