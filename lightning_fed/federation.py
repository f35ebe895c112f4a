"""The driver's side of a running federation: start workers and the coordinator, run ``fit``, evaluate any weights
at every site, bring typed results home, shut everything down.

A :class:`Federation` knows the sites, a frozen :class:`~lightning_fed.config.FederationConfig` and the
:class:`~lightning_fed.site.TrainerJob` the launcher built from the driver's Trainer; it never reads the strategy.
``compare``/``sweep`` use the same public calls (:meth:`Federation.evaluate`, :meth:`Federation.site_weights`).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import math
import os
import time
import weakref
from typing import Any, Callable, Optional, Sequence

import ray
from lightning.pytorch import LightningModule
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from lightning_fed import COORDINATOR_ROLE_ENV
from lightning_fed.audit import describe
from lightning_fed.checkpoint import RoundCheckpoint, find_checkpoint
from lightning_fed.config import FederationConfig, Placement
from lightning_fed.coordinator import FAILURES_BEFORE_OUT, RemoteCoordinator
from lightning_fed.data.sites import Site
from lightning_fed.loggers import log_driver_metrics
from lightning_fed.metric_states import merge_reports
from lightning_fed.metrics import federated_metrics
from lightning_fed.placement import WorkerSpec, describe_layout, place_sites
from lightning_fed.privacy import site_privacy
from lightning_fed.progress import FederatedProgress
from lightning_fed.results import (Evaluation, FitResult, PrivacyReport, SiteEvaluation, SiteEvent, SiteFit, SiteReady, Startup,
                                   TrafficReport)
from lightning_fed.runtime import RayRuntime
from lightning_fed.site import SitePlan, TrainerJob
from lightning_fed.strategies.base import GlobalModel, Weights
from lightning_fed.strategies.site import state_to_numpy
from lightning_fed.worker import SPARE_CONCURRENCY, RemoteWorker, SiteStartError, read_marker

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often the driver refreshes the progress view while sites train
_LIVE: "weakref.WeakSet[Federation]" = weakref.WeakSet()  # this process's federations whose workers are up


def _first_line(err: BaseException) -> str:
    """``Type: first line of the message`` of what a site raised (Ray's wrapper unwrapped)."""
    cause = getattr(err, "cause", None) or err
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


class SiteFailedError(RuntimeError):
    """A site raised or died; the federation was stopped and every worker torn down. ``checkpoint_dir``: where its
    committed rounds are (``fit(ckpt_path=...)`` resumes from there), set once the launcher knows it."""

    checkpoint_dir: Optional[str] = None


class FederationConfigError(ValueError):
    """The federation cannot start as configured (sites, resources, checkpoint); nothing was trained."""


def _fmt_resources(resources: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(resources.items()) if not k.startswith(("node:", "object_store", "memory")))


def _sum_bundles(bundles: Sequence[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            total[key] = total.get(key, 0.0) + value
    return total


class WorkerPool:
    """Workers kept warm between runs that use the same layout (how many workers, their resources and site counts).

    A new run of that layout hands the idle workers its own sites (new module, data, Trainer, coordinator) instead
    of starting new processes, which saves each worker its start and its torch/Lightning imports. Only workers of
    runs that ended cleanly come back; a failed run's workers are always killed. Call :meth:`close` at the end.
    """

    def __init__(self) -> None:
        self._idle: dict[tuple, tuple[Any, list[Any], list[WorkerSpec]]] = {}
        self.started = 0  # worker processes started for runs using this pool
        self.reused = 0  # workers handed to a later run instead

    @staticmethod
    def layout(specs: Sequence[WorkerSpec]) -> tuple:
        return tuple((spec.shape(), len(spec.sites)) for spec in specs)

    def take(self, specs: Sequence[WorkerSpec]) -> Optional[tuple[Any, list[Any]]]:
        warm = self._idle.pop(self.layout(specs), None)
        if warm is None:
            return None
        self.reused += len(warm[1])
        return warm[0], warm[1]

    def give(self, specs: Sequence[WorkerSpec], pg: Any, workers: list[Any]) -> None:
        old = self._idle.pop(self.layout(specs), None)
        if old is not None:
            _kill(old[0], old[1])
        self._idle[self.layout(specs)] = (pg, workers, list(specs))

    def make_room(self, bundles: Sequence[dict[str, float]]) -> None:
        """Free idle layouts when the cluster could not otherwise place ``bundles``."""
        free = ray.available_resources()
        if self._idle and any(free.get(k, 0.0) + 1e-9 < v for k, v in _sum_bundles(bundles).items()):
            self.close()

    def close(self) -> None:
        """End every idle worker and its placement group."""
        for pg, workers, _ in self._idle.values():
            _kill(pg, workers)
        self._idle.clear()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _kill(pg: Any, actors: Sequence[Any]) -> None:
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:
            pass
    if pg is not None:
        try:
            remove_placement_group(pg)
        except Exception:
            pass


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

    def __init__(self, config: FederationConfig, sites: list[Site], module: LightningModule, job: TrainerJob, stage: str,
                 runtime: RayRuntime, resume: Optional[RoundCheckpoint] = None, pool: Optional[WorkerPool] = None,
                 source_id: Optional[int] = None) -> None:
        self.config = config
        self.sites = sites
        self.names = [s.name for s in sites]
        self.source_id = source_id
        self.pool = pool
        self.runtime = runtime
        self._audit: Optional[list[dict[str, Any]]] = [] if config.audit_messages else None
        self.specs: list[WorkerSpec] = []
        self.workers: list[Any] = []
        self.worker_of: dict[str, int] = {}  # site -> index into self.workers
        self.coordinator: Any = None
        self.pg: Any = None
        self.ready: dict[str, SiteReady] = {}
        self.plans: dict[str, SitePlan] = {}
        self.out: dict[str, str] = {}  # sites left out for good (continue mode), with the reason
        self.startup: Optional[Startup] = None
        self.alive = False
        t0 = time.monotonic()
        try:
            warm = self._start(module, job, stage, resume)
        except BaseException:
            self.shutdown(graceful=False)
            raise
        self.startup = Startup(time.monotonic() - t0, len(self.specs), describe_layout(self.specs), warm)

    @property
    def site_nodes(self) -> dict[str, str]:
        """The Ray node each site runs on."""
        return {name: r.node for name, r in self.ready.items()}

    # -- start-up --------------------------------------------------------------------------------
    def _start(self, module: LightningModule, job: TrainerJob, stage: str, resume: Optional[RoundCheckpoint]) -> bool:
        try:
            privacy = site_privacy(self.config.privacy, self.names)
        except ValueError as err:
            raise FederationConfigError(str(err)) from None
        try:
            self.config.aggregator.prepare(list(self.names))  # e.g. secure aggregation's identity keys
        except ValueError as err:
            raise FederationConfigError(str(err)) from None
        server_state = resume.server_state() if resume is not None else None
        placement = self.config.placement
        if placement.automatic and server_state is not None and server_state.get("layout"):
            # the layout the checkpoint was trained with: the same threads per site give the same floats
            placement = dataclasses.replace(placement, **server_state["layout"])
        # a fixed layout gets the CPUs it asks for from a local Ray; the automatic one fits the machine
        self.runtime.ensure(0.0 if placement.automatic else layout_cpus(self.sites, placement))
        for other in list(_LIVE):  # one federation trains at a time: an earlier one's idle workers give way
            other.shutdown()
        self.specs = self._place(placement)
        self._check_resources()
        bundles = [spec.bundle() for spec in self.specs]
        warm = self.pool.take(self.specs) if self.pool is not None else None
        adopted: dict[int, Any] = {}
        if warm is None:
            if self.pool is not None:
                self.pool.make_room(bundles)
            self.pg = placement_group(bundles, strategy="PACK")
            self.workers, adopted = self._start_workers(self.runtime.take_spare())
            if self.pool is not None:
                self.pool.started += len(self.workers)
        else:
            self.pg, self.workers = warm
        self.worker_of = {name: spec.index for spec in self.specs for name in spec.sites}
        self.coordinator = RemoteCoordinator.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True),
            runtime_env={"env_vars": {COORDINATOR_ROLE_ENV: "coordinator"}},  # never imports torch or Lightning
        ).remote(
            self.config.aggregator,
            self.names,
            job.checkpoint_dir,
            self.config.checkpointing.keep,
            self.config.reliability.barrier_timeout,
            server_state,
            GlobalModel(weights=state_to_numpy(module.state_dict()), round=0) if resume is None else None,
            audit=self.config.audit_messages,
            layout=self._shared_layout(),
            max_update_norm_ratio=self.config.reliability.max_update_norm_ratio,
            tolerant=self.config.reliability.tolerant,
            min_sites=self.config.reliability.min_sites or 1,
            round_timeout=self.config.reliability.round_timeout,
            sync_every=self.config.sync_every,
            parts=resume.parts() if resume is not None else None,
        )
        job = dataclasses.replace(job, module_ref=ray.put(module))
        plans: list[list[SitePlan]] = [[] for _ in self.specs]
        for index, site in enumerate(self.sites):
            self.plans[site.name] = SitePlan(
                site=site, index=index, seed=self.config.seed, job=job, coordinator=self.coordinator,
                algorithm=self.config.aggregator.site_algorithm(), privacy=privacy[site.name],
            )
            plans[self.worker_of[site.name]].append(self.plans[site.name])
        self.alive = True
        _LIVE.add(self)
        atexit.register(self.shutdown)
        if warm is None:
            try:
                ray.get(self.pg.ready(), timeout=placement.timeout)
            except GetTimeoutError:
                raise FederationConfigError(
                    f"the cluster could not place {describe_layout(self.specs)} within {placement.timeout:.0f}s "
                    f"(available: {_fmt_resources(ray.available_resources())}): free resources, or lower the sites' "
                    "num_cpus/num_gpus or the placement's workers"
                ) from None
        self._gather_workers(adopted, "start")  # a spare takes its place in the layout before it hosts anything
        hosted = self._gather_workers({w: self.workers[w].host.remote(plans[w], stage) for w in range(len(self.specs))}, "start")
        self.ready = {name: hosted[self.worker_of[name]][name] for name in self.names}
        empty = [n for n, r in self.ready.items() if r.train_samples == 0]
        if empty and stage == "fit":
            raise FederationConfigError(f"site(s) {empty} have no training samples: give every site data or drop it from the federation")
        return warm is not None

    def _start_workers(self, spare: Any) -> tuple[list[Any], dict[int, Any]]:
        """One worker per spec; a spare (started before the layout was known) stands in for the first CPU worker
        it can serve, and its bundle stays reserved for it. Returns the workers and the spare's adoption call."""
        workers: list[Any] = []
        adopted: dict[int, Any] = {}
        for spec in self.specs:
            if spare is not None and not spec.num_gpus and not spec.resources and len(spec.sites) + 3 <= SPARE_CONCURRENCY:
                workers.append(spare)
                adopted[spec.index] = spare.adopt.remote(spec.index, spec.threads)
                spare = None
                continue
            workers.append(self._new_worker(spec))
        if spare is not None:
            _kill(None, [spare])  # no worker it could serve
        return workers, adopted

    def _new_worker(self, spec: WorkerSpec) -> Any:
        return RemoteWorker.options(
            num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, resources=dict(spec.resources) or None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=spec.index),
            max_concurrency=len(spec.sites) + 3,  # one thread per hosted site's call, plus control calls
        ).remote(spec.index, spec.threads, spec.num_gpus)

    def _place(self, placement: Placement) -> list[WorkerSpec]:
        # sized to the cluster, not to what happens to be free this instant (Ray reports that late, and a previous
        # run's workers may still be letting go): the same cluster gives the same layout, so the same floats
        total = ray.cluster_resources()
        return place_sites(self.sites, placement, total.get("CPU", 0.0), total.get("GPU", 0.0))

    def _shared_layout(self) -> Optional[dict[str, Any]]:
        """The pool of workers the unpinned sites share, as :class:`Placement` fields (recorded in checkpoints)."""
        shared = [spec for spec in self.specs if not spec.resources]
        return {"workers": len(shared), "worker_cpus": shared[0].num_cpus} if shared else None

    def _check_resources(self) -> None:
        total = ray.cluster_resources()
        needs = _sum_bundles([spec.bundle() for spec in self.specs])
        # a missing node resource says more than a CPU shortfall it may cause
        for key, value in sorted(needs.items(), key=lambda kv: kv[0] in ("CPU", "GPU", "memory")):
            if total.get(key, 0.0) + 1e-9 < value:
                users = [name for spec in self.specs if spec.bundle().get(key) for name in spec.sites]
                hint = (
                    f"start the node holding that data with --resources '{{\"{key}\": 1}}'"
                    if key not in ("CPU", "GPU", "memory")
                    else "lower the sites' num_cpus/num_gpus, pack more sites per worker, or add nodes"
                )
                raise FederationConfigError(f"sites {users} need {value:g} {key} but the Ray cluster has {total.get(key, 0.0):g}: {hint}")

    # -- waiting on sites ------------------------------------------------------------------------
    def _gather_workers(self, refs: dict[int, Any], what: str) -> dict[int, Any]:
        """One call per worker (each covering its sites); failures name the site."""
        return self._wait({w: (ref, list(self.specs[w].sites)) for w, ref in refs.items()}, what)

    def _gather(self, refs: dict[str, Any], what: str, on_poll: Optional[Callable[[], None]] = None) -> dict[str, Any]:
        """One call per site; the first failure stops the federation and raises with the site's name."""
        return self._wait({name: (ref, [name]) for name, ref in refs.items()}, what, on_poll)

    def _wait(self, calls: dict[Any, tuple[Any, list[str]]], what: str, on_poll: Optional[Callable[[], None]] = None) -> dict[Any, Any]:
        by_ref = {ref: key for key, (ref, _) in calls.items()}
        pending, results = list(by_ref), {}
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=POLL_SECONDS)
            for ref in done:
                key = by_ref[ref]
                try:
                    results[key] = ray.get(ref)
                except (RayTaskError, RayActorError) as err:
                    self._fail(calls[key][1], err, what)
                if self._audit is not None:
                    self._audit.append({"method": what, "site": key if isinstance(key, str) else calls[key][1],
                                        "payload": describe([results[key]])})
            if on_poll is not None:
                on_poll()
        return {key: results[key] for key in calls}  # call order (site order), not completion order

    def _fail(self, sites: list[str], err: Exception, what: str) -> None:
        # a site that raised reports why to the coordinator (it may still be on its way); a dead one cannot
        reason = self._coordinator_reason(wait=not isinstance(err, RayActorError))
        if reason is None:
            cause = getattr(err, "cause", None)
            if isinstance(cause, SiteStartError):
                reason = str(cause)
            elif isinstance(err, RayActorError):
                reason = self._death_reason(sites, what, err)
            else:
                reason = f"site {sites[0]!r} failed during {what}: {_first_line(err)}"
            if self.coordinator is not None:
                self.coordinator.abort.remote(reason)
        self.shutdown(graceful=False)
        raise SiteFailedError(reason) from None

    def _coordinator_reason(self, wait: bool = True) -> Optional[str]:
        """The site's own one-line report, if it reached the coordinator (it may be in flight: wait briefly)."""
        if self.coordinator is None:
            return None
        deadline = time.monotonic() + (2.0 if wait else 0.0)
        while True:
            try:
                reason = ray.get(self.coordinator.abort_reason.remote(), timeout=2)
            except Exception:
                return None
            if reason is not None or time.monotonic() >= deadline:
                return reason
            time.sleep(0.1)

    def _death_reason(self, sites: list[str], what: str, err: RayActorError) -> str:
        worker = self.worker_of.get(sites[0])
        hosted = list(self.specs[worker].sites) if worker is not None else sites
        if err.actor_init_failed:
            # Ray keeps the creation error only as text: its last line is "ExceptionType: message"
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            return f"site {sites[0]!r} failed to start: {lines[-1] if lines else err}"
        # the site that held the worker's compute thread, as the worker noted it on its node, is the cause
        ready = self.ready.get(hosted[0])
        computing = read_marker(ready.worker_marker) if ready is not None and ready.worker_marker else None
        suspects = [computing] if computing in hosted else hosted
        others = [s for s in hosted if s not in suspects]
        also = f" (its worker also hosted {others})" if others else ""
        who = f"site {suspects[0]!r}" if len(suspects) == 1 else f"sites {suspects} (one worker)"
        return f"{who} died during {what}: its worker process exited (killed, out of memory, or a native crash){also}"

    # -- running ---------------------------------------------------------------------------------
    def fit(self, total_rounds: int, loggers: Sequence[Any] = (), resume: Optional[RoundCheckpoint] = None) -> FitResult:
        """Train every site to the end (rounds agreed through the coordinator); the progress view and the driver's
        loggers follow the federated metrics as they come."""
        progress = FederatedProgress(total_rounds, enabled=self.config.progress)
        state: dict[str, Any] = {"since": 0, "fl": {}, "snapshot": None}

        def poll() -> None:
            snap = ray.get(self.coordinator.progress.remote(state["since"]))
            state["since"] = snap["history_len"]
            state["snapshot"] = snap
            rounds, reported, traffic = snap.get("round_sites", []), snap.get("round_metrics", []), snap.get("traffic", {})
            for number in range(state.get("rounds_logged", 0), len(rounds)):  # each round once aggregated
                index = int(snap["round"]) - len(rounds) + number  # the round's number - 1 (a resumed run starts later)
                figures = {f"fl/{k}": v for k, v in (reported[number] if number < len(reported) else {}).items()}
                figures["fl/sites_in_round"] = float(len(rounds[number]))
                # bytes per round: complete the moment the round is aggregated (lightning_fed.traffic)
                crossed = {s: (v["sent"][index], v["received"][index]) for s, v in traffic.items() if index < len(v["sent"])}
                for s, (sent, received) in crossed.items():
                    figures[f"site/{s}/bytes_sent"], figures[f"site/{s}/bytes_received"] = float(sent), float(received)
                figures["fl/bytes_sent"] = float(sum(v[0] for v in crossed.values()))
                figures["fl/bytes_received"] = float(sum(v[1] for v in crossed.values()))
                log_driver_metrics(list(loggers), figures, step=(index + 1) * self.config.sync_every - 1)  # the round's last epoch
            state["rounds_logged"] = len(rounds)
            for entry in snap["history"]:
                fl = federated_metrics(entry["merged"], entry["stage"])
                state["fl"].update(fl)
                site_scalars = {}
                for site, values in entry["sites"].items():
                    for key, value in values.items():
                        site_scalars[key if key.startswith("site/") else f"site/{site}/{key}"] = value
                log_driver_metrics(list(loggers), {**fl, **site_scalars}, step=entry["epoch"])
            progress.update(snap, state["fl"])

        t0, started_at = time.monotonic(), time.time()
        ray.get(self.coordinator.start_clock.remote())
        behind = set(resume.behind()) if resume is not None else set()
        refs = {}
        for n in self.names:
            part = str(resume.site_paths[n]) if resume is not None and n in resume.site_paths else None
            # a site whose part is older than the round (it was out of it) comes in at the round after
            join = ray.get(self.coordinator.entry_point.remote(n)) if n in behind else None
            refs[n] = self.workers[self.worker_of[n]].fit.remote(n, part, join)
        try:
            if self.config.reliability.tolerant:
                sites: dict[str, SiteFit] = self._gather_tolerant(refs, on_poll=poll)
            else:
                sites = self._gather(refs, "fit", on_poll=poll)
            poll()
        finally:
            progress.close()
        final = ray.get(self.coordinator.final_global.remote())
        traffic = TrafficReport.from_ledger(ray.get(self.coordinator.traffic.remote()))
        global_model = ray.get(final[0]) if final else None
        snapshot = state["snapshot"] or {}
        private = {n: s.privacy for n, s in sites.items() if s.privacy is not None}
        assert self.startup is not None
        return FitResult(
            sites=sites,
            global_model=global_model if global_model is not None and global_model.round > 0 else None,
            metrics={k: v for k, v in state["fl"].items() if isinstance(v, float)},
            round_seconds=list(snapshot.get("round_seconds", [])),
            aggregate_seconds=list(snapshot.get("aggregate_seconds", [])),
            fit_seconds=time.monotonic() - t0,
            startup=self.startup,
            privacy=PrivacyReport(private) if private else None,
            started_at=started_at,
            events=[SiteEvent(**e) for e in snapshot.get("events", [])],
            round_sites=list(snapshot.get("round_sites", [])),
            round_metrics=list(snapshot.get("round_metrics", [])),
            traffic=traffic,
        )

    # -- continue mode ---------------------------------------------------------------------------
    def _gather_tolerant(self, refs: dict[str, Any], on_poll: Callable[[], None]) -> dict[str, SiteFit]:
        """Every site's fit, leaving out (and restarting) those that fail instead of stopping the federation."""
        waiting = {ref: (name, self.workers[self.worker_of[name]]) for name, ref in refs.items()}
        results: dict[str, SiteFit] = {}
        while waiting:
            done, _ = ray.wait(list(waiting), num_returns=1, timeout=POLL_SECONDS)
            for ref in done:
                name, worker = waiting.pop(ref)
                try:
                    results[name] = ray.get(ref)
                except (RayTaskError, RayActorError) as err:
                    restarted = self._restart_site(name, worker, err)
                    if restarted is not None:
                        waiting[restarted] = (name, self.workers[self.worker_of[name]])
                    continue
                if self._audit is not None:
                    self._audit.append({"method": "fit", "site": name, "payload": describe([results[name]])})
            on_poll()
        return {n: results[n] for n in self.names if n in results}

    def _restart_site(self, name: str, worker: Any, err: Exception) -> Optional[Any]:
        """Leave ``name`` out (the coordinator completes the round without it) and start it again in a worker:
        a new one if its worker died. Returns the restarted site's fit, or ``None`` if it stays out."""
        dead = isinstance(err, RayActorError)
        reason = "died: its worker process exited (killed, out of memory, or a native crash)" if dead else f"failed: {_first_line(err)}"
        may_rejoin = ray.get(self.coordinator.leave_out.remote(name, reason))
        aborted = ray.get(self.coordinator.abort_reason.remote())
        if aborted is not None:
            self._fail([name], err, "fit")
        if not may_rejoin:
            self.out[name] = reason
            log.warning("lightning-fed: site %r stays out of the federation: it failed %d times in a row (%s)", name,
                        FAILURES_BEFORE_OUT, reason)
            return None
        index = self.worker_of[name]
        if dead and self.workers[index] is worker:  # the first of its sites to notice: start its replacement
            self.workers[index] = self._new_worker(self.specs[index])
        try:
            part = find_checkpoint(self.plans[name].job.checkpoint_dir).site_paths.get(name) if self.plans[name].job.checkpoint_dir else None
        except (FileNotFoundError, ValueError):
            part = None  # nothing committed yet: it starts afresh from the round's global model
        return self.workers[index].rejoin.remote(self.plans[name], str(part) if part is not None else None)

    def evaluate(self, stage: str, weights: Weights, exact: bool = False) -> Evaluation:
        """``test``/``validate`` the model with ``weights`` at every site on its own data, and merged over all.

        The weights go through each site's algorithm half (e.g. FedBN keeps the site's own normalisation layers);
        ``exact`` loads every tensor as given instead (to test a model trained elsewhere, e.g. another site's local
        model, on every site's data)."""
        ref = ray.put(GlobalModel(weights=weights, round=-1))
        names = [n for n in self.names if n not in self.out]  # a site out for good has nothing to test with
        evaluation = evaluation_of(stage, self._gather({n: self.workers[self.worker_of[n]].evaluate.remote(n, stage, ref, exact) for n in names}, stage))
        evaluation.notes.extend(f"site {name!r} not evaluated: it stayed out of the federation ({reason})" for name, reason in self.out.items())
        return evaluation

    def audit(self) -> dict[str, list[dict[str, Any]]]:
        """Structure (never values) of every message sites sent the coordinator and every result they returned
        to the driver; needs ``FederatedStrategy(audit_messages=True)`` and a live federation."""
        if self._audit is None:
            raise FederationConfigError("message audit is off: create the strategy with FederatedStrategy(audit_messages=True)")
        return {"coordinator": ray.get(self.coordinator.audit_log.remote()), "driver": list(self._audit)}

    def site_weights(self) -> dict[str, Weights]:
        """Every site's current weights, by site name (sites left out for good excepted)."""
        return self._gather({n: self.workers[self.worker_of[n]].weights.remote(n) for n in self.names if n not in self.out}, "weights")

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
        reuse = reuse and graceful and self.alive
        if graceful and self.workers and self.alive:
            try:
                ray.get([w.close.remote() for w in self.workers], timeout=60)
            except Exception as err:
                reuse = False
                log.warning("lightning-fed: some sites did not close cleanly: %s", err)
        if reuse and self.pool is not None and self.workers:
            self.pool.give(self.specs, self.pg, self.workers)  # warm for the next run of this layout
        else:
            _kill(self.pg, self.workers)
            for path in {r.worker_marker for r in self.ready.values() if r.worker_marker}:
                _remove(path)  # the notes of workers that are gone (those on this node)
        if self.coordinator is not None:
            try:
                ray.kill(self.coordinator, no_restart=True)
            except Exception:
                pass
        self.workers, self.coordinator, self.pg, self.alive = [], None, None, False


def layout_cpus(sites: Sequence[Site], placement: Placement) -> float:
    """CPUs the workers of a fixed layout hold together (what a local Ray must have)."""
    return sum(spec.num_cpus for spec in place_sites(sites, placement, os.cpu_count() or 1))


def evaluation_of(stage: str, sites: dict[str, SiteEvaluation]) -> Evaluation:
    """Site evaluations and their merge: the metrics of every site's predictions pooled (states summed)."""
    merged = merge_reports({n: r.report() for n, r in sites.items()})
    notes = sorted({r.note for r in sites.values() if r.note})
    hidden = sorted(name for name, r in sites.items() if r.hidden_labels)
    if hidden:
        notes.append(f"sites without labels ({', '.join(hidden)}): their label-based metrics come from labels they never "
                     "trained on (a simulation's hidden labels), and count in the federated values")
    return Evaluation(stage=stage, sites=sites, federated=federated_metrics(merged, "test" if stage == "test" else "val"), notes=notes)


def total_rounds(max_epochs: Optional[int], sync_every: int) -> int:
    """Rounds a fit of ``max_epochs`` makes (the last one partial when ``max_epochs`` is not a multiple)."""
    return math.ceil(max_epochs / sync_every) if max_epochs and max_epochs > 0 else 0
