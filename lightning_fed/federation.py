"""The driver's side of a running federation: start workers and the coordinator, run ``fit``, evaluate any weights
at every site, bring typed results home, shut everything down.

A :class:`Federation` knows the sites, a frozen :class:`~lightning_fed.config.FederationConfig` and the
:class:`~lightning_fed.site.TrainerJob` the launcher built from the driver's Trainer; it never reads the strategy.
``compare``/``sweep`` use the same public calls (:meth:`Federation.evaluate`, :meth:`Federation.site_weights`).
Its worker processes are :mod:`lightning_fed.pool`'s; its calls to them and to the coordinator go through
:mod:`lightning_fed.calls`: when a site fails, or one of them or the coordinator dies, the run ends with one line saying
what failed and in which round (:mod:`lightning_fed.failures`). In continue mode a failed site is left out and
restarted instead (:mod:`lightning_fed.restarts`).
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import time
import weakref
from typing import Any, Optional, Sequence

import ray
from lightning.pytorch import LightningModule

from lightning_fed.calls import FederationCalls
from lightning_fed.checkpoint import RoundCheckpoint
from lightning_fed.commits import check_resumable
from lightning_fed.config import FederationConfig, Placement
from lightning_fed.coordinator_process import CoordinatorLink
from lightning_fed.data.sites import Site
from lightning_fed.errors import FederationConfigError, SiteFailedError
from lightning_fed.hosting import kill_quietly, site_plans, start_coordinator
from lightning_fed.metric_states import merge_reports
from lightning_fed.metrics import federated_metrics
from lightning_fed.placement import describe_layout
from lightning_fed.pool import WorkerPool, Workers, layout_cpus, resumed_placement
from lightning_fed.privacy_settings import DPSGD, site_privacy
from lightning_fed.restarts import SiteRestarts
from lightning_fed.results import Evaluation, FitResult, SiteEvaluation, SiteFit, SiteReady, Startup, TrafficReport
from lightning_fed.runtime import RayRuntime
from lightning_fed.site import SitePlan, TrainerJob
from lightning_fed.strategies.base import GlobalModel, Weights
from lightning_fed.watch import FitWatch

# where these names have always been imported from
__all__ = ["Federation", "FederationConfigError", "SiteFailedError", "WorkerPool", "evaluation_of", "total_rounds"]

_LIVE: "weakref.WeakSet[Federation]" = weakref.WeakSet()  # this process's federations whose workers are up


class Federation:
    """A running federation: workers hosting the sites, and the coordinator, alive from start until :meth:`shutdown`.

    Args:
        config: the strategy's frozen settings.
        sites: the sites, in order (site ``i`` is seeded with ``config.seed + i``).
        module: the model every site starts from (its weights are round 0's global model).
        job: the driver Trainer's side of the run (settings, callbacks, loggers), replayed at every site.
        stage: ``"fit"``, ``"test"`` or ``"validate"``: what each site sets its data up for.
        runtime: the Ray this federation runs on (started or joined by its owner, who also stops it).
        resume: a complete round checkpoint to continue from (fit only).
        pool: warm workers to take over (and hand back at a clean shutdown).
        source_id: identifies the data the sites came from, so a later ``test`` on the same data reuses them.
    """

    def __init__(
        self,
        config: FederationConfig,
        sites: list[Site],
        module: LightningModule,
        job: TrainerJob,
        stage: str,
        runtime: RayRuntime,
        resume: Optional[RoundCheckpoint] = None,
        pool: Optional[WorkerPool] = None,
        source_id: Optional[int] = None,
    ) -> None:
        self.config = config
        self.sites = sites
        self.names = [s.name for s in sites]
        self.source_id = source_id
        self.pool = pool
        self.runtime = runtime
        self.checkpoint_dir = job.checkpoint_dir  # where this run commits its rounds (named when it fails)
        self._audit: Optional[list[dict[str, Any]]] = [] if config.audit_messages else None
        self._watch: Optional[FitWatch] = None  # while fit runs
        # the workers and the coordinator, and every call to them (the first to fail ends the run)
        self.calls = FederationCalls(
            self.checkpoint_dir,
            self._audit,
            rounds_seen=lambda: self._watch.rounds if self._watch is not None else 0,
            shutdown=lambda: self.shutdown(graceful=False),
        )
        self.ready: dict[str, SiteReady] = {}
        self.plans: dict[str, SitePlan] = {}
        self.out: dict[str, str] = {}  # sites left out for good (continue mode), with the reason
        self.startup: Optional[Startup] = None
        self.alive = False
        t0 = time.monotonic()
        try:
            self._start(module, job, stage, resume)
        except BaseException:
            self.shutdown(graceful=False)
            raise
        self.startup = Startup(
            time.monotonic() - t0, len(self.hosts.specs), describe_layout(self.hosts.specs), self.hosts.warm
        )

    @property
    def hosts(self) -> Workers:
        """The worker processes hosting the sites."""
        return self.calls.hosts

    @property
    def coordinator(self) -> Optional[CoordinatorLink]:
        """The line to this run's coordinator (``None`` before it starts and once the federation is shut down)."""
        return self.calls.coordinator

    @property
    def workers(self) -> list[Any]:
        """The worker actors, one per worker of the layout."""
        return self.hosts.actors

    @property
    def site_nodes(self) -> dict[str, str]:
        """The Ray node each site runs on."""
        return {name: r.node for name, r in self.ready.items()}

    # -- start-up --------------------------------------------------------------------------------
    def _start(self, module: LightningModule, job: TrainerJob, stage: str, resume: Optional[RoundCheckpoint]) -> None:
        privacy = self._check_config()
        server_state = resume.server_state() if resume is not None else None
        if server_state is not None:
            try:  # the coordinator checks it again as it loads the state; refused here, nothing has started yet
                check_resumable(server_state, self.config.aggregator.name, self.names)
            except ValueError as err:
                raise FederationConfigError(str(err)) from None
        placement = resumed_placement(self.config.placement, server_state)
        self._acquire_workers(placement)
        self._start_coordinator(module, job, server_state, resume)
        self._host_sites(module, job, stage, privacy, placement.timeout)

    def _check_config(self) -> dict[str, Optional[DPSGD]]:
        """What the sites and the aggregator cannot run with, refused before anything starts. Returns each site's
        DP-SGD settings."""
        try:
            privacy = site_privacy(self.config.privacy, self.names)
            self.config.aggregator.prepare(list(self.names))  # e.g. secure aggregation's identity keys
        except ValueError as err:
            raise FederationConfigError(str(err)) from None
        return privacy

    def _acquire_workers(self, placement: Placement) -> None:
        """Ray up, earlier federations' idle workers gone, and this run's workers started or taken warm."""
        # a fixed layout gets the CPUs it asks for from a local Ray; the automatic one fits the machine
        self.runtime.ensure(0.0 if placement.automatic else layout_cpus(self.sites, placement))
        for other in list(_LIVE):  # one federation trains at a time: an earlier one's idle workers give way
            other.shutdown()
        self.calls.hosts = Workers.acquire(self.sites, placement, self.runtime, self.pool)

    def _start_coordinator(
        self,
        module: LightningModule,
        job: TrainerJob,
        server_state: Optional[dict[str, Any]],
        resume: Optional[RoundCheckpoint],
    ) -> None:
        """The coordinator, on the driver's node, in a process that never imports Lightning."""
        layout = self.hosts.shared_layout()
        idle = self.pool.coordinators.take() if self.pool is not None else None
        self.calls.coordinator = start_coordinator(
            self.config, self.names, module, job, layout, server_state, resume, idle
        )
        self.alive = True
        _LIVE.add(self)
        atexit.register(self.shutdown)

    def _host_sites(
        self,
        module: LightningModule,
        job: TrainerJob,
        stage: str,
        privacy: dict[str, Optional[DPSGD]],
        placement_timeout: float,
    ) -> None:
        """Every site set up in its worker (module, data, Trainer), its data checked."""
        hosts = self.hosts
        job = dataclasses.replace(job, module_ref=ray.put(module))
        self.plans = site_plans(self.config, self.sites, job, self.coordinator, privacy)
        plans: list[list[SitePlan]] = [[] for _ in hosts.specs]
        for name, plan in self.plans.items():
            plans[hosts.index[name]].append(plan)
        hosts.wait_placed(placement_timeout)
        # a spare takes its place in the layout before it hosts anything
        self.calls.gather_workers(hosts.adopted, "start")
        hosted = self.calls.gather_workers(
            {w: hosts.actors[w].host.remote(plans[w], stage) for w in range(len(hosts.specs))}, "start"
        )
        self.ready = {name: hosted[hosts.index[name]][name] for name in self.names}
        self.calls.markers = {name: r.worker_marker for name, r in self.ready.items()}
        empty = [n for n, r in self.ready.items() if r.train_samples == 0]
        if empty and stage == "fit":
            raise FederationConfigError(
                f"site(s) {empty} have no training samples: give every site data or drop it from the federation"
            )

    # -- running ---------------------------------------------------------------------------------
    def fit(
        self, total_rounds: int, loggers: Sequence[Any] = (), resume: Optional[RoundCheckpoint] = None
    ) -> FitResult:
        """Train every site to the end (rounds agreed through the coordinator); the progress view and the driver's
        loggers follow the federated metrics as they come."""
        watch = self._watch = FitWatch(total_rounds, loggers, self.config.rounds.every, show=self.config.progress)

        def poll() -> None:
            watch.update(self.calls.ask("progress", watch.since))

        t0, started_at = time.monotonic(), time.time()
        self.calls.ask("start_clock")
        behind = set(resume.behind()) if resume is not None else set()
        refs = {}
        for n in self.names:
            part = str(resume.site_paths[n]) if resume is not None and n in resume.site_paths else None
            # a site whose part is older than the round (it was out of it) comes in at the round after
            join = self.calls.ask("entry_point", n) if n in behind else None
            refs[n] = self.hosts.of(n).fit.remote(n, part, join)
        try:
            if self.config.reliability.tolerant:
                sites: dict[str, SiteFit] = SiteRestarts(self.calls, self.plans, self.out).gather(refs, on_poll=poll)
            else:
                sites = self.calls.gather(refs, "fit", on_poll=poll)
            poll()
        finally:
            watch.close()
        final = self.calls.ask("final_global")
        global_model = ray.get(final[0]) if final else None
        assert self.startup is not None
        return watch.result(
            sites,
            global_model,
            TrafficReport.from_ledger(self.calls.ask("traffic")),
            self.startup,
            time.monotonic() - t0,
            started_at,
        )

    def evaluate(self, stage: str, weights: Weights, exact: bool = False) -> Evaluation:
        """``test``/``validate`` the model with ``weights`` at every site on its own data, and merged over all.

        The weights go through each site's algorithm half (e.g. FedBN keeps the site's own normalisation layers);
        ``exact`` loads every tensor as given instead (to test a model trained elsewhere, e.g. another site's local
        model, on every site's data)."""
        ref = ray.put(GlobalModel(weights=weights, round=-1))
        names = [n for n in self.names if n not in self.out]  # a site out for good has nothing to test with
        evaluation = evaluation_of(
            stage, self.calls.gather({n: self.hosts.of(n).evaluate.remote(n, stage, ref, exact) for n in names}, stage)
        )
        evaluation.notes.extend(
            f"site {name!r} not evaluated: it stayed out of the federation ({reason})"
            for name, reason in self.out.items()
        )
        return evaluation

    def audit(self) -> dict[str, list[dict[str, Any]]]:
        """Structure (never values) of every message sites sent the coordinator and every result they returned
        to the driver; needs ``FederatedStrategy(audit_messages=True)`` and a live federation."""
        if self._audit is None:
            raise FederationConfigError(
                "message audit is off: create the strategy with FederatedStrategy(audit_messages=True)"
            )
        return {"coordinator": ray.get(self.coordinator.remote("audit_log")), "driver": list(self._audit)}

    def site_weights(self) -> dict[str, Weights]:
        """Every site's current weights, by site name (sites left out for good excepted)."""
        return self.calls.gather(
            {n: self.hosts.of(n).weights.remote(n) for n in self.names if n not in self.out}, "weights"
        )

    # -- shutdown --------------------------------------------------------------------------------
    def shutdown(self, graceful: bool = True, reuse: bool = True) -> None:
        """Finish site loggers and end every worker this federation started (or hand them back to the pool warm
        when everything closed cleanly). Ray stays up for its owner to stop."""
        try:
            atexit.unregister(self.shutdown)
        except Exception:
            pass
        _LIVE.discard(self)
        if not ray.is_initialized():
            self.alive = False
            return
        if not graceful:  # first: sites waiting on it then stop at once, and their workers may serve again
            self._end_coordinator()
        self.hosts.finish(self.pool, graceful=graceful and self.alive, reuse=reuse and self.alive)
        self._end_coordinator()
        self.calls.hosts, self.alive = Workers.none(), False

    def _end_coordinator(self) -> None:
        """End the run in its coordinator: the pool keeps the process for the next run, else it ends."""
        link, self.calls.coordinator = self.calls.coordinator, None
        if link is None:
            return
        if self.pool is not None:
            self.pool.coordinators.keep(link)
        else:
            kill_quietly(link.actor)


def evaluation_of(stage: str, sites: dict[str, SiteEvaluation]) -> Evaluation:
    """Site evaluations and their merge: the metrics of every site's predictions pooled (states summed)."""
    merged = merge_reports({n: r.report() for n, r in sites.items()})
    notes = sorted({r.note for r in sites.values() if r.note})
    hidden = sorted(name for name, r in sites.items() if r.hidden_labels)
    if hidden:
        notes.append(
            f"sites without labels ({', '.join(hidden)}): their label-based metrics come from labels they never "
            "trained on (a simulation's hidden labels), and count in the federated values"
        )
    # each site's own model of a kind, tested at that site, merged like the global model's (every site has one)
    kinds = set.intersection(*(set(r.personal) for r in sites.values())) if sites else set()
    personal = {kind: evaluation_of(stage, {n: r.personal[kind] for n, r in sites.items()}) for kind in sorted(kinds)}
    return Evaluation(
        stage=stage,
        sites=sites,
        federated=federated_metrics(merged, "test" if stage == "test" else "val"),
        notes=notes,
        personal=personal,
    )


def total_rounds(max_epochs: Optional[int], sync_every: int) -> int:
    """Rounds a fit of ``max_epochs`` makes (the last one partial when ``max_epochs`` is not a multiple)."""
    return math.ceil(max_epochs / sync_every) if max_epochs and max_epochs > 0 else 0
