"""The worker processes a federation runs on: placed on the cluster, started (or taken warm from a
:class:`WorkerPool`), replaced when one dies, and given back or ended with the run.

A worker (:mod:`lightning_fed.worker`) is one Ray actor hosting one or more sites; :mod:`lightning_fed.placement`
decides how many there are and which sites each hosts. :class:`Workers` is one run's set of them, in one placement
group; :class:`WorkerPool` keeps the workers of runs that ended cleanly warm for the next run of the same layout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import weakref
from typing import Any, Optional, Sequence

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from lightning_fed.config import Placement
from lightning_fed.data.sites import Site
from lightning_fed.errors import FederationConfigError
from lightning_fed.placement import WorkerSpec, describe_layout, place_sites
from lightning_fed.runtime import RayRuntime
from lightning_fed.worker import SPARE_CONCURRENCY, RemoteWorker, worker_concurrency

log = logging.getLogger(__name__)


def _fmt_resources(resources: dict[str, float]) -> str:
    return ", ".join(
        f"{k}={v:g}" for k, v in sorted(resources.items()) if not k.startswith(("node:", "object_store", "memory"))
    )


def _sum_bundles(bundles: Sequence[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            total[key] = total.get(key, 0.0) + value
    return total


def _shape_bundle(shape: tuple) -> dict[str, float]:
    """The placement-group bundle a worker of this :meth:`~lightning_fed.placement.WorkerSpec.shape` holds."""
    num_cpus, num_gpus, resources, _ = shape
    return WorkerSpec(0, (), num_cpus, num_gpus, resources).bundle()


def kill(pg: Any, actors: Sequence[Any]) -> None:
    """End ``actors`` and remove the placement group ``pg`` (either may be gone already)."""
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


def resumed_placement(placement: Placement, server_state: Optional[dict[str, Any]]) -> Placement:
    """``placement``, or for a resumed run whose configuration leaves it automatic, the layout its checkpoint was
    trained with (:meth:`Workers.shared_layout`): the same threads per site give the same floats."""
    if placement.automatic and server_state is not None and server_state.get("layout"):
        return dataclasses.replace(placement, **server_state["layout"])
    return placement


def layout_cpus(sites: Sequence[Site], placement: Placement) -> float:
    """CPUs the workers of a fixed layout hold together (what a local Ray must have)."""
    return sum(spec.num_cpus for spec in place_sites(sites, placement, os.cpu_count() or 1))


_POOLS: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()  # this process's pools (idle workers hold resources)


def make_room(bundles: Sequence[dict[str, float]]) -> None:
    """Free the idle workers of this process's pools when the cluster could not otherwise place ``bundles`` (a run
    on another pool, or Ray tasks of this process, must never wait for workers nobody uses)."""
    for pool in list(_POOLS):
        pool.make_room(bundles)


class WorkerPool:
    """Workers kept warm between runs whose layouts match: as many workers, each holding the same resources and
    threads (the sites each hosts may differ, up to what it can run at once).

    A new run of that layout hands the idle workers its own sites (new module, data, Trainer, coordinator) instead
    of starting new processes, which saves each worker its start and its torch/Lightning imports. Only workers of
    runs that ended cleanly come back; a failed run's workers are always killed. Call :meth:`close` at the end.
    """

    def __init__(self) -> None:
        # shapes -> (placement group, workers, how many sites each worker can host)
        self._idle: dict[tuple, tuple[Any, list[Any], list[int]]] = {}
        _POOLS.add(self)
        self.started = 0  # worker processes started for runs using this pool
        self.reused = 0  # workers handed to a later run instead

    @staticmethod
    def layout(specs: Sequence[WorkerSpec]) -> tuple:
        return tuple(spec.shape() for spec in specs)

    def take(self, specs: Sequence[WorkerSpec]) -> Optional[tuple[Any, list[Any]]]:
        warm = self._idle.get(self.layout(specs))
        if warm is None or any(len(spec.sites) > room for spec, room in zip(specs, warm[2])):
            return None
        del self._idle[self.layout(specs)]
        self.reused += len(warm[1])
        return warm[0], warm[1]

    def give(self, specs: Sequence[WorkerSpec], pg: Any, workers: list[Any]) -> None:
        old = self._idle.pop(self.layout(specs), None)
        if old is not None:
            kill(old[0], old[1])
        # every worker was started able to run at least this many calls at once (see worker_concurrency)
        self._idle[self.layout(specs)] = (pg, workers, [worker_concurrency(len(spec.sites)) - 3 for spec in specs])

    def make_room(self, bundles: Sequence[dict[str, float]]) -> None:
        """Free idle layouts, least recently used first, until the cluster could place ``bundles``: the others stay
        warm for the runs that want them."""
        free = ray.available_resources()
        short = {k: v - free.get(k, 0.0) for k, v in _sum_bundles(bundles).items() if free.get(k, 0.0) + 1e-9 < v}
        for layout in list(self._idle):  # in the order they were given back
            if all(v <= 1e-9 for v in short.values()):
                return
            pg, workers, _ = self._idle.pop(layout)
            kill(pg, workers)
            for key, value in _sum_bundles([_shape_bundle(shape) for shape in layout]).items():
                if key in short:
                    short[key] -= value

    def close(self) -> None:
        """End every idle worker and its placement group."""
        for pg, workers, _ in self._idle.values():
            kill(pg, workers)
        self._idle.clear()


class Workers:
    """One run's workers: ``actors[i]`` hosts ``specs[i].sites``, all in the placement group ``pg``.

    ``warm``: taken over from a :class:`WorkerPool` (already placed and started); otherwise started for this run,
    perhaps with the early spare standing in for one (``adopted``: its adoption call, by worker index)."""

    def __init__(
        self, specs: list[WorkerSpec], pg: Any, actors: list[Any], warm: bool, adopted: Optional[dict[int, Any]] = None
    ) -> None:
        self.specs, self.pg, self.actors, self.warm = specs, pg, actors, warm
        self.adopted: dict[int, Any] = dict(adopted or {})
        self.index: dict[str, int] = {name: spec.index for spec in specs for name in spec.sites}  # site -> its worker

    @classmethod
    def none(cls) -> "Workers":
        """No workers (before a run has any, and after they ended)."""
        return cls([], None, [], warm=False)

    @classmethod
    def acquire(
        cls, sites: Sequence[Site], placement: Placement, runtime: RayRuntime, pool: Optional[WorkerPool] = None
    ) -> "Workers":
        """Place ``sites`` as ``placement`` says on the cluster's resources, and get a worker for each part: warm
        ones from ``pool`` when it holds this layout, else new processes (placed once :meth:`wait_placed` returns)."""
        # sized to the cluster, not to what happens to be free this instant (Ray reports that late, and a previous
        # run's workers may still be letting go): the same cluster gives the same layout, so the same floats
        total = ray.cluster_resources()
        specs = place_sites(sites, placement, total.get("CPU", 0.0), total.get("GPU", 0.0))
        _check_resources(specs, total)
        warm = pool.take(specs) if pool is not None else None
        if warm is not None:
            return cls(specs, warm[0], warm[1], warm=True)
        bundles = [spec.bundle() for spec in specs]
        make_room(bundles)
        workers = cls(specs, placement_group(bundles, strategy="PACK"), [], warm=False)
        workers._start(runtime.take_spare())
        if pool is not None:
            pool.started += len(workers.actors)
        return workers

    def _start(self, spare: Any) -> None:
        """One worker per spec; a spare (started before the layout was known) stands in for the first CPU worker
        it can serve, and its bundle stays reserved for it."""
        for spec in self.specs:
            if (
                spare is not None
                and not spec.num_gpus
                and not spec.resources
                and worker_concurrency(len(spec.sites)) <= SPARE_CONCURRENCY
            ):
                self.actors.append(spare)
                self.adopted[spec.index] = spare.adopt.remote(spec.index, spec.threads)
                spare = None
                continue
            self.actors.append(self._new(spec))
        if spare is not None:
            kill(None, [spare])  # no worker it could serve

    def _new(self, spec: WorkerSpec) -> Any:
        return RemoteWorker.options(
            num_cpus=spec.num_cpus,
            num_gpus=spec.num_gpus,
            resources=dict(spec.resources) or None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=spec.index),
            max_concurrency=worker_concurrency(len(spec.sites)),  # room for a later run's sites (WorkerPool)
        ).remote(spec.index, spec.threads, spec.num_gpus)

    def wait_placed(self, timeout: float) -> None:
        """Wait until the cluster holds every new worker's resources (warm ones hold theirs)."""
        if self.warm:
            return
        try:
            ray.get(self.pg.ready(), timeout=timeout)
        except GetTimeoutError:
            raise FederationConfigError(
                f"the cluster could not place {describe_layout(self.specs)} within {timeout:.0f}s "
                f"(available: {_fmt_resources(ray.available_resources())}): free resources, or lower the sites' "
                "num_cpus/num_gpus or the placement's workers"
            ) from None

    def of(self, site: str) -> Any:
        """The worker hosting ``site``."""
        return self.actors[self.index[site]]

    def hosted_with(self, site: str) -> list[str]:
        """Every site of ``site``'s worker (``site`` included)."""
        return list(self.specs[self.index[site]].sites) if site in self.index else [site]

    def replace(self, site: str, dead: Any) -> Any:
        """A new worker for ``site``'s, which died (``dead``: the handle that failed; the first of its sites to
        notice starts the replacement, the others get it)."""
        index = self.index[site]
        if self.actors[index] is dead:
            self.actors[index] = self._new(self.specs[index])
        return self.actors[index]

    def shared_layout(self) -> Optional[dict[str, Any]]:
        """The pool of workers the unpinned sites share, as :class:`Placement` fields (recorded in checkpoints)."""
        shared = [spec for spec in self.specs if not spec.resources]
        return {"workers": len(shared), "worker_cpus": shared[0].num_cpus} if shared else None

    def finish(self, pool: Optional[WorkerPool], graceful: bool, reuse: bool, markers: Sequence[str] = ()) -> bool:
        """Close every site first (``graceful``: their loggers flushed), then hand the workers to ``pool`` warm
        (``reuse``, where every site closed cleanly) or end them, and with them their ``markers`` (the notes of which
        site computes, :func:`~lightning_fed.worker.computing_marker`). Returns whether they went back warm."""
        if graceful and self.actors:
            try:
                ray.get([w.close.remote() for w in self.actors], timeout=60)
            except Exception as err:
                reuse = False
                log.warning("lightning-fed: some sites did not close cleanly: %s", err)
        if reuse and graceful and pool is not None and self.actors:
            pool.give(self.specs, self.pg, self.actors)
            return True
        if self.actors or self.pg is not None:
            kill(self.pg, self.actors)
        for path in markers:  # those on this node
            try:
                os.remove(path)
            except OSError:
                pass
        return False


def _check_resources(specs: Sequence[WorkerSpec], total: dict[str, float]) -> None:
    needs = _sum_bundles([spec.bundle() for spec in specs])
    # a missing node resource says more than a CPU shortfall it may cause
    for key, value in sorted(needs.items(), key=lambda kv: kv[0] in ("CPU", "GPU", "memory")):
        if total.get(key, 0.0) + 1e-9 < value:
            users = [name for spec in specs if spec.bundle().get(key) for name in spec.sites]
            hint = (
                f"start the node holding that data with --resources '{{\"{key}\": 1}}'"
                if key not in ("CPU", "GPU", "memory")
                else "lower the sites' num_cpus/num_gpus, pack more sites per worker, or add nodes"
            )
            raise FederationConfigError(
                f"sites {users} need {value:g} {key} but the Ray cluster has {total.get(key, 0.0):g}: {hint}"
            )
