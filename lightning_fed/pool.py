"""The worker processes a federation runs on: placed on the cluster, started (or taken warm from a
:class:`WorkerPool`), replaced when one dies, and given back or ended with the run.

A worker (:mod:`lightning_fed.worker`) is one Ray actor hosting one or more sites; :mod:`lightning_fed.placement`
decides how many there are and which sites each hosts. :class:`Workers` is one run's set of them, their resources
held by one placement group; :class:`WorkerPool` keeps the workers of runs that ended cleanly warm for later runs.

On a one-node Ray (a laptop, a workstation, a test session) a CPU worker is a process holding no resources of its
own, kept on the driver's node, while the run's placement group holds its CPUs: when the run ends the group goes
and the process stays, free to serve any later run's layout. On a cluster, or for GPU and pinned sites, each
worker holds its bundle inside the group, and only a later run of the same layout can reuse it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import weakref
from typing import Any, Optional, Sequence

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from lightning_fed.config import Placement
from lightning_fed.data.sites import Site
from lightning_fed.errors import FederationConfigError
from lightning_fed.hosting import IdleCoordinator, kill_quietly
from lightning_fed.placement import WorkerSpec, describe_layout, place_sites
from lightning_fed.runtime import RayRuntime
from lightning_fed.worker import SPARE_CONCURRENCY, RemoteWorker, remove_marker, worker_concurrency

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


def _wait_for_room(bundles: Sequence[dict[str, float]], seconds: float = 0.5) -> None:
    """Wait (at most ``seconds``) until the cluster reports room for ``bundles``. What an earlier run just let go (its
    placement group removed) is reported free within about a tenth of a second; a group asked for before then waits
    for Ray's next attempt to place it, about half a second later."""
    need = _sum_bundles(bundles)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        free = ray.available_resources()
        if all(free.get(key, 0.0) + 1e-9 >= value for key, value in need.items()):
            return
        time.sleep(0.01)


def _shape_bundle(shape: tuple) -> dict[str, float]:
    """The placement-group bundle a worker of this :meth:`~lightning_fed.placement.WorkerSpec.shape` holds."""
    num_cpus, num_gpus, resources, _ = shape
    return WorkerSpec(0, (), num_cpus, num_gpus, resources).bundle()


def kill(pg: Any, actors: Sequence[Any]) -> None:
    """End ``actors`` and remove the placement group ``pg`` (either may be gone already), and the files in which
    the workers among them on this node noted which site computes (:func:`~lightning_fed.worker.computing_marker`)."""
    for actor in actors:
        kill_quietly(actor)
        remove_marker(actor)
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


RELEASE_SECONDS = 2.0  # after a failed run, how long a worker's sites may take to end before the worker is ended
MAX_FREE_WORKERS = max(4, os.cpu_count() or 1)  # idle resource-free workers a pool keeps (the oldest end first)


class WorkerPool:
    """Workers kept warm between runs, which a later run hands its own sites (new module, data, Trainer,
    coordinator) instead of starting new processes: each saves its process start and its torch/Lightning imports.
    The last run's coordinator process is kept too (:class:`~lightning_fed.hosting.IdleCoordinator`).

    On a one-node Ray the pool keeps processes that hold no resources: any later run takes as many as its CPU
    layout has workers, sets their threads and starts new ones only for the rest. Elsewhere (a cluster, GPU or
    pinned sites) a run's workers hold their resources and come back as one layout, reused only by a run whose
    layout matches: as many workers, each holding the same resources and threads. Only workers of runs that ended
    cleanly come back, and on a one-node Ray those of a failed run whose sites all stopped within
    :data:`RELEASE_SECONDS` (every other worker of a failed run is ended). Call :meth:`close` at the end.
    """

    def __init__(self) -> None:
        # shapes -> (placement group, workers, how many sites each worker can host)
        self._idle: dict[tuple, tuple[Any, list[Any], list[int]]] = {}
        self._free: list[tuple[Any, int]] = []  # resource-free workers on this node, and how many sites each can host
        _POOLS.add(self)
        self.started = 0  # worker processes started for runs using this pool
        self.reused = 0  # workers handed to a later run instead
        self.coordinators = IdleCoordinator()  # the last run's coordinator process, for the next run

    def take_free(self, sites: Sequence[int]) -> list[Optional[tuple[Any, int]]]:
        """For each entry of ``sites`` (how many sites a worker must host), an idle resource-free worker able to host
        them, with how many it can host; ``None`` where the pool has none left."""
        answering = set(_answering([worker for worker, _ in self._free]))
        kill(None, [worker for i, (worker, _) in enumerate(self._free) if i not in answering])
        self._free = [entry for i, entry in enumerate(self._free) if i in answering]
        taken: list[Optional[tuple[Any, int]]] = []
        for count in sites:
            fits = next((i for i, (_, room) in enumerate(self._free) if room >= count), None)
            taken.append(None if fits is None else self._free.pop(fits))
        self.reused += sum(given is not None for given in taken)
        return taken

    def keep_free(self, workers: Sequence[Any], rooms: Sequence[int]) -> None:
        """Keep ``workers`` (resource-free, on this node) idle for later runs, up to :data:`MAX_FREE_WORKERS`."""
        self._free.extend(zip(workers, rooms))
        surplus, self._free = self._free[:-MAX_FREE_WORKERS], self._free[-MAX_FREE_WORKERS:]
        kill(None, [worker for worker, _ in surplus])

    @staticmethod
    def layout(specs: Sequence[WorkerSpec]) -> tuple:
        return tuple(spec.shape() for spec in specs)

    def take(self, specs: Sequence[WorkerSpec]) -> Optional[tuple[Any, list[Any]]]:
        warm = self._idle.get(self.layout(specs))
        if warm is None or any(len(spec.sites) > room for spec, room in zip(specs, warm[2])):
            return None
        del self._idle[self.layout(specs)]
        if len(_answering(warm[1])) < len(warm[1]):  # one of them died while idle: the layout starts afresh
            kill(warm[0], warm[1])
            return None
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

    def idle_workers(self) -> list[Any]:
        """The workers the pool keeps idle now (alive by design, for the next run)."""
        return [w for _, workers, _ in self._idle.values() for w in workers] + [w for w, _ in self._free]

    def close(self) -> None:
        """End every idle worker and its placement group."""
        for pg, workers, _ in self._idle.values():
            kill(pg, workers)
        self._idle.clear()
        kill(None, [worker for worker, _ in self._free])
        self._free.clear()
        self.coordinators.close()


def _true_within(calls: Sequence[Any], timeout: float) -> list[int]:
    """The indices of the actor ``calls`` that returned ``True`` within ``timeout`` seconds (the call of a worker
    whose process is gone raises instead)."""
    done, _ = ray.wait(list(calls), num_returns=len(calls), timeout=timeout) if calls else ([], [])
    returned = []
    for index, call in enumerate(calls):
        try:
            if call in done and ray.get(call, timeout=0) is True:
                returned.append(index)
        except Exception:  # its process died
            pass
    return returned


def _answering(workers: Sequence[Any]) -> list[int]:
    """The indices of the idle ``workers`` whose process answers (one may have died while idle, e.g. killed for
    memory); an idle worker answers at once."""
    return _true_within([worker.alive.remote() for worker in workers], timeout=10.0)


def _serves_any_layout(spec: WorkerSpec) -> bool:
    """Whether a resource-free process on the driver's node can be this worker (a CPU one, pinned nowhere)."""
    return not spec.num_gpus and not spec.resources


def _one_node() -> bool:
    return sum(1 for node in ray.nodes() if node.get("Alive")) == 1


class Workers:
    """One run's workers: ``actors[i]`` hosts ``specs[i].sites``; the placement group ``pg`` holds their resources.

    ``free``: the workers hold no resources of their own (a one-node Ray's CPU layout, see the module's docstring),
    so they can serve any later layout. ``warm``: every worker came from a :class:`WorkerPool` (its imports done);
    ``placed``: so did the placement group (a layout reused whole). ``adopted``: the calls fitting workers started
    for no layout (from a pool, or the early spare) to their places, by worker index."""

    def __init__(
        self,
        specs: list[WorkerSpec],
        pg: Any,
        actors: list[Any],
        warm: bool,
        placed: bool = False,
        free: bool = False,
    ) -> None:
        self.specs, self.pg, self.actors, self.warm, self.placed, self.free = specs, pg, actors, warm, placed, free
        self.rooms: list[int] = [worker_concurrency(len(spec.sites)) - 3 for spec in specs]  # sites each can host
        self.adopted: dict[int, Any] = {}
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
        ones from ``pool`` where it has them, else new processes (placed once :meth:`wait_placed` returns)."""
        # sized to the cluster, not to what happens to be free this instant (Ray reports that late, and a previous
        # run's workers may still be letting go): the same cluster gives the same layout, so the same floats
        total = ray.cluster_resources()
        specs = place_sites(sites, placement, total.get("CPU", 0.0), total.get("GPU", 0.0))
        _check_resources(specs, total)
        warm = pool.take(specs) if pool is not None else None
        if warm is not None:
            return cls(specs, warm[0], warm[1], warm=True, placed=True)
        bundles = [spec.bundle() for spec in specs]
        make_room(bundles)
        _wait_for_room(bundles)
        free = all(_serves_any_layout(spec) for spec in specs) and _one_node()
        taken = pool.take_free([len(spec.sites) for spec in specs]) if pool is not None and free else []
        workers = cls(specs, placement_group(bundles, strategy="PACK"), [], warm=bool(taken) and all(taken), free=free)
        started = workers._start(taken or [None] * len(specs), runtime.take_spare(), pool)
        if pool is not None:
            pool.started += started
        return workers

    def _start(self, taken: Sequence[Optional[tuple[Any, int]]], spare: Any, pool: Optional[WorkerPool]) -> int:
        """One worker per spec: the pool's where it gave one (``taken``: with the sites it can host), else the
        early ``spare`` (started before the layout was known) for the first CPU worker it can serve, else a new
        process. Returns how many processes were started for this run (the spare counts)."""
        started = 0
        for spec, given in zip(self.specs, taken):
            if given is None and spare is not None and _serves_any_layout(spec):
                if worker_concurrency(len(spec.sites)) <= SPARE_CONCURRENCY:
                    given, spare, started = (spare, SPARE_CONCURRENCY - 3), None, started + 1
            if given is None:
                self.actors.append(self._new(spec))
                started += 1
                continue
            self.actors.append(given[0])
            self.rooms[spec.index] = given[1]
            # its bundle in the placement group stays reserved for it, unused
            self.adopted[spec.index] = given[0].adopt.remote(spec.index, spec.threads)
        if spare is not None:  # no worker it could serve
            if pool is not None and self.free:
                pool.keep_free([spare], [SPARE_CONCURRENCY - 3])
            else:
                kill(None, [spare])
        return started

    def _new(self, spec: WorkerSpec) -> Any:
        if self.free:
            where: dict[str, Any] = {
                "num_cpus": 0,
                "scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), False),
            }
        else:
            where = {
                "num_cpus": spec.num_cpus,
                "num_gpus": spec.num_gpus,
                "resources": dict(spec.resources) or None,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=spec.index
                ),
            }
        # room for a later run's sites (WorkerPool)
        return RemoteWorker.options(max_concurrency=worker_concurrency(len(spec.sites)), **where).remote(
            spec.index, spec.threads, spec.num_gpus
        )

    def wait_placed(self, timeout: float) -> None:
        """Wait until the cluster holds every worker's resources (a layout reused whole holds them already)."""
        if self.placed:
            return
        try:
            ray.get(self.pg.ready(), timeout=timeout)
        except GetTimeoutError:
            raise FederationConfigError(
                f"the cluster could not place {describe_layout(self.specs)} within {timeout:.0f}s "
                f"(available: {_fmt_resources(ray.available_resources())}): free resources, or lower the sites' "
                "num_cpus/num_gpus or the placement's workers"
            ) from None
        if self.free and not self._placed_here():
            self._move_into_group()

    def _placed_here(self) -> bool:
        """Whether every bundle of the group is on the driver's node, where the resource-free workers run (a
        cluster that had one node when the run started may have grown since)."""
        here = ray.get_runtime_context().get_node_id()
        return all(node == here for node in placement_group_table(self.pg)["bundles_to_node_id"].values())

    def _move_into_group(self) -> None:
        """Workers that hold their bundles instead, wherever the group placed them (the resource-free ones end)."""
        log.info("lightning-fed: the workers' resources were placed on other nodes; starting the workers there")
        kill(None, self.actors)
        self.free, self.warm, self.adopted = False, False, {}
        self.actors = [self._new(spec) for spec in self.specs]
        self.rooms = [worker_concurrency(len(spec.sites)) - 3 for spec in self.specs]

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
            remove_marker(dead)  # the run goes on with a new worker: nothing will read what the dead one noted
            self.actors[index] = self._new(self.specs[index])
            self.rooms[index] = worker_concurrency(len(self.specs[index].sites)) - 3
        return self.actors[index]

    def shared_layout(self) -> Optional[dict[str, Any]]:
        """The pool of workers the unpinned sites share, as :class:`Placement` fields (recorded in checkpoints)."""
        shared = [spec for spec in self.specs if not spec.resources]
        return {"workers": len(shared), "worker_cpus": shared[0].num_cpus} if shared else None

    def finish(self, pool: Optional[WorkerPool], graceful: bool, reuse: bool) -> bool:
        """Close every site first (``graceful``: their loggers flushed), then hand the workers to ``pool`` warm
        (``reuse``, where every site closed cleanly) or end them. Returns whether they went back warm."""
        if graceful and self.actors:
            try:
                ray.get([w.close.remote() for w in self.actors], timeout=60)
            except Exception as err:
                reuse = False
                log.warning("lightning-fed: some sites did not close cleanly: %s", err)
        if reuse and graceful and pool is not None and self.actors:
            if self.free:  # the processes stay; the resources they were counted against go back to the cluster
                pool.keep_free(self.actors, self.rooms)
                kill(self.pg, [])
            else:
                pool.give(self.specs, self.pg, self.actors)
            return True
        if reuse and not graceful and pool is not None and self.free and self.actors:
            sound = self._sound_after_failure()
            pool.keep_free([self.actors[i] for i in sound], [self.rooms[i] for i in sound])
            kill(self.pg, [w for i, w in enumerate(self.actors) if i not in sound])
            return bool(sound)
        if self.actors or self.pg is not None:
            kill(self.pg, self.actors)
        return False

    def _sound_after_failure(self) -> list[int]:
        """The workers (by index) whose sites' calls all ended within :data:`RELEASE_SECONDS` of a failed run's end
        (its run ended in the coordinator) and which host nothing now: alive and idle, they can serve another run. One
        still computing, or dead (the failure itself, often), is not."""
        return _true_within([w.release.remote(RELEASE_SECONDS) for w in self.actors], RELEASE_SECONDS + 2)


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
