"""The coordinator's process: the Ray actor a federation's :class:`~lightning_fed.coordinator.Coordinator` runs in,
and the link through which the driver and the sites call it.

A process serves one federation at a time; kept by a warm pool (:class:`~lightning_fed.hosting.IdleCoordinator`),
it serves one after another, where a new process would cost each run about a second of CPU (Ray, numpy, the
aggregators). Every call names the run it belongs to (:class:`CoordinatorLink`), so a call left over from an earlier
run (a status report still on its way, a site of a failed run still computing) is refused instead of reaching the
next run's barriers. Torch-free, like the coordinator.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any, Optional

import ray

from lightning_fed.coordinator import Coordinator
from lightning_fed.strategies.base import Aggregator

__all__ = ["CoordinatorLink", "CoordinatorProcess", "RemoteCoordinatorProcess", "StaleCallError"]


class StaleCallError(RuntimeError):
    """A call for a run that this coordinator process does not serve (any more)."""


class CoordinatorProcess:
    """A process that coordinates one federation at a time: :meth:`begin` starts serving a run, :meth:`end` stops.

    Args (optional, to begin at once, as a new process does): ``run`` and the arguments of :meth:`begin`.
    """

    def __init__(self, run: Optional[str] = None, *federation: Any, **options: Any) -> None:
        self._run: Optional[str] = None
        self._coordinator: Optional[Coordinator] = None
        if run is not None:
            self.begin(run, *federation, **options)

    def begin(self, run: str, aggregator: Aggregator, sites: list[str], **options: Any) -> None:
        """Coordinate ``run``: ``sites`` with ``aggregator`` (``options``: the other arguments of
        :class:`~lightning_fed.coordinator.Coordinator`)."""
        if self._coordinator is not None:
            raise RuntimeError(f"this coordinator still serves run {self._run}: end it first")
        self._coordinator = Coordinator(aggregator, sites, **options)
        self._run = run

    def end(self, run: str) -> bool:
        """Stop serving ``run``: a site still waiting at one of its barriers is released with an error, and the run's
        state goes (its global models with it). ``False`` if this process was not serving ``run``."""
        if run != self._run or self._coordinator is None:
            return False
        self._coordinator.abort("the federation was shut down")
        self._coordinator, self._run = None, None
        return True

    async def call(self, run: str, method: str, *args: Any) -> Any:
        """The coordinator's ``method`` called with ``args``, for ``run`` only."""
        if run != self._run or self._coordinator is None:
            raise StaleCallError(f"{method!r} was called for run {run}, which this coordinator does not serve")
        if method.startswith("_"):
            raise AttributeError(f"the coordinator has no method {method!r} to call")
        answer = getattr(self._coordinator, method)(*args)
        return await answer if inspect.isawaitable(answer) else answer

    async def told(self, run: str, method: str, *args: Any) -> None:
        """Like :meth:`call`, for a message no one waits on (a site's status report): one for a run this process no
        longer serves is dropped (the run is over), not raised where nobody would read it."""
        try:
            await self.call(run, method, *args)
        except StaleCallError:
            pass

    def alive(self) -> bool:
        return True

    def has_loaded(self, module: str) -> bool:
        """Whether this process has imported ``module`` (e.g. torch, which a DP-FedAvg accountant loads)."""
        return module in sys.modules


RemoteCoordinatorProcess = ray.remote(num_cpus=0, max_restarts=0)(CoordinatorProcess)


@dataclass(frozen=True)
class CoordinatorLink:
    """One run's line to its coordinator: ``actor`` (a :class:`CoordinatorProcess`) and the ``run`` it serves.
    The driver holds one and every site gets a copy."""

    actor: Any
    run: str

    def remote(self, method: str, *args: Any) -> Any:
        """Call the coordinator's ``method`` for this run; returns the answer's object ref."""
        return self.actor.call.remote(self.run, method, *args)

    def tell(self, method: str, *args: Any) -> None:
        """Call the coordinator's ``method`` for this run without waiting (dropped if the run is over)."""
        self.actor.told.remote(self.run, method, *args)
