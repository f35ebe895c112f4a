"""``lightning-fed compare`` and ``lightning-fed sweep``: does the federated model beat each site alone, and how
close does it come to pooling all data?

``compare`` trains the recipe's model and data under each mode and tests every model on every site's own test set:

- ``pooled``: one run on the union of the sites' training data (the centralised reference; simulation only);
- ``local``: every site trains alone (the ``local`` rule: nothing exchanged); each site's model is tested on
  every site, so "site X's model on site Y's data" is in the results, and the ``local`` row is each site's own
  model on its own data;
- ``federated``: the recipe as written.

``--holdout SITE`` trains every mode without that site and tests every model on its test data too: how the models
do at a hospital they never saw (``--holdout A,B,...`` holds each out in turn: leave-one-site-out).

Repetitions change the seed (``seed_everything`` and, unless ``--fixed-data``, the data split seed) and report
mean ± std. ``sweep`` runs a grid of recipe overrides (× modes × repetitions) and reports one table and one line plot
per metric. Both keep the workers of one layout warm between runs (:class:`~lightning_fed.federation.WorkerPool`)
and report what that saved.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence

import yaml

from lightning_fed.errors import UsageError

METRICS = ("accuracy", "precision", "recall", "auroc")
SEGMENTATION_METRICS = ("dice", "mutual_information", "entropy")
_GROUPED = re.compile(r"^(dice|entropy|aleatoric|mutual_information)_[a-z0-9_]+$")  # per group (vendor) values
MODES = ("pooled", "local", "federated")
MERGED = "federated"  # the column of every site's test data together (metric states merged)
_INDEXED = re.compile(r"^(?P<key>[^\[\]]+)\[(?P<index>-?\d*(?::-?\d*)?)\]$")


# -- grid ----------------------------------------------------------------------------------------
def split_values(text: str) -> list[Any]:
    """``"0.1,0.2,[1,2]"`` -> ``[0.1, 0.2, [1, 2]]``: commas inside brackets or quotes do not split; YAML values."""
    parts, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    parts.append(current)
    if any(not p.strip() for p in parts):
        raise ValueError(f"empty value in {text!r}: give comma-separated values, e.g. key=0.1,0.2")
    return [yaml.safe_load(p.strip()) for p in parts]


def parse_axis(spec: str) -> tuple[str, list[Any]]:
    """``"key=v1,v2"`` -> ``("key", [v1, v2])``; the key may index a list: ``key[0]`` or ``key[1:]``."""
    key, sep, values = spec.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"grid axis {spec!r} must look like KEY=V1,V2,... (e.g. trainer.max_epochs=5,10)")
    return key.strip(), split_values(values)


def expand_grid(grid: Sequence[str] = (), zipped: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every combination of the ``grid`` axes (a product), each crossed with the ``zipped`` axes, which vary
    together (equal lengths). Each point maps keys to values, in axis order."""
    axes = [parse_axis(a) for a in grid]
    zips = [parse_axis(a) for a in zipped]
    keys = [k for k, _ in axes] + [k for k, _ in zips]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"grid key(s) {dupes} given twice: give each key once")
    if zips and len({len(v) for _, v in zips}) != 1:
        raise ValueError(f"--zip axes must have the same number of values, got {[f'{k}: {len(v)}' for k, v in zips]}")
    zipped_points = [dict(zip([k for k, _ in zips], vals)) for vals in zip(*[v for _, v in zips])] if zips else [{}]
    points = []
    for combo in itertools.product(*[v for _, v in axes]):
        for extra in zipped_points:
            points.append({**dict(zip([k for k, _ in axes], combo)), **extra})
    return points


def _lookup(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def point_arguments(point: dict[str, Any], base: dict[str, Any]) -> list[str]:
    """Recipe overrides for one grid point, as dotted command-line arguments. ``key[i]``/``key[a:b]`` set elements
    of the recipe's list at ``key`` (a slice gets the one value in every position)."""
    values: dict[str, Any] = {}
    for raw, value in point.items():
        match = _INDEXED.match(raw)
        if match is None:
            values[raw] = value
            continue
        key, index = match["key"], match["index"]
        if key not in values:
            try:
                values[key] = list(_lookup(base, key))
            except (KeyError, TypeError):
                raise ValueError(f"grid key {raw!r}: the recipe has no list at {key!r} to index") from None
        target = values[key]
        try:
            if ":" in index:
                start, _, stop = index.partition(":")
                span = range(len(target))[slice(int(start) if start else None, int(stop) if stop else None)]
                if not span:
                    raise IndexError
                for i in span:
                    target[i] = value
            else:
                target[int(index)] = value
        except IndexError:
            raise ValueError(f"grid key {raw!r}: index out of range for {key!r} (length {len(target)})") from None
    # a string goes as it was given (YAML read it as a string, and reads it back so); quoted, a str-typed option
    # such as compression or aggregator would keep the quotes
    return [f"--{k}={v if isinstance(v, str) and yaml.safe_load(v) == v else json.dumps(v)}" for k, v in values.items()]


def point_label(point: dict[str, Any]) -> str:
    return ", ".join(f"{_short(k)}={v}" for k, v in point.items()) or "recipe"


def _short(key: str) -> str:
    return key.replace("init_args.", "")


# -- runs ----------------------------------------------------------------------------------------
@dataclass
class Run:
    """One trained mode of one repetition (of one grid point) and every evaluation of its models."""

    point: dict[str, Any]
    repeat: int
    seed: int
    mode: str
    evaluations: dict[str, dict[str, dict[str, Any]]]  # model -> column (site | "federated") -> metrics
    fit_seconds: float
    startup_seconds: float
    warm: bool
    note: Optional[str] = None
    holdout: Optional[str] = None  # the site no model of this run trained on
    traffic: Optional[dict[str, float]] = None  # federated runs: mean bytes per site and round (sent, received, update)


@dataclass
class Experiment:
    """Runs recipes under several modes, repetitions and grid points, all tested on every site's test set."""

    configs: list[str]
    overrides: list[str] = field(default_factory=list)
    modes: Sequence[str] = MODES
    repeats: int = 1
    vary_data_seed: bool = True
    reuse_sites: bool = True
    progress: bool = False
    holdout: Optional[str] = None
    runs: list[Run] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes:
            raise ValueError(f"unknown mode(s) {unknown}: choose from {', '.join(MODES)}")
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes repeat: {list(self.modes)}")
        if not isinstance(self.repeats, int) or self.repeats < 1:
            raise ValueError(f"repeats must be an integer >= 1, got {self.repeats!r}")
        base = self._cli([])
        from lightning_fed.lightning_cli import _label_names
        from lightning_fed.strategy import FederatedStrategy

        if not isinstance(base.trainer.strategy, FederatedStrategy):
            raise ValueError("compare/sweep need a recipe whose trainer.strategy is lightning_fed.FederatedStrategy")
        self.base_config: dict[str, Any] = base.config.as_dict()
        self.mean_over: Optional[list[str]] = (self.base_config.get("results") or {}).get("mean_over")
        seed = self.base_config.get("seed_everything")
        self.base_seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0
        try:
            data_seed = _lookup(self.base_config, "data.init_args.seed")
        except KeyError:
            data_seed = None
        self.base_data_seed = data_seed if isinstance(data_seed, int) else None
        self.label_names = _label_names(base.model, base.datamodule)
        self.group_names: Optional[tuple[str, ...]] = tuple(getattr(base.datamodule, "group_names", None) or ()) or None
        self.wandb = _wandb_settings(base.trainer.loggers)
        self._cluster = base.trainer.strategy.config.cluster
        self._placement = base.trainer.strategy.config.placement
        self._sites = base.trainer.strategy.sites(base.datamodule, base.model)
        if self.holdout is not None:
            from lightning_fed.data.pooled import HeldOutSites

            HeldOutSites(base.datamodule, self.holdout).federated_sites()  # checked before any training
        self._layouts: dict[str, Any] = {}
        from lightning_fed.federation import WorkerPool

        self.pool: Optional[WorkerPool] = WorkerPool() if self.reuse_sites else None
        self._runtime: Any = None

    def _cli(self, extra: list[str]) -> Any:
        from lightning_fed.lightning_cli import FederatedCLI

        args = [a for c in self.configs for a in ("--config", c)] + list(self.overrides) + list(extra)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
            return FederatedCLI(args=args, run=False, save_config_callback=None, parser_kwargs={"prog": "lightning-fed"})

    def _pin_layouts(self, cluster_cpus: float) -> float:
        """Fix the sites' worker layout and the pooled run's once, so that the idle workers of both fit the
        cluster together and every run after the first finds them warm. Returns the CPUs they hold together."""
        from lightning_fed.config import Placement
        from lightning_fed.placement import place_sites

        specs = place_sites(self._sites, self._placement, cluster_cpus)
        shared = [spec for spec in specs if not spec.resources]
        sites = self._placement
        if self._placement.automatic and shared:  # the cost model's choice, written down
            sites = Placement(workers=len(shared), worker_cpus=shared[0].num_cpus, timeout=self._placement.timeout)
        pooled_cpus = shared[0].num_cpus if shared else max(spec.num_cpus for spec in specs)
        self._layouts = {"sites": sites, "pooled": Placement(workers=1, worker_cpus=pooled_cpus, timeout=self._placement.timeout)}
        return sum(spec.num_cpus for spec in specs) + ("pooled" in self.modes) * pooled_cpus

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> "Experiment":
        from lightning_fed.runtime import RayRuntime, local_ray_started

        import ray

        self._runtime = RayRuntime(self._cluster.address, self._cluster.init_kwargs)
        joined = (ray.is_initialized() and not local_ray_started()) or bool(self._runtime.address)
        if joined:
            self._runtime.ensure()
        cpus = ray.cluster_resources().get("CPU", 0.0) if joined else float(os.cpu_count() or 1)
        self._runtime.ensure(self._pin_layouts(cpus))  # one Ray session for every run: workers can stay warm
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self._runtime is not None:
            self._runtime.shutdown()
            self._runtime = None

    # -- running -----------------------------------------------------------------------------------
    def run_point(self, point: Optional[dict[str, Any]] = None, say: Any = print) -> list[Run]:
        """Every mode × repetition at one grid point (``None``: the recipe as written)."""
        point = dict(point or {})
        args = point_arguments(point, self.base_config)
        runs = []
        for repeat in range(self.repeats):
            seed = self.base_seed + repeat
            extra = [f"--seed_everything={seed}"]
            if self.vary_data_seed and self.base_data_seed is not None:
                extra.append(f"--data.init_args.seed={self.base_data_seed + repeat}")
            for mode in self.modes:
                t0 = time.monotonic()
                run = self._run_mode(mode, extra + args, point, repeat, seed)
                runs.append(run)
                self.runs.append(run)
                say(f"[lightning-fed] {point_label(point)} | repeat {repeat + 1}/{self.repeats} | {mode}: "
                    f"{time.monotonic() - t0:.1f}s (start-up {run.startup_seconds:.1f}s{', warm sites' if run.warm else ''}) | "
                    + _brief(run, self.mean_over))
        return runs

    def _run_mode(self, mode: str, extra: list[str], point: dict[str, Any], repeat: int, seed: int) -> Run:
        from lightning_fed.data.pooled import POOLED, HeldOutSites, PooledSites
        from lightning_fed.federation import evaluation_of
        from lightning_fed.strategies.local import Local
        from lightning_fed.strategies.site import load_weights, state_to_numpy

        cli = self._cli(extra)
        trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
        strategy = trainer.strategy
        strategy.worker_pool = self.pool
        strategy.reconfigure(progress=self.progress, placement=self._layouts["pooled" if mode == "pooled" else "sites"])
        started_before = self.pool.started if self.pool is not None else 0
        note = None
        if mode != "federated":
            strategy.reconfigure(aggregator=Local())  # also drops secure aggregation: nothing is exchanged
        train_data = HeldOutSites(datamodule, self.holdout) if self.holdout is not None else datamodule
        fit_data = train_data
        if mode == "pooled":
            fit_data = PooledSites(strategy.sites(train_data, model))
            privacy = strategy.config.privacy
            if isinstance(privacy, dict):
                strategy.reconfigure(privacy=privacy.get("*"))
                note = "pooled run private as the recipe's '*' sites" if privacy.get("*") is not None else None
        try:
            trainer.fit(model, datamodule=fit_data)
            fit = strategy.last_fit
            startup = fit.startup.seconds
            federation = strategy.federation
            if mode == "federated":
                global_weights = state_to_numpy(model.state_dict())
                evaluations = {"federated": evaluation_rows_of(federation.evaluate("test", global_weights))}
                tested = {"federated": global_weights}
            elif mode == "local":
                tested = federation.site_weights()
                raw = {name: federation.evaluate("test", state, exact=True) for name, state in tested.items()}
                evaluations = {f"local:{name}": evaluation_rows_of(r) for name, r in raw.items()}
                evaluations["local"] = evaluation_rows_of(evaluation_of("test", {name: raw[name].sites[name] for name in raw}))
                tested = {f"local:{name}": weights for name, weights in tested.items()}
            else:
                pooled_weights = federation.site_weights()[POOLED]
                load_weights(model, pooled_weights)
                federation, seconds = self._test_federation(strategy, trainer, model, train_data)  # at every site it pooled
                startup += seconds
                evaluations = {"pooled": evaluation_rows_of(federation.evaluate("test", pooled_weights, exact=True))}
                tested = {"pooled": pooled_weights}
            if self.holdout is not None and tested:  # every model at the site none of them trained on
                federation, seconds = self._test_federation(strategy, trainer, model, datamodule, only=self.holdout)
                startup += seconds
                for label, weights in tested.items():
                    evaluations[label][self.holdout] = evaluation_rows_of(federation.evaluate("test", weights, exact=True))[self.holdout]
        finally:
            strategy.shutdown()
        warm = self.pool is not None and self.pool.started == started_before  # no new worker process in this run
        return Run(point=point, repeat=repeat, seed=seed, mode=mode, evaluations=evaluations,
                   fit_seconds=float(fit.fit_seconds), startup_seconds=float(startup), warm=warm, note=note, holdout=self.holdout,
                   traffic=traffic_of(fit) if mode == "federated" else None)

    def _test_federation(self, strategy: Any, trainer: Any, model: Any, datamodule: Any, only: Optional[str] = None) -> tuple[Any, float]:
        """A test-only federation of the recipe's sites (or of ``only``) on the sites' workers, and its start-up time."""
        from lightning.pytorch.trainer.states import TrainerFn

        strategy.reconfigure(placement=self._layouts["sites"])
        trainer.state.fn = TrainerFn.TESTING
        sites = strategy.sites(datamodule, model, splits=("test",))
        if only is not None:
            sites = [s for s in sites if s.name == only]
        federation = strategy.federated_launcher.start(trainer, model, sites, "test", id(datamodule))
        return federation, federation.startup.seconds

    # -- reporting ---------------------------------------------------------------------------------
    def startup_report(self) -> dict[str, Any]:
        """Start-up (federations of a run: fit, and the pooled model's test) of runs that started new site processes
        vs runs that ran entirely on warm ones."""
        cold = [r.startup_seconds for r in self.runs if not r.warm]
        warm = [r.startup_seconds for r in self.runs if r.warm]
        report: dict[str, Any] = {
            "cold_runs": len(cold), "warm_runs": len(warm),
            "cold_mean_seconds": statistics.fmean(cold) if cold else None,
            "warm_mean_seconds": statistics.fmean(warm) if warm else None,
            "worker_processes_started": self.pool.started if self.pool is not None else None,
            "worker_processes_reused": self.pool.reused if self.pool is not None else None,
        }
        started, reused = report["worker_processes_started"], report["worker_processes_reused"]
        if cold and reused and started:
            # what each new site process cost on average, times the processes reused, minus what resets cost
            report["estimated_saving_seconds"] = sum(cold) / started * reused - sum(warm)
        return report


def evaluation_rows_of(evaluation: Any) -> dict[str, dict[str, Any]]:
    """An :class:`~lightning_fed.results.Evaluation`'s rows, with the figures compare reports."""
    keep = (*METRICS, *SEGMENTATION_METRICS, "aleatoric", "loss", "confusion_matrix", "auroc_per_label", "dice_per_class", "labels")
    return {column: {k: v for k, v in row.items() if k in keep or _GROUPED.match(k)} for column, row in evaluation.rows().items()}


def traffic_of(fit: Any) -> Optional[dict[str, float]]:
    """Mean bytes one site sent, received, and sent as its update, per round of a federated fit."""
    if fit.traffic is None or not fit.traffic.rounds:
        return None
    sent, received = fit.traffic.per_site_round()
    return {"sent": sent, "received": received, "update": fit.traffic.update_per_site_round()}


TRAFFIC = {"sent": "MB sent", "received": "MB received", "update": "MB of update"}


def traffic_summary(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """``{"sent"|"received"|"update": stats}`` of the federated runs' bytes per site and round (empty without any)."""
    measured = [r.traffic for r in runs if r.traffic]
    return {kind: _stats([t[kind] for t in measured]) for kind in TRAFFIC} if measured else {}


def traffic_table(summary: dict[str, dict[str, Any]]) -> str:
    """The communication of the federated model: MB per site and round."""
    cells = " | ".join(f"{summary[k]['mean'] / 1e6:.4f}" for k in TRAFFIC)
    return "\n".join(["### communication (federated, per site and round)", "",
                      "| " + " | ".join(TRAFFIC.values()) + " |", "|" + "---|" * len(TRAFFIC), f"| {cells} |"])


def reported_metrics(runs: list[Run]) -> tuple[str, ...]:
    """The metrics a compare reports by default: Dice and uncertainty for segmentation, else classification's."""
    rows = [row for run in runs for table in run.evaluations.values() for row in table.values()]
    return SEGMENTATION_METRICS if any("dice" in r or "mutual_information" in r for r in rows) else METRICS


def _brief(run: Run, mean_over: Optional[list[str]]) -> str:
    label = "local" if run.mode == "local" else run.mode
    rows = run.evaluations.get(label, {})
    column = f"mean over {len(mean_over)} sites" if mean_over else "all sites"
    values = _column_values(rows, mean_over)
    shown = "  ".join(f"{m}={values[m]:.3f}" for m in (*METRICS, *SEGMENTATION_METRICS) if isinstance(values.get(m), float))
    return f"{column}: {shown}"


def _column_values(rows: dict[str, dict[str, Any]], mean_over: Optional[list[str]]) -> dict[str, Any]:
    if not mean_over:
        return rows.get(MERGED, {})
    return {m: statistics.fmean(rows[s][m] for s in mean_over) for m in (*METRICS, *SEGMENTATION_METRICS)
            if all(isinstance(rows.get(s, {}).get(m), float) for s in mean_over)}


# -- summaries -----------------------------------------------------------------------------------
def model_order(labels: Sequence[str], sites: Sequence[str]) -> list[str]:
    order = ["pooled", "local", *[f"local:{s}" for s in sites], "federated"]
    return [m for m in order if m in labels] + sorted(set(labels) - set(order))


def summarize(runs: list[Run], metrics: Sequence[str] = METRICS, mean_over: Optional[list[str]] = None) -> dict[str, Any]:
    """``{model: {column: {metric: {"mean", "std", "n", "values"}}}}`` over repetitions; columns are the sites,
    ``mean(<sites>)`` when ``mean_over`` is given (the mean of those sites' values in each repetition), and
    ``federated`` (all sites' test data merged). ``std`` is the sample standard deviation (0 for one value)."""
    collected: dict[str, dict[str, dict[str, list[float]]]] = {}
    for run in runs:
        for model, rows in run.evaluations.items():
            columns = {c: r for c, r in rows.items()}
            if mean_over:
                columns[mean_label(mean_over)] = _column_values(rows, mean_over)
            for column, values in columns.items():
                for metric in metrics:
                    value = values.get(metric)
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        collected.setdefault(model, {}).setdefault(column, {}).setdefault(metric, []).append(float(value))
    return {model: {column: {metric: _stats(values) for metric, values in by_metric.items()}
                    for column, by_metric in by_column.items()}
            for model, by_column in collected.items()}


def mean_label(sites: Sequence[str]) -> str:
    return f"mean({','.join(sites)})"


def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def confusion_totals(runs: list[Run]) -> dict[str, dict[str, list[list[int]]]]:
    """Confusion matrices per model and site (and merged), summed over repetitions."""
    totals: dict[str, dict[str, Any]] = {}
    for run in runs:
        for model, rows in run.evaluations.items():
            for column, values in rows.items():
                matrix = values.get("confusion_matrix")
                if not matrix:
                    continue
                current = totals.setdefault(model, {}).get(column)
                totals[model][column] = matrix if current is None else [[a + b for a, b in zip(r1, r2)] for r1, r2 in zip(current, matrix)]
    return totals


def _cell(stats: Optional[dict[str, Any]]) -> str:
    if not stats:
        return "-"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}" if stats["n"] > 1 else f"{stats['mean']:.3f}"


def markdown_tables(summary: dict[str, Any], metrics: Sequence[str], columns: Sequence[str], models: Sequence[str]) -> str:
    """One markdown table per metric: a row per model, a column per test set."""
    parts = []
    for metric in metrics:
        header = f"| {metric} | " + " | ".join(_column_title(c) for c in columns) + " |"
        rule = "|---|" + "---|" * len(columns)
        body = [f"| {_model_title(m)} | " + " | ".join(_cell(summary.get(m, {}).get(c, {}).get(metric)) for c in columns) + " |"
                for m in models]
        parts.append("\n".join([f"### {metric}", "", header, rule, *body]))
    return "\n\n".join(parts)


def _column_title(column: str) -> str:
    return "all sites (merged)" if column == MERGED else column


def _axis_label(column: str) -> str:
    """A test set's name on a figure axis: a long ``mean(a,b,c,...)`` becomes ``mean of N sites``."""
    if column.startswith("mean(") and len(column) > 16:
        return f"mean of {column.count(',') + 1} sites"
    return _column_title(column)


def _model_title(model: str) -> str:
    if model == "local":
        return "local (each site's own model)"
    if model.startswith("local:"):
        return f"{model.split(':', 1)[1]} only"
    return model


# -- plots ---------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed on a cluster node
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


MAX_FIGURE_INCHES = (10.0, 5.0)  # at 110 dpi: at most 1100 x 550 pixels, a laptop screen or a paper column
_MARKERS = "osD^vP*Xhp<>"


def fitted_limits(lows: Sequence[float], highs: Sequence[float], pad: float = 0.08, floor: float = 0.02) -> tuple[float, float]:
    """A value axis around the data (error bars included) with ``pad`` of its span on each side, never narrower
    than ``floor``: the differences between models fill the plot, not the distance from zero."""
    lo, hi = min(lows), max(highs)
    span = max(hi - lo, floor)
    middle = (lo + hi) / 2
    return middle - span * (0.5 + pad), middle + span * (0.5 + pad)


def dot_plots(summary: dict[str, Any], metrics: Sequence[str], columns: Sequence[str], models: Sequence[str], out: Path, title: str) -> list[Path]:
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
                ax.errorbar(xs, [st["mean"] for st in stats], yerr=[st["std"] for st in stats], fmt=_MARKERS[i % len(_MARKERS)],
                            ms=5, capsize=2, lw=1, label=_model_title(model))
        ax.set_ylim(*fitted_limits([v["mean"] - v["std"] for v in values], [v["mean"] + v["std"] for v in values]))
        ax.set_xticks(range(len(columns)), [_axis_label(c) for c in columns], rotation=20 if len(columns) > 4 else 0, ha="right" if len(columns) > 4 else "center")
        for j in range(1, len(columns)):
            ax.axvline(j - 0.5, color="0.9", lw=0.8, zorder=0)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylabel(metric)
        ax.set_title(f"{title}: {metric} on each test set (mean ± std)", fontsize=9)
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left", frameon=False)
        paths.append(_save(plt, fig, out / f"{metric}.png"))
    return paths


def model_site_matrix(summary: dict[str, Any], metric: str, models: Sequence[str], columns: Sequence[str]) -> list[list[Optional[float]]]:
    """Mean ``metric`` of every model (rows) on every test set (columns); ``None`` where a model was not tested."""
    return [[(summary.get(m, {}).get(c, {}).get(metric) or {}).get("mean") for c in columns] for m in models]


def heat_maps(summary: dict[str, Any], metrics: Sequence[str], columns: Sequence[str], models: Sequence[str], out: Path, title: str) -> list[Path]:
    """``<metric>_models_by_site.png``: every model (rows: pooled, local, each site only, federated) tested on every
    site (columns), each cell its mean over repetitions."""
    plt = _pyplot()
    import numpy as np

    paths = []
    for metric in metrics:
        matrix = model_site_matrix(summary, metric, models, columns)
        grid = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
        if np.isnan(grid).all():
            continue
        width = min(MAX_FIGURE_INCHES[0], 2.4 + 0.85 * len(columns))
        fig, ax = plt.subplots(figsize=(width, min(MAX_FIGURE_INCHES[1], 1.0 + 0.36 * len(models))))
        image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto")
        middle = np.nanmean(grid)
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                if value is not None:
                    ax.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=7, color="black" if value > middle else "white")
        ax.set_xticks(range(len(columns)), [_axis_label(c) for c in columns], rotation=20 if len(columns) > 4 else 0,
                      ha="right" if len(columns) > 4 else "center", fontsize=8)
        ax.set_yticks(range(len(models)), [_model_title(m) for m in models], fontsize=8)
        ax.set_xlabel("test set")
        fig.colorbar(image, ax=ax, fraction=0.04, label=metric)
        ax.set_title(f"{title}: {metric}, every model on every test set", fontsize=9)
        paths.append(_save(plt, fig, out / f"{metric}_models_by_site.png"))
    return paths


def confusion_plot(totals: dict[str, dict[str, Any]], models: Sequence[str], columns: Sequence[str], out: Path,
                   label_names: Optional[Sequence[str]] = None) -> Optional[Path]:
    """``confusion_matrices.png``: a row per model, a column per test set, counts summed over repetitions."""
    plt = _pyplot()
    shown = [m for m in models if m in totals]
    if not shown:
        return None
    fig, axes = plt.subplots(len(shown), len(columns), figsize=(2.3 * len(columns), 2.2 * len(shown)), squeeze=False)
    for i, model in enumerate(shown):
        for j, column in enumerate(columns):
            ax = axes[i][j]
            matrix = totals[model].get(column)
            names = list(label_names) if label_names and matrix and len(label_names) == len(matrix) else [""] * len(matrix or [])
            ax.set_xticks(range(len(names)), names if i == len(shown) - 1 else [""] * len(names), fontsize=6)
            ax.set_yticks(range(len(names)), names if j == 0 else [""] * len(names), fontsize=6)
            if matrix is None:
                ax.axis("off")
                continue
            ax.imshow(matrix, cmap="Blues")
            for r, row in enumerate(matrix):
                for c, value in enumerate(row):
                    ax.text(c, r, str(value), ha="center", va="center", fontsize=8)
            if i == 0:
                ax.set_title(_column_title(column), fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{_model_title(model)}\ntrue", fontsize=8)
            if i == len(shown) - 1:
                ax.set_xlabel("predicted", fontsize=8)
    return _save(plt, fig, out / "confusion_matrices.png")


def line_plots(rows: list[dict[str, Any]], keys: Sequence[str], metrics: Sequence[str], out: Path, column: str) -> list[Path]:
    """``<metric>.png`` for a sweep: the first grid key on the x axis, one line per other grid values × model."""
    if not keys:
        return []
    plt = _pyplot()
    x_key = keys[0]
    tied = [k for k in keys[1:] if _moves_with(rows, x_key, k)]  # zipped with the x axis: not a line of its own
    rest = [k for k in keys[1:] if k not in tied]
    paths = []
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(8.0, 3.8))
        lines: dict[tuple, list[tuple[Any, dict[str, Any]]]] = {}
        lows: list[float] = []
        highs: list[float] = []
        for row in rows:
            lines.setdefault((row["model"], *[json.dumps(row["point"][k]) for k in rest]), []).append((row["point"][x_key], row["metrics"].get(metric)))
        for line, points in lines.items():
            points = [(x, s) for x, s in points if s]
            if not points:
                continue
            label = ", ".join([_model_title(line[0]), *[f"{_short(k)}={v}" for k, v in zip(rest, line[1:])]])
            xs = [x if isinstance(x, (int, float)) else str(x) for x, _ in points]
            ax.errorbar(xs, [s["mean"] for _, s in points], yerr=[s["std"] for _, s in points], marker="o", ms=4, capsize=2, lw=1, label=label)
            lows += [s["mean"] - s["std"] for _, s in points]
            highs += [s["mean"] + s["std"] for _, s in points]
        if lows:
            ax.set_ylim(*fitted_limits(lows, highs))
        ax.set_xlabel(_short(x_key) + (f" ({', '.join(map(_short, tied))} with it)" if tied else ""))
        ax.set_ylabel(f"{metric} ({_axis_label(column)})")
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left", frameon=False)
        ax.grid(alpha=0.3)
        paths.append(_save(plt, fig, out / f"{metric}.png"))
    return paths


def _megabytes(traffic: Optional[dict[str, Any]]) -> str:
    return f"{traffic['sent']['mean'] / 1e6:.4f}" if traffic else "-"


def _point_title(point: dict[str, Any]) -> str:
    """A short name for a grid point: the last part of each key, dict values flattened (``compression=topk,
    fraction=0.1``); keys left at None are left out, unless all are."""
    parts = []
    for key, value in point.items():
        if isinstance(value, dict):
            parts += [f"{k}={v}" for k, v in value.items()]
        elif value is not None:
            parts.append(f"{_short(key).rsplit('.', 1)[-1]}={value}")
    if not parts and point:
        key = next(iter(point))
        parts.append(f"{_short(key).rsplit('.', 1)[-1]}=None")
    return ", ".join(parts) or "recipe"


def bytes_plots(rows: list[dict[str, Any]], metrics: Sequence[str], out: Path, column: str) -> list[Path]:
    """``<metric>_vs_bytes.png`` for a sweep whose federated runs sent different amounts: the metric against the MB a
    site sends per round (log scale), one point per grid point, named in the legend."""
    measured = [r for r in rows if r.get("traffic")]
    if len({round(r["traffic"]["sent"]["mean"]) for r in measured}) < 2:
        return []
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    paths = []
    for metric in metrics:
        points = [(r["traffic"]["sent"]["mean"] / 1e6, r["metrics"].get(metric), _point_title(r["point"])) for r in measured]
        points = [(x, s, label) for x, s, label in points if s]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(8.0, 3.6))
        for x, stats, label in points:
            ax.errorbar([x], [stats["mean"]], yerr=[stats["std"]], marker="o", ms=5, capsize=2, lw=1, label=label)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(*fitted_limits([s["mean"] - s["std"] for _, s, _ in points], [s["mean"] + s["std"] for _, s, _ in points]))
        ax.set_xlabel("MB a site sends per round (federated, log scale)")
        ax.set_ylabel(f"{metric} ({_axis_label(column)})")
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left", frameon=False)
        ax.grid(alpha=0.3, which="both")
        paths.append(_save(plt, fig, out / f"{metric}_vs_bytes.png"))
    return paths


def _moves_with(rows: list[dict[str, Any]], x_key: str, key: str) -> bool:
    """``key`` takes one value per value of ``x_key`` (a ``--zip`` partner of the x axis) and more than one overall."""
    pairs = {(json.dumps(r["point"][x_key]), json.dumps(r["point"][key])) for r in rows}
    return len(pairs) == len({x for x, _ in pairs}) and len({v for _, v in pairs}) > 1


# -- W&B -----------------------------------------------------------------------------------------
def _wandb_settings(loggers: list[Any]) -> Optional[dict[str, Any]]:
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            init = logger._wandb_init
            return {"project": init.get("project"), "save_dir": init.get("dir") or ".", "name": init.get("name") or "experiment",
                    "offline": bool(logger._offline or init.get("mode") == "offline"),
                    **{k: init[k] for k in ("entity", "tags") if init.get(k) is not None}}
    return None


def log_to_wandb(settings: dict[str, Any], kind: str, tables: dict[str, tuple[list[str], list[list[Any]]]], images: list[Path],
                 config: dict[str, Any]) -> str:
    """One W&B run (``job_type`` = ``compare``/``sweep``) holding the result tables and plots; returns its folder."""
    from lightning.pytorch.loggers import WandbLogger

    settings = dict(settings)
    name = settings.pop("name")
    logger = WandbLogger(name=f"{name}-{kind}", group=f"{name}-{kind}", job_type=kind, **settings)
    logger.log_hyperparams(config)
    for key, (columns, data) in tables.items():
        logger.log_table(key=key, columns=columns, data=data)
    if images:
        logger.log_image(key="plots", images=[str(p) for p in images], caption=[p.stem for p in images])
    folder = logger.experiment.dir
    logger.experiment.finish()
    return folder


# -- commands ------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """Bad flags end in one line (the command prints it), not usage plus a message."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _common_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description, allow_abbrev=False,
                                     epilog="Any other --key=value is a recipe override, as with `lightning-fed fit` "
                                            "(e.g. --trainer.max_epochs=3).")
    parser.add_argument("--config", action="append", required=True, help="recipe YAML (repeatable, as for fit)")
    parser.add_argument("--repeats", type=int, default=1, help="repetitions per mode, seeds seed_everything + 0..N-1")
    parser.add_argument("--out", default=None, help="output folder (default: runs/<kind>/<recipe>-<time>)")
    parser.add_argument("--metrics", default=None, help="metrics in tables and plots (default: accuracy, precision, recall, "
                        "auroc; for segmentation dice, mutual_information, entropy; per vendor e.g. dice_siemens)")
    parser.add_argument("--fixed-data", action="store_true", help="keep the recipe's data split seed in every repetition")
    parser.add_argument("--no-reuse", action="store_true", help="start new site processes for every run (measure the saving)")
    parser.add_argument("--progress", action="store_true", help="show each run's federated progress")
    return parser


def _out_dir(out: Optional[str], kind: str, configs: list[str]) -> Path:
    path = Path(out) if out else Path("runs") / kind / f"{Path(configs[-1]).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _metrics(text: Optional[str]) -> Optional[list[str]]:
    """The ``--metrics`` asked for (``None``: chosen from what the runs measured, :func:`reported_metrics`)."""
    if text is None:
        return None
    metrics = [m.strip() for m in text.split(",") if m.strip()]
    known = (*METRICS, *SEGMENTATION_METRICS, "aleatoric", "loss")
    unknown = [m for m in metrics if m not in known and not _GROUPED.match(m)]
    if unknown:
        raise UsageError(f"unknown metric(s) {unknown}: choose from {', '.join(known)} (or a per-vendor one, e.g. dice_siemens)")
    return metrics


def _experiment(args: argparse.Namespace, overrides: list[str], modes: list[str], holdout: Optional[str] = None) -> Experiment:
    try:
        return Experiment(configs=args.config, overrides=overrides, modes=modes, repeats=args.repeats,
                          vary_data_seed=not args.fixed_data, reuse_sites=not args.no_reuse, progress=args.progress, holdout=holdout)
    except ValueError as err:
        raise UsageError(str(err)) from None


def compare(argv: Sequence[str]) -> dict[str, Any]:
    """``lightning-fed compare``: pooled / local / federated on every site's test set, mean ± std, plots."""
    parser = _common_parser("lightning-fed compare", "Train the recipe pooled, locally and federated; test every model on every site's test set.")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: pooled, local, federated")
    parser.add_argument("--holdout", default=None, metavar="SITE[,SITE...]",
                        help="train without SITE and test every model on it too; several: each held out in turn (leave-one-site-out)")
    args, overrides = parser.parse_known_args(list(argv))
    metrics = _metrics(args.metrics)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    holdouts = [h.strip() for h in args.holdout.split(",") if h.strip()] if args.holdout else [None]
    if len(set(holdouts)) != len(holdouts):
        raise UsageError(f"--holdout names a site twice: {args.holdout}")
    out = _out_dir(args.out, "compare", args.config)
    command = ["lightning-fed", "compare", *argv]
    reports = {}
    for holdout in holdouts:
        experiment = _experiment(args, overrides, modes, holdout)
        t0 = time.monotonic()
        with experiment:
            experiment.run_point()
        folder = out if len(holdouts) == 1 else out / f"holdout-{holdout}"
        folder.mkdir(parents=True, exist_ok=True)
        reports[holdout] = write_compare(experiment, folder, metrics, time.monotonic() - t0, command)
    if len(holdouts) == 1:
        return reports[holdouts[0]]
    return write_leave_one_out(reports, out, metrics, command)


def write_leave_one_out(reports: dict[Optional[str], dict[str, Any]], out: Path, metrics: Optional[Sequence[str]], command: list[str]) -> dict[str, Any]:
    """One table per metric: each model at each held-out site (mean ± std over repetitions)."""
    first = next(iter(reports.values()))
    metrics = list(metrics or first["metrics"])
    held = [h for h in reports if h is not None]
    models = [m for m in ("pooled", "local", "federated") if any(m in r["summary"] for r in reports.values())]
    rows = {}
    for model in models:
        for h in held:
            summary = reports[h]["summary"]
            if model == "local":  # no local model of the held-out site: the mean over the other sites' models
                values = {m: [v for name, by_column in summary.items() if name.startswith("local:")
                              for v in (by_column.get(h, {}).get(m) or {}).get("values", [])] for m in metrics}
                rows.setdefault("local (mean of the site models)", {})[h] = {m: _stats(v) for m, v in values.items() if v}
            else:
                rows.setdefault(model, {})[h] = summary.get(model, {}).get(h, {})
    md = [f"# Leave one site out: {', '.join(held)}", "", f"`{shlex.join(command)}`", "",
          "Each column: the models trained without that site, tested on its test data (mean ± std over repetitions)."]
    for metric in metrics:
        md += ["", f"### {metric}", "", "| model | " + " | ".join(f"{h} (held out)" for h in held) + " |", "|---|" + "---|" * len(held)]
        md += [f"| {model} | " + " | ".join(_cell(rows[model].get(h, {}).get(metric)) for h in held) + " |" for model in rows]
    report = {"command": shlex.join(command), "holdouts": held, "metrics": metrics, "rows": rows,
              "folders": {h: f"holdout-{h}" for h in held}}
    (out / "results.md").write_text("\n".join(md) + "\n")
    (out / "results.json").write_text(json.dumps(report, indent=2, default=_jsonable))
    print("\n" + "\n".join(md[4:]))
    print(f"\nleave-one-site-out results written to {out}/results.md (each held-out site's full comparison in holdout-<site>/)")
    return report


def write_compare(experiment: Experiment, out: Path, metrics: Optional[Sequence[str]], wall: float, command: list[str]) -> dict[str, Any]:
    runs = experiment.runs
    metrics = list(metrics or reported_metrics(runs))
    sites = list(dict.fromkeys(c for run in runs for rows in run.evaluations.values() for c in rows if c != MERGED))
    mean_over = experiment.mean_over
    summary = summarize(runs, metrics, mean_over)
    models = model_order(list(summary), sites)
    columns = [*sites, *([mean_label(mean_over)] if mean_over else []), MERGED]
    totals = confusion_totals(runs)
    title = Path(experiment.configs[-1]).stem
    plots = dot_plots(summary, metrics, columns, models, out, title) + heat_maps(summary, metrics, columns, models, out, title)
    cm_models = [m for m in ("pooled", "local", "federated") if m in models]
    cm_plot = confusion_plot(totals, cm_models, [*sites, MERGED], out, experiment.label_names)
    shift = shift_reports(runs, experiment.group_names, sites, out)
    report = {
        "command": shlex.join(command), "recipes": experiment.configs, "overrides": experiment.overrides,
        "modes": list(experiment.modes), "repeats": experiment.repeats,
        "seeds": sorted({r.seed for r in runs}), "sites": sites, "mean_over": mean_over, "columns": columns,
        "models": models, "label_names": experiment.label_names, "summary": summary, "confusion_matrices": totals,
        "metrics": metrics, "holdout": experiment.holdout,
        "runs": [asdict(r) for r in runs], "startup": experiment.startup_report(), "wall_seconds": wall,
        "plots": [p.name for p in [*plots, *([cm_plot] if cm_plot else []), *shift]], "traffic": traffic_summary(runs),
    }
    md = [f"# {title}: {' / '.join(experiment.modes)}", "", f"`{report['command']}`", "",
          f"Every model tested on every site's own test split; mean ± std over {experiment.repeats} repetition(s) "
          f"(seeds {report['seeds']}). Columns: each site's test set"
          + (f", the mean over {', '.join(mean_over)}" if mean_over else "") + ", and all sites' test data merged. "
          "Rows: the pooled model, each site's own local model on its own data, each site's local model on every site, "
          "the federated model."
          + (f" No model trained on {experiment.holdout}'s data: its column is a hospital the models never saw; "
             "'all sites (merged)' covers the sites they trained on." if experiment.holdout else ""),
          "", markdown_tables(summary, metrics, columns, models)]
    if report["traffic"]:
        md += ["", traffic_table(report["traffic"])]
    if totals:
        md += ["", "### Confusion matrices (rows: true class, columns: predicted; summed over repetitions)", "",
               "| model | " + " | ".join(_column_title(c) for c in [*sites, MERGED]) + " |", "|---|" + "---|" * (len(sites) + 1)]
        md += [f"| {_model_title(m)} | " + " | ".join(str(totals[m].get(c, "-")) for c in [*sites, MERGED]) + " |" for m in models if m in totals]
    md += ["", _startup_line(report["startup"], wall)]
    (out / "results.md").write_text("\n".join(md) + "\n")
    (out / "results.json").write_text(json.dumps(report, indent=2, default=_jsonable))
    if experiment.wandb:
        table = {metric: (["model", *[_column_title(c) for c in columns]],
                          [[_model_title(m), *[(summary.get(m, {}).get(c, {}).get(metric) or {}).get("mean") for c in columns]] for m in models])
                 for metric in metrics}
        report["wandb_dir"] = log_to_wandb(experiment.wandb, "compare", table, [*plots, *([cm_plot] if cm_plot else [])], {"command": report["command"]})
        (out / "results.json").write_text(json.dumps(report, indent=2, default=_jsonable))
    print("\n" + "\n".join(md[6:]))
    print(f"\nresults written to {out}/results.md, results.json and {len(report['plots'])} plot(s)")
    return report


def shift_reports(runs: list[Run], groups: Optional[Sequence[str]], sites: Sequence[str], out: Path) -> list[Path]:
    """``shift_<model>.png`` / ``.csv`` for the pooled and federated models: uncertainty (and Dice) per site and
    group, each cell the mean over repetitions (:mod:`lightning_fed.shift`)."""
    if not groups:
        return []
    from lightning_fed.shift import heat_map, shift_rows

    paths: list[Path] = []
    for model in ("pooled", "federated"):
        collected: dict[str, dict[str, list[float]]] = {}
        for run in runs:
            for site, values in run.evaluations.get(model, {}).items():
                for key, value in values.items():
                    if _GROUPED.match(key) and isinstance(value, float) and math.isfinite(value):
                        collected.setdefault(site, {}).setdefault(key, []).append(value)
                if values.get("labels") == "hidden":
                    collected.setdefault(site, {})["labels"] = "hidden"  # type: ignore[assignment]
        rows = {site: {k: (v if k == "labels" else statistics.fmean(v)) for k, v in by_key.items()} for site, by_key in collected.items()}
        table = shift_rows({s: rows[s] for s in sites if s in rows}, groups)
        if table:
            held = f"; {runs[0].holdout} held out" if runs[0].holdout else ""
            paths.append(heat_map(table, groups, out / f"shift_{model}.png",
                                  f"{model} model: uncertainty per site and vendor (mean of {len({r.repeat for r in runs})} runs{held})"))
    return paths


def _startup_line(startup: dict[str, Any], wall: float) -> str:
    line = f"Wall time {wall:.0f} s. Site start-up: {startup['cold_runs']} run(s) with new site processes"
    if startup["cold_mean_seconds"] is not None:
        line += f" ({startup['cold_mean_seconds']:.1f} s each)"
    if startup["warm_runs"]:
        line += f", {startup['warm_runs']} run(s) on warm sites ({startup['warm_mean_seconds']:.1f} s each)"
    if startup.get("estimated_saving_seconds") is not None:
        line += (f"; {startup['worker_processes_reused']} worker process start(s) avoided by reusing warm ones, an estimated "
                 f"{startup['estimated_saving_seconds']:.0f} s saved (measure it exactly with --no-reuse)")
    return line + "."


def sweep(argv: Sequence[str]) -> dict[str, Any]:
    """``lightning-fed sweep``: a grid of recipe overrides × modes × repetitions; one table, one line plot per metric."""
    parser = _common_parser("lightning-fed sweep", "Run a grid of recipe overrides; one table and one line plot per metric.")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="an axis of the grid (repeatable; the grid is their product); KEY may index a list: key[0], key[1:]")
    parser.add_argument("--zip", action="append", default=[], metavar="KEY=V1,V2",
                        help="axes that vary together (same length), crossed with the --grid axes")
    parser.add_argument("--modes", default="federated", help="comma-separated: pooled, local, federated")
    parser.add_argument("--x", default=None, metavar="KEY", help="grid key on the plots' x axis (default: the first --grid key, else the first --zip key)")
    args, overrides = parser.parse_known_args(list(argv))
    metrics = _metrics(args.metrics)
    try:
        points = expand_grid(args.grid, args.zip)
        if args.x is not None:
            if points and args.x not in points[0]:
                raise ValueError(f"--x {args.x!r} is not a grid key; the keys are {list(points[0])}")
            points = [{args.x: p[args.x], **p} for p in points]
    except ValueError as err:
        raise UsageError(str(err)) from None
    if not args.grid and not args.zip:
        raise UsageError("sweep needs at least one --grid KEY=V1,V2 (or --zip) axis (see `lightning-fed sweep --help`)")
    experiment = _experiment(args, overrides, [m.strip() for m in args.modes.split(",") if m.strip()])
    for point in points:  # every override must be valid before hours of training start
        try:
            point_arguments(point, experiment.base_config)
        except ValueError as err:
            raise UsageError(str(err)) from None
    out = _out_dir(args.out, "sweep", args.config)
    t0 = time.monotonic()
    command = ["lightning-fed", "sweep", *argv]
    with experiment:
        for i, point in enumerate(points):
            print(f"[lightning-fed] sweep point {i + 1}/{len(points)}: {point_label(point)}")
            experiment.run_point(point)
            if i + 1 < len(points):  # results so far stay on disk if the sweep is stopped or a later run fails
                write_sweep(experiment, points[: i + 1], out, metrics, time.monotonic() - t0, command, final=False)
    return write_sweep(experiment, points, out, metrics, time.monotonic() - t0, command)


def write_sweep(experiment: Experiment, points: list[dict[str, Any]], out: Path, metrics: Optional[Sequence[str]], wall: float, command: list[str],
                final: bool = True) -> dict[str, Any]:
    keys = list(points[0])
    metrics = list(metrics or reported_metrics(experiment.runs))
    mean_over = experiment.mean_over
    column = mean_label(mean_over) if mean_over else MERGED
    rows = []
    for point in points:
        runs = [r for r in experiment.runs if r.point == point]
        summary = summarize(runs, metrics, mean_over)
        sites = [c for c in runs[0].evaluations[next(iter(runs[0].evaluations))] if c != MERGED]
        for model in model_order(list(summary), sites):
            if model.startswith("local:"):
                continue  # the sweep table keeps pooled / local / federated; compare shows every local model
            rows.append({"point": point, "model": model, "metrics": {m: summary[model].get(column, {}).get(m) for m in metrics},
                         "traffic": traffic_summary(runs) if model == "federated" else {}})
    plots = line_plots(rows, keys, metrics, out, column) + bytes_plots(rows, metrics, out, column)
    title = Path(experiment.configs[-1]).stem
    measured = any(r.get("traffic") for r in rows)
    header = "| " + " | ".join([*map(_short, keys), "model", *metrics, *(["MB sent / site / round"] if measured else [])]) + " |"
    body = ["| " + " | ".join([*[json.dumps(r["point"][k]) for k in keys], _model_title(r["model"]), *[_cell(r["metrics"][m]) for m in metrics],
                               *([_megabytes(r.get("traffic"))] if measured else [])]) + " |" for r in rows]
    report = {
        "command": shlex.join(command), "recipes": experiment.configs, "overrides": experiment.overrides, "grid": keys,
        "points": points, "modes": list(experiment.modes), "repeats": experiment.repeats, "column": column,
        "rows": rows, "runs": [asdict(r) for r in experiment.runs], "startup": experiment.startup_report(), "wall_seconds": wall,
        "plots": [p.name for p in plots],
    }
    md = [f"# {title}: sweep over {', '.join(map(_short, keys))}" + ("" if final else " (in progress)"), "", f"`{report['command']}`", "",
          f"{len(points)} grid point(s) × {len(experiment.modes)} mode(s) × {experiment.repeats} repetition(s); metrics on "
          f"{_column_title(column)} test data, mean ± std over repetitions.", "", header, "|" + "---|" * (len(keys) + 1 + len(metrics) + measured), *body,
          "", _startup_line(report["startup"], wall)]
    _write_atomically(out / "results.md", "\n".join(md) + "\n")
    _write_atomically(out / "results.json", json.dumps(report, indent=2, default=_jsonable))
    if not final:
        return report
    if experiment.wandb:
        table = {"sweep": ([*map(_short, keys), "model", *metrics],
                           [[*[json.dumps(r["point"][k]) for k in keys], r["model"], *[(r["metrics"][m] or {}).get("mean") for m in metrics]] for r in rows])}
        report["wandb_dir"] = log_to_wandb(experiment.wandb, "sweep", table, plots, {"command": report["command"]})
        (out / "results.json").write_text(json.dumps(report, indent=2, default=_jsonable))
    print("\n" + "\n".join(md[6:]))
    print(f"\nresults written to {out}/results.md, results.json and {len(plots)} plot(s)")
    return report


def replot(folder: Path) -> list[Path]:
    """Draw a compare's or sweep's figures again from its ``results.json`` (no training); a leave-one-site-out
    folder has each held-out site's comparison redrawn."""
    report = json.loads((folder / "results.json").read_text())
    if "holdouts" in report:
        return [p for name in report["folders"].values() for p in replot(folder / name)]
    title = Path(report["recipes"][-1]).stem
    if "grid" in report:
        rows = report["rows"]
        metrics = list(dict.fromkeys(m for r in rows for m in r["metrics"]))
        return line_plots(rows, report["grid"], metrics, folder, report["column"]) + bytes_plots(rows, metrics, folder, report["column"])
    summary, columns, models = report["summary"], report["columns"], report["models"]
    known = [m for m in (*METRICS, *SEGMENTATION_METRICS, "loss") if any(m in by_metric for by_column in summary.values() for by_metric in by_column.values())]
    metrics = report.get("metrics") or known
    paths = dot_plots(summary, metrics, columns, models, folder, title) + heat_maps(summary, metrics, columns, models, folder, title)
    totals = report.get("confusion_matrices") or {}
    cm_models = [m for m in ("pooled", "local", "federated") if m in models]
    plot = confusion_plot(totals, cm_models, [*report["sites"], MERGED], folder, report.get("label_names"))
    return paths + ([plot] if plot else [])


def replot_command(argv: Sequence[str]) -> list[Path]:
    """``lightning-fed replot FOLDER...``: redraw the figures of compare/sweep output folders from their results.json."""
    parser = _Parser(prog="lightning-fed replot", description=replot_command.__doc__)
    parser.add_argument("folders", nargs="+", help="folders written by lightning-fed compare or sweep")
    args = parser.parse_args(list(argv))
    paths, skipped = [], []
    for name in args.folders:
        folder = Path(name)
        if not (folder / "results.json").is_file():
            raise UsageError(f"{folder} holds no results.json: give a folder that lightning-fed compare or sweep wrote")
        report = json.loads((folder / "results.json").read_text())
        if not any(key in report for key in ("summary", "grid", "holdouts")):
            skipped.append(str(folder))  # a fit's results: its figures are drawn by the fit itself
            continue
        paths += replot(folder)
    if skipped and not paths:
        raise UsageError(f"{', '.join(skipped)}: results.json is not a compare's or sweep's (a fit's?): give a folder "
                         "that lightning-fed compare or sweep wrote")
    print(f"redrew {len(paths)} figure(s) in {len(args.folders) - len(skipped)} folder(s)"
          + (f"; skipped {len(skipped)} that hold a fit's results ({', '.join(skipped)})" if skipped else ""))
    return paths


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(text)
    partial.replace(path)  # a reader (or a stopped sweep) never sees half a file


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


COMMANDS = {"compare": compare, "sweep": sweep, "replot": replot_command}


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
