"""Training and testing for ``compare``/``sweep``: an :class:`Experiment` trains a recipe under each mode
(``pooled``, ``local``, ``federated``), repetition and grid point, tests every model it trained on every site's test
set, and keeps one :class:`Run` per trained mode.

The sites' worker processes stay warm between runs of one layout (:class:`~lightning_fed.federation.WorkerPool`);
:meth:`Experiment.startup_report` says what that saved. Only the public API of
:class:`~lightning_fed.strategy.FederatedStrategy` is used.
"""

from __future__ import annotations

import os
import re
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, TypedDict

from lightning_fed.experiments.grid import Point, lookup, point_arguments, point_label
from lightning_fed.experiments.wandb_log import wandb_settings

if TYPE_CHECKING:
    from lightning_fed.pool import WorkerPool

METRICS = ("accuracy", "precision", "recall", "auroc")
SEGMENTATION_METRICS = ("dice", "mutual_information", "entropy")
GROUPED = re.compile(r"^(dice|entropy|aleatoric|mutual_information)_[a-z0-9_]+$")  # per group (vendor) values
MODES = ("pooled", "local", "federated")
MERGED = "federated"  # the column of every site's test data together (metric states merged)
# the sites' own models of a federated run (each tested at its own site), as compare names them
OWN_MODELS = {
    "personal": "federated (personal)",
    "fine_tuned": "fine-tuned",
    "deployed": "deployed",
    "local": "local (deployment baseline)",
}

Row = dict[str, Any]  # metric -> value (a float, a confusion matrix, per-class lists, "hidden" labels, ...)
Evaluations = dict[str, dict[str, Row]]  # model -> column (site | "federated") -> metrics


class StartupReport(TypedDict, total=False):
    """Start-up of the runs that started new site processes (cold) and of those on warm ones."""

    cold_runs: int
    warm_runs: int
    cold_mean_seconds: Optional[float]
    warm_mean_seconds: Optional[float]
    worker_processes_started: Optional[int]
    worker_processes_reused: Optional[int]
    estimated_saving_seconds: float  # only when processes were reused


@dataclass
class Run:
    """One trained mode of one repetition (of one grid point) and every evaluation of its models."""

    point: Point
    repeat: int
    seed: int
    mode: str
    evaluations: Evaluations
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
    pool: Optional["WorkerPool"] = None  # warm workers shared with other experiments (left open); None: its own
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

        strategy = base.trainer.strategy
        if not isinstance(strategy, FederatedStrategy):
            raise ValueError("compare/sweep need a recipe whose trainer.strategy is lightning_fed.FederatedStrategy")
        self.base_config: dict[str, Any] = base.config.as_dict()
        self.mean_over: Optional[list[str]] = (self.base_config.get("results") or {}).get("mean_over")
        seed = self.base_config.get("seed_everything")
        self.base_seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0
        try:
            data_seed = lookup(self.base_config, "data.init_args.seed")
        except KeyError:
            data_seed = None
        self.base_data_seed = data_seed if isinstance(data_seed, int) else None
        self.label_names = _label_names(base.model, base.datamodule)
        self.group_names: Optional[tuple[str, ...]] = tuple(getattr(base.datamodule, "group_names", None) or ()) or None
        self.wandb = wandb_settings(base.trainer.loggers)
        self._cluster = strategy.config.cluster
        self._placement = strategy.config.placement
        self._sites = strategy.sites(base.datamodule, base.model)
        if self.holdout is not None:
            from lightning_fed.data.pooled import HeldOutSites

            HeldOutSites(base.datamodule, self.holdout).federated_sites()  # checked before any training
        self._layouts: dict[str, Any] = {}
        from lightning_fed.federation import WorkerPool

        self._owns_pool = self.pool is None and self.reuse_sites
        if self._owns_pool:
            self.pool = WorkerPool()
        elif not self.reuse_sites:
            self.pool = None
        # a shared pool has counted earlier experiments' workers: this one reports its own
        self._pool_counts = (self.pool.started, self.pool.reused) if self.pool is not None else (0, 0)
        self._runtime: Any = None

    def _cli(self, extra: list[str]) -> Any:
        from lightning_fed.lightning_cli import FederatedCLI

        args = [a for c in self.configs for a in ("--config", c)] + list(self.overrides) + list(extra)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
            return FederatedCLI(
                args=args, run=False, save_config_callback=None, parser_kwargs={"prog": "lightning-fed"}
            )

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
        self._layouts = {
            "sites": sites,
            "pooled": Placement(workers=1, worker_cpus=pooled_cpus, timeout=self._placement.timeout),
        }
        return sum(spec.num_cpus for spec in specs) + ("pooled" in self.modes) * pooled_cpus

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> "Experiment":
        import ray

        from lightning_fed.runtime import RayRuntime, local_ray_started

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
        """End the warm workers (its own pool's) and the Ray session the experiment started."""
        if self.pool is not None and self._owns_pool:
            self.pool.close()
        if self._runtime is not None:
            self._runtime.shutdown()
            self._runtime = None

    # -- running -----------------------------------------------------------------------------------
    def run_point(self, point: Optional[Point] = None, say: Callable[[str], Any] = print) -> list[Run]:
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
                say(
                    f"[lightning-fed] {point_label(point)} | repeat {repeat + 1}/{self.repeats} | {mode}: "
                    f"{time.monotonic() - t0:.1f}s (start-up {run.startup_seconds:.1f}s{', warm sites' if run.warm else ''}) | "
                    + _brief(run, self.mean_over)
                )
        return runs

    def _run_mode(self, mode: str, extra: list[str], point: Point, repeat: int, seed: int) -> Run:
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
        if mode != "federated":  # nothing is exchanged (no secure aggregation), and nothing follows the training
            strategy.reconfigure(aggregator=Local(), fine_tuning=None, deployment=None)
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
                evaluation = federation.evaluate("test", global_weights)
                evaluations = {"federated": evaluation_rows_of(evaluation)}
                for kind, own in evaluation.personal.items():  # each site's own model, at its own site
                    evaluations[OWN_MODELS.get(kind, f"federated ({kind})")] = evaluation_rows_of(own)
                tested = {"federated": global_weights}
            elif mode == "local":
                tested = federation.site_weights()
                raw = {name: federation.evaluate("test", state, exact=True) for name, state in tested.items()}
                evaluations = {f"local:{name}": evaluation_rows_of(r) for name, r in raw.items()}
                evaluations["local"] = evaluation_rows_of(
                    evaluation_of("test", {name: raw[name].sites[name] for name in raw})
                )
                tested = {f"local:{name}": weights for name, weights in tested.items()}
            else:
                pooled_weights = federation.site_weights()[POOLED]
                load_weights(model, pooled_weights)
                federation, seconds = self._test_federation(
                    strategy, trainer, model, train_data
                )  # at every site it pooled
                startup += seconds
                evaluations = {"pooled": evaluation_rows_of(federation.evaluate("test", pooled_weights, exact=True))}
                tested = {"pooled": pooled_weights}
            if self.holdout is not None and tested:  # every model at the site none of them trained on
                federation, seconds = self._test_federation(strategy, trainer, model, datamodule, only=self.holdout)
                startup += seconds
                for label, weights in tested.items():
                    evaluations[label][self.holdout] = evaluation_rows_of(
                        federation.evaluate("test", weights, exact=True)
                    )[self.holdout]
        finally:
            strategy.shutdown()
        warm = self.pool is not None and self.pool.started == started_before  # no new worker process in this run
        return Run(
            point=point,
            repeat=repeat,
            seed=seed,
            mode=mode,
            evaluations=evaluations,
            fit_seconds=float(fit.fit_seconds),
            startup_seconds=float(startup),
            warm=warm,
            note=note,
            holdout=self.holdout,
            traffic=traffic_of(fit) if mode == "federated" else None,
        )

    def _test_federation(
        self, strategy: Any, trainer: Any, model: Any, datamodule: Any, only: Optional[str] = None
    ) -> tuple[Any, float]:
        """A test-only federation of the recipe's sites (or of ``only``) on the sites' workers, and its start-up time."""
        strategy.reconfigure(placement=self._layouts["sites"])
        sites = strategy.sites(datamodule, model, splits=("test",))
        if only is not None:
            sites = [s for s in sites if s.name == only]
        federation = strategy.start_federation(trainer, model, sites, "test", source_id=id(datamodule))
        return federation, federation.startup.seconds

    # -- reporting ---------------------------------------------------------------------------------
    def startup_report(self) -> StartupReport:
        """Start-up (federations of a run: fit, and the pooled model's test) of runs that started new site processes
        vs runs that ran entirely on warm ones."""
        cold = [r.startup_seconds for r in self.runs if not r.warm]
        warm = [r.startup_seconds for r in self.runs if r.warm]
        report: StartupReport = {
            "cold_runs": len(cold),
            "warm_runs": len(warm),
            "cold_mean_seconds": statistics.fmean(cold) if cold else None,
            "warm_mean_seconds": statistics.fmean(warm) if warm else None,
            "worker_processes_started": self.pool.started - self._pool_counts[0] if self.pool is not None else None,
            "worker_processes_reused": self.pool.reused - self._pool_counts[1] if self.pool is not None else None,
        }
        started, reused = report["worker_processes_started"], report["worker_processes_reused"]
        if cold and reused and started:
            # what each new site process cost on average, times the processes reused, minus what resets cost
            report["estimated_saving_seconds"] = sum(cold) / started * reused - sum(warm)
        return report


def evaluation_rows_of(evaluation: Any) -> dict[str, Row]:
    """An :class:`~lightning_fed.results.Evaluation`'s rows, with the figures compare reports."""
    keep = (
        *METRICS,
        *SEGMENTATION_METRICS,
        "aleatoric",
        "loss",
        "confusion_matrix",
        "auroc_per_label",
        "dice_per_class",
        "labels",
    )
    return {
        column: {k: v for k, v in row.items() if k in keep or GROUPED.match(k)}
        for column, row in evaluation.rows().items()
    }


def traffic_of(fit: Any) -> Optional[dict[str, float]]:
    """Mean bytes one site sent, received, and sent as its update, per round of a federated fit."""
    if fit.traffic is None or not fit.traffic.rounds:
        return None
    sent, received = fit.traffic.per_site_round()
    return {"sent": sent, "received": received, "update": fit.traffic.update_per_site_round()}


def reported_metrics(runs: Sequence[Run]) -> tuple[str, ...]:
    """The metrics a compare reports by default: Dice and uncertainty for segmentation, else classification's."""
    rows = [row for run in runs for table in run.evaluations.values() for row in table.values()]
    return SEGMENTATION_METRICS if any("dice" in r or "mutual_information" in r for r in rows) else METRICS


def column_values(rows: dict[str, Row], mean_over: Optional[Sequence[str]]) -> Row:
    """One model's values in its summary column: all sites merged, or the mean over the ``mean_over`` sites."""
    if not mean_over:
        return rows.get(MERGED, {})
    return {
        m: statistics.fmean(rows[s][m] for s in mean_over)
        for m in (*METRICS, *SEGMENTATION_METRICS)
        if all(isinstance(rows.get(s, {}).get(m), float) for s in mean_over)
    }


def _brief(run: Run, mean_over: Optional[Sequence[str]]) -> str:
    label = "local" if run.mode == "local" else run.mode
    rows = run.evaluations.get(label, {})
    column = f"mean over {len(mean_over)} sites" if mean_over else "all sites"
    values = column_values(rows, mean_over)
    shown = "  ".join(
        f"{m}={values[m]:.3f}" for m in (*METRICS, *SEGMENTATION_METRICS) if isinstance(values.get(m), float)
    )
    return f"{column}: {shown}"
