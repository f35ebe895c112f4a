"""Which sites go on which worker process.

A worker (a Ray actor, :mod:`lightning_fed.worker`) hosts one or more sites and runs them one at a time with all of
its threads, as a plain training loop would; every site keeps its own Trainer, module and random streams, so the
placement changes how fast a federation runs, never what it computes.

- A site pinned to a node (any custom resource, e.g. ``{"site:hospital_a": 1}``) gets a worker of its own, with
  exactly the resources it asks for: its data is only readable there.
- The other sites share a pool of workers. ``Placement(sites_per_worker=k)`` or ``Placement(workers=W)`` fix its
  size (and ``worker_cpus`` what each worker holds); by default it is sized to the cluster's CPUs (GPUs, for sites
  that use them; all of them, not what is free at the moment, so that a cluster always gives the same layout) with
  a small cost model:
  for each candidate number of threads per worker, the sites are dealt to the workers largest first (by training
  samples, when a site knows them), and the layout whose busiest worker finishes first wins. A worker with ``T``
  threads is taken to train ``T ** THREAD_EXPONENT`` times as fast as with one (a small CNN on CPU: 1.55x at 2
  threads), so one large site and a few small ones end up on one worker with every thread, and many equal sites
  on as many one-thread workers as there are CPUs.

A worker holds the CPUs of one site (its sites take turns) and, for GPU sites, the sum of its sites' GPU shares
(their models all live on the device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from lightning_fed.config import Placement
from lightning_fed.data.sites import Site

THREAD_EXPONENT = 0.65
MAX_AUTO_THREADS = 8  # beyond this intra-op threading helps small models little; more workers do better


@dataclass(frozen=True)
class WorkerSpec:
    """One worker: the sites it hosts and what it holds on the cluster."""

    index: int
    sites: tuple[str, ...]
    num_cpus: float
    num_gpus: float = 0.0
    resources: tuple[tuple[str, float], ...] = ()
    threads: int = 1

    def bundle(self) -> dict[str, float]:
        """The worker's placement-group bundle."""
        bundle = {"CPU": float(self.num_cpus), **dict(self.resources)}
        if self.num_gpus:
            bundle["GPU"] = float(self.num_gpus)
        return {k: v for k, v in bundle.items() if v > 0} or {"CPU": 0.001}

    def shape(self) -> tuple:
        """What a warm worker must match to be reused for another run (its sites are replaced)."""
        return (self.num_cpus, self.num_gpus, self.resources, self.threads)


def _threads(cpus: float) -> int:
    return max(1, int(math.floor(cpus + 1e-9)))


def deal(work: Sequence[float], workers: int, capacity: Optional[int] = None) -> list[list[int]]:
    """Site indices per worker: largest work first, each onto the least-loaded worker with room for it (at most
    ``capacity`` sites; ties: the lower index)."""
    loads = [0.0] * workers
    hosted: list[list[int]] = [[] for _ in range(workers)]
    for i in sorted(range(len(work)), key=lambda i: (-work[i], i)):
        room = [k for k in range(workers) if capacity is None or len(hosted[k]) < capacity]
        w = min(room, key=lambda k: (loads[k], k))
        loads[w] += work[i]
        hosted[w].append(i)
    return [sorted(h) for h in hosted if h]


def _makespan(work: Sequence[float], workers: int) -> float:
    return max(sum(work[i] for i in h) for h in deal(work, workers))


def _auto_pool(work: Sequence[float], unit: float, free_cpus: float) -> tuple[int, float]:
    """``(workers, cpus per worker)`` whose busiest worker finishes first under the thread model."""
    n = len(work)
    top = max(unit, min(free_cpus, MAX_AUTO_THREADS))
    best: Optional[tuple[tuple[float, int], int, float]] = None
    k = 1
    while True:
        cpus = unit * k
        if k > 1 and cpus > top + 1e-9:
            break
        workers = min(n, max(1, int((free_cpus + 1e-9) // cpus)))
        threads = _threads(cpus)
        oversubscribed = max(1.0, workers * threads / max(free_cpus, 1.0))  # fractional CPUs still run a thread each
        key = (_makespan(work, workers) * oversubscribed / threads**THREAD_EXPONENT, workers)  # ties: fewer processes
        if best is None or key < best[0]:
            best = (key, workers, cpus)
        k += 1
    assert best is not None
    return best[1], best[2]


def place_sites(
    sites: Sequence[Site], placement: Placement, free_cpus: float, free_gpus: float = 0.0
) -> list[WorkerSpec]:
    """The workers for ``sites`` on a cluster with ``free_cpus``/``free_gpus`` unused (see the module's docstring)."""
    specs: list[WorkerSpec] = []
    pinned = [s for s in sites if s.resources]
    for site in pinned:
        specs.append(
            WorkerSpec(
                len(specs),
                (site.name,),
                site.num_cpus,
                site.num_gpus,
                tuple(sorted((k, float(v)) for k, v in site.resources.items())),
                _threads(site.num_cpus),
            )
        )
    shared = [s for s in sites if not s.resources]
    if not shared:
        return specs
    free_cpus = max(0.0, free_cpus - sum(spec.num_cpus for spec in specs))  # what the pinned workers leave
    free_gpus = max(0.0, free_gpus - sum(spec.num_gpus for spec in specs))
    known = [float(s.train_size) for s in shared if s.train_size]
    fill = sum(known) / len(known) if known else 1.0
    work = [float(s.train_size) if s.train_size else fill for s in shared]
    gpus = max(s.num_gpus for s in shared)
    pool_cpus = placement.worker_cpus  # None: each worker holds what its hungriest site asks for
    capacity = placement.sites_per_worker
    if capacity is not None:
        count = math.ceil(len(shared) / capacity)
    elif placement.workers is not None:
        count = min(placement.workers, len(shared))
    elif gpus > 0:  # GPU sites: one worker per GPU they share (or per whole-GPU site that fits)
        count = min(len(shared), max(1, int(free_gpus // (1.0 if gpus < 1 else gpus))))
    elif pool_cpus is not None:
        count = min(len(shared), max(1, int((free_cpus + 1e-9) // pool_cpus)))
    else:
        count, pool_cpus = _auto_pool(work, max(s.num_cpus for s in shared) or 1.0, free_cpus)
    for group in deal(work, count, capacity):
        members = [shared[i] for i in group]
        cpus = pool_cpus if pool_cpus is not None else max(s.num_cpus for s in members)  # sites take turns: the max
        share = sum(s.num_gpus for s in members) if gpus < 1 else max(s.num_gpus for s in members)
        specs.append(
            WorkerSpec(
                len(specs),
                tuple(s.name for s in members),
                cpus,
                min(1.0, share) if gpus < 1 else share,
                (),
                _threads(cpus),
            )
        )
    return specs


def describe_layout(specs: Sequence[WorkerSpec]) -> str:
    """One line: ``2 workers: [large] 2 threads; [small_1, small_2] 2 threads``."""
    parts = [
        f"[{', '.join(s.sites)}] {s.threads} thread{'s' if s.threads != 1 else ''}"
        + (f" {s.num_gpus:g} GPU" if s.num_gpus else "")
        for s in specs
    ]
    return f"{len(specs)} worker{'s' if len(specs) != 1 else ''}: " + "; ".join(parts)
