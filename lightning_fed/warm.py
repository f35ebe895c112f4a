"""Warm workers between federations of one process: ``with lightning_fed.warm_workers(): ...``.

Every federation started inside the block (any strategy, any Trainer) hands its workers back to one shared
:class:`~lightning_fed.pool.WorkerPool` when it ends, and the next federation takes them over instead of starting
new processes: each worker saves its process start and its torch/Lightning imports (seconds each). A notebook or
a hyperparameter loop that calls ``trainer.fit`` many times gains the most. On a one-node Ray any later layout
can use them (their threads are set again); on a cluster only a later run of the same layout. A local Ray started
by lightning-fed inside the block stays up until the block ends (the idle workers live in it); a cluster the
process joined is left running as always. Of a run that failed, only workers whose sites all stopped at once
(on a one-node Ray) are reused; the others are ended.

``lightning-fed compare``/``sweep`` open such a block themselves (inside an enclosing one they share its pool); a
strategy given a pool (``strategy.worker_pool``) uses that one.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

from lightning_fed.pool import WorkerPool
from lightning_fed.runtime import hold_local_ray, release_local_ray

_pools: list[Optional[WorkerPool]] = []  # innermost last; None: warm workers switched off in that block


@contextmanager
def warm_workers(enabled: bool = True) -> Iterator[Optional[WorkerPool]]:
    """Keep workers warm between the federations run inside this block (``enabled=False``: switch it off inside an
    outer block, e.g. for a run that must start from fresh processes). Yields the pool (``None`` when off); its
    idle workers end when the block does. Directly inside another enabled block (e.g. the one ``compare`` and
    ``sweep`` open, called in a notebook's block) it shares that block's pool, whose workers then outlive it."""
    outer = _pools[-1] if _pools else None
    shared = enabled and outer is not None
    pool = outer if shared else WorkerPool() if enabled else None
    _pools.append(pool)
    hold_local_ray(_pools)
    try:
        yield pool
    finally:
        _pools.pop()
        if pool is not None and not shared:
            pool.close()
        if not _pools:
            release_local_ray(_pools)


def current_pool() -> Optional[WorkerPool]:
    """The pool of the innermost :func:`warm_workers` block, or ``None`` outside one (or where it is off)."""
    return _pools[-1] if _pools else None
