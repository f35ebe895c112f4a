"""The files of a compare or sweep: results.md (the tables), results.json (the typed report, written once) and the
figures, all in one output folder; and :func:`replot`, which draws a folder's figures again from its results.json.

The figures of a report are drawn by one function per kind (:func:`compare_figures`, :func:`sweep_figures`), both
when the report is written and when it is redrawn, so that the two never differ.
"""

from __future__ import annotations

import json
import math
import shlex
import statistics
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional, Sequence

from lightning_fed.experiments.grid import Point, short_key
from lightning_fed.experiments.plots import bytes_plots, confusion_plot, dot_plots, heat_maps, line_plots
from lightning_fed.experiments.reports import (
    CompareReport,
    LeaveOneOutReport,
    SweepReport,
    read_report,
    write_atomically,
    write_report,
)
from lightning_fed.experiments.runs import (
    GROUPED,
    MERGED,
    METRICS,
    SEGMENTATION_METRICS,
    Experiment,
    Run,
    reported_metrics,
)
from lightning_fed.experiments.summaries import (
    Stats,
    SweepRow,
    cell,
    column_title,
    confusion_totals,
    markdown_tables,
    mean_label,
    megabytes,
    model_order,
    model_title,
    startup_line,
    stats_of,
    summarize,
    traffic_summary,
    traffic_table,
)
from lightning_fed.experiments.wandb_log import Table, log_to_wandb

CONFUSION_MODELS = ("pooled", "local", "federated")  # the models whose confusion matrices are drawn


# -- compare -------------------------------------------------------------------------------------
def compare_figures(report: CompareReport, folder: Path) -> list[Path]:
    """A compare's figures from its report: a dot plot and a heat-map per metric, and the confusion matrices."""
    title = Path(report.recipes[-1]).stem
    summary, columns, models = report.summary, report.columns, report.models
    metrics = report.metrics or [
        m
        for m in (*METRICS, *SEGMENTATION_METRICS, "loss")  # files that did not name them
        if any(m in by_metric for by_column in summary.values() for by_metric in by_column.values())
    ]
    paths = dot_plots(summary, metrics, columns, models, folder, title) + heat_maps(
        summary, metrics, columns, models, folder, title
    )
    cm_models = [m for m in CONFUSION_MODELS if m in models]
    plot = confusion_plot(report.confusion_matrices, cm_models, [*report.sites, MERGED], folder, report.label_names)
    return paths + ([plot] if plot else [])


def write_compare(
    experiment: Experiment, out: Path, metrics: Optional[Sequence[str]], wall: float, command: list[str]
) -> CompareReport:
    """results.md, the figures and results.json of a compare (one repetition set, one held-out site or none)."""
    runs = experiment.runs
    metrics = list(metrics or reported_metrics(runs))
    sites = list(dict.fromkeys(c for run in runs for rows in run.evaluations.values() for c in rows if c != MERGED))
    mean_over = experiment.mean_over
    summary = summarize(runs, metrics, mean_over)
    models = model_order(list(summary), sites)
    columns = [*sites, *([mean_label(mean_over)] if mean_over else []), MERGED]
    report = CompareReport(
        command=shlex.join(command),
        recipes=experiment.configs,
        overrides=experiment.overrides,
        modes=list(experiment.modes),
        repeats=experiment.repeats,
        seeds=sorted({r.seed for r in runs}),
        sites=sites,
        mean_over=mean_over,
        columns=columns,
        models=models,
        label_names=experiment.label_names,
        summary=summary,
        confusion_matrices=confusion_totals(runs),
        metrics=metrics,
        holdout=experiment.holdout,
        runs=[asdict(r) for r in runs],
        startup=experiment.startup_report(),
        wall_seconds=wall,
        plots=[],
        traffic=traffic_summary(runs),
    )
    figures = compare_figures(report, out)
    shift = shift_reports(runs, experiment.group_names, sites, out)
    report = replace(report, plots=[p.name for p in [*figures, *shift]])
    md = [
        f"# {Path(experiment.configs[-1]).stem}: {' / '.join(experiment.modes)}",
        "",
        f"`{report.command}`",
        "",
        f"Every model tested on every site's own test split; mean ± std over {experiment.repeats} repetition(s) "
        f"(seeds {report.seeds}). Columns: each site's test set"
        + (f", the mean over {', '.join(mean_over)}" if mean_over else "")
        + ", and all sites' test data merged. "
        "Rows: the pooled model, each site's own local model on its own data, each site's local model on every site, "
        "the federated model."
        + (
            f" No model trained on {experiment.holdout}'s data: its column is a hospital the models never saw; "
            "'all sites (merged)' covers the sites they trained on."
            if experiment.holdout
            else ""
        ),
        "",
        markdown_tables(summary, metrics, columns, models),
    ]
    if report.traffic:
        md += ["", traffic_table(report.traffic)]
    totals = report.confusion_matrices
    if totals:
        md += [
            "",
            "### Confusion matrices (rows: true class, columns: predicted; summed over repetitions)",
            "",
            "| model | " + " | ".join(column_title(c) for c in [*sites, MERGED]) + " |",
            "|---|" + "---|" * (len(sites) + 1),
        ]
        md += [
            f"| {model_title(m)} | " + " | ".join(str(totals[m].get(c, "-")) for c in [*sites, MERGED]) + " |"
            for m in models
            if m in totals
        ]
    md += ["", startup_line(report.startup, wall)]
    write_atomically(out / "results.md", "\n".join(md) + "\n")
    try:
        if experiment.wandb:
            tables = {
                metric: (
                    ["model", *[column_title(c) for c in columns]],
                    [
                        [
                            model_title(m),
                            *[(summary.get(m, {}).get(c, {}).get(metric) or {}).get("mean") for c in columns],
                        ]
                        for m in models
                    ],
                )
                for metric in metrics
            }
            report = replace(
                report,
                wandb_dir=log_to_wandb(experiment.wandb, "compare", tables, figures, {"command": report.command}),
            )
    finally:
        write_report(report, out)  # once: with the W&B run's folder, or without it if W&B failed
    print("\n" + "\n".join(md[6:]))
    print(f"\nresults written to {out}/results.md, results.json and {len(report.plots)} plot(s)")
    return report


def shift_reports(runs: Sequence[Run], groups: Optional[Sequence[str]], sites: Sequence[str], out: Path) -> list[Path]:
    """``shift_<model>.png`` / ``.csv`` for the pooled and federated models: uncertainty (and Dice) per site and
    group, each cell the mean over repetitions (:mod:`lightning_fed.shift`)."""
    if not groups:
        return []
    from lightning_fed.shift import heat_map, shift_rows

    paths: list[Path] = []
    for model in ("pooled", "federated"):
        collected: dict[str, dict[str, Any]] = {}
        for run in runs:
            for site, values in run.evaluations.get(model, {}).items():
                for key, value in values.items():
                    if GROUPED.match(key) and isinstance(value, float) and math.isfinite(value):
                        collected.setdefault(site, {}).setdefault(key, []).append(value)
                if values.get("labels") == "hidden":
                    collected.setdefault(site, {})["labels"] = "hidden"
        rows = {
            site: {k: (v if k == "labels" else statistics.fmean(v)) for k, v in by_key.items()}
            for site, by_key in collected.items()
        }
        table = shift_rows({s: rows[s] for s in sites if s in rows}, groups)
        if table:
            held = f"; {runs[0].holdout} held out" if runs[0].holdout else ""
            paths.append(
                heat_map(
                    table,
                    groups,
                    out / f"shift_{model}.png",
                    f"{model} model: uncertainty per site and vendor (mean of {len({r.repeat for r in runs})} runs{held})",
                )
            )
    return paths


def write_leave_one_out(
    reports: dict[Optional[str], CompareReport], out: Path, metrics: Optional[Sequence[str]], command: list[str]
) -> LeaveOneOutReport:
    """One table per metric: each model at each held-out site (mean ± std over repetitions)."""
    first = next(iter(reports.values()))
    metrics = list(metrics or first.metrics)
    held = [h for h in reports if h is not None]
    models = [m for m in CONFUSION_MODELS if any(m in r.summary for r in reports.values())]
    rows: dict[str, dict[str, dict[str, Stats]]] = {}
    for model in models:
        for h in held:
            summary = reports[h].summary
            if model == "local":  # no local model of the held-out site: the mean over the other sites' models
                values = {
                    m: [
                        v
                        for name, by_column in summary.items()
                        if name.startswith("local:")
                        for v in (by_column.get(h, {}).get(m) or {}).get("values", [])
                    ]
                    for m in metrics
                }
                rows.setdefault("local (mean of the site models)", {})[h] = {
                    m: stats_of(v) for m, v in values.items() if v
                }
            else:
                rows.setdefault(model, {})[h] = summary.get(model, {}).get(h, {})
    md = [
        f"# Leave one site out: {', '.join(held)}",
        "",
        f"`{shlex.join(command)}`",
        "",
        "Each column: the models trained without that site, tested on its test data (mean ± std over repetitions).",
    ]
    for metric in metrics:
        md += [
            "",
            f"### {metric}",
            "",
            "| model | " + " | ".join(f"{h} (held out)" for h in held) + " |",
            "|---|" + "---|" * len(held),
        ]
        md += [
            f"| {model} | " + " | ".join(cell(rows[model].get(h, {}).get(metric)) for h in held) + " |"
            for model in rows
        ]
    report = LeaveOneOutReport(
        command=shlex.join(command),
        holdouts=held,
        metrics=metrics,
        rows=rows,
        folders={h: f"holdout-{h}" for h in held},
    )
    write_atomically(out / "results.md", "\n".join(md) + "\n")
    write_report(report, out)
    print("\n" + "\n".join(md[4:]))
    print(
        f"\nleave-one-site-out results written to {out}/results.md (each held-out site's full comparison in holdout-<site>/)"
    )
    return report


# -- sweep ---------------------------------------------------------------------------------------
def sweep_figures(
    rows: Sequence[SweepRow], keys: Sequence[str], metrics: Sequence[str], column: str, folder: Path
) -> list[Path]:
    """A sweep's figures: a line plot per metric (the first grid key on the x axis) and, when the federated runs
    sent different amounts, the metric against MB sent."""
    return line_plots(rows, keys, metrics, folder, column) + bytes_plots(rows, metrics, folder, column)


def write_sweep(
    experiment: Experiment,
    points: list[Point],
    out: Path,
    metrics: Optional[Sequence[str]],
    wall: float,
    command: list[str],
    final: bool = True,
) -> SweepReport:
    """results.md, the figures and results.json of a sweep; ``final=False`` after each grid point but the last (the
    results so far, nothing printed, nothing sent to W&B)."""
    keys = list(points[0])
    metrics = list(metrics or reported_metrics(experiment.runs))
    mean_over = experiment.mean_over
    column = mean_label(mean_over) if mean_over else MERGED
    rows: list[SweepRow] = []
    for point in points:
        runs = [r for r in experiment.runs if r.point == point]
        summary = summarize(runs, metrics, mean_over)
        sites = [c for c in runs[0].evaluations[next(iter(runs[0].evaluations))] if c != MERGED]
        for model in model_order(list(summary), sites):
            if model.startswith("local:"):
                continue  # the sweep table keeps pooled / local / federated; compare shows every local model
            rows.append(
                {
                    "point": point,
                    "model": model,
                    "metrics": {m: summary[model].get(column, {}).get(m) for m in metrics},
                    "traffic": traffic_summary(runs) if model == "federated" else {},
                }
            )
    plots = sweep_figures(rows, keys, metrics, column, out)
    title = Path(experiment.configs[-1]).stem
    measured = any(r.get("traffic") for r in rows)
    header = (
        "| "
        + " | ".join([*map(short_key, keys), "model", *metrics, *(["MB sent / site / round"] if measured else [])])
        + " |"
    )
    body = [
        "| "
        + " | ".join(
            [
                *[json.dumps(r["point"][k]) for k in keys],
                model_title(r["model"]),
                *[cell(r["metrics"][m]) for m in metrics],
                *([megabytes(r.get("traffic"))] if measured else []),
            ]
        )
        + " |"
        for r in rows
    ]
    report = SweepReport(
        command=shlex.join(command),
        recipes=experiment.configs,
        overrides=experiment.overrides,
        grid=keys,
        points=points,
        modes=list(experiment.modes),
        repeats=experiment.repeats,
        column=column,
        rows=rows,
        runs=[asdict(r) for r in experiment.runs],
        startup=experiment.startup_report(),
        wall_seconds=wall,
        plots=[p.name for p in plots],
    )
    md = [
        f"# {title}: sweep over {', '.join(map(short_key, keys))}" + ("" if final else " (in progress)"),
        "",
        f"`{report.command}`",
        "",
        f"{len(points)} grid point(s) × {len(experiment.modes)} mode(s) × {experiment.repeats} repetition(s); metrics on "
        f"{column_title(column)} test data, mean ± std over repetitions.",
        "",
        header,
        "|" + "---|" * (len(keys) + 1 + len(metrics) + measured),
        *body,
        "",
        startup_line(report.startup, wall),
    ]
    write_atomically(out / "results.md", "\n".join(md) + "\n")
    try:
        if final and experiment.wandb:
            tables: dict[str, Table] = {
                "sweep": (
                    [*map(short_key, keys), "model", *metrics],
                    [
                        [
                            *[json.dumps(r["point"][k]) for k in keys],
                            r["model"],
                            *[(r["metrics"][m] or {}).get("mean") for m in metrics],
                        ]
                        for r in rows
                    ],
                )
            }
            report = replace(
                report, wandb_dir=log_to_wandb(experiment.wandb, "sweep", tables, plots, {"command": report.command})
            )
    finally:
        write_report(report, out)  # once per call: with the W&B run's folder, or without it if W&B failed
    if final:
        print("\n" + "\n".join(md[6:]))
        print(f"\nresults written to {out}/results.md, results.json and {len(plots)} plot(s)")
    return report


# -- replot --------------------------------------------------------------------------------------
def replot(folder: Path) -> list[Path]:
    """Draw a compare's or sweep's figures again from its ``results.json`` (no training), by the report's kind; a
    leave-one-site-out folder has each held-out site's comparison redrawn."""
    report = read_report(folder)
    if report is None:
        raise ValueError(f"{folder / 'results.json'} is not a compare's or sweep's report")
    if report.kind == "leave_one_out":
        assert isinstance(report, LeaveOneOutReport)
        return [p for name in report.folders.values() for p in replot(folder / name)]
    if report.kind == "sweep":
        assert isinstance(report, SweepReport)
        metrics = list(dict.fromkeys(m for r in report.rows for m in r["metrics"]))
        return sweep_figures(report.rows, report.grid, metrics, report.column, folder)
    assert isinstance(report, CompareReport)
    return compare_figures(report, folder)
