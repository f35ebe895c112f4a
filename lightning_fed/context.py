"""A site's line to the federation: the one object through which a site (its callbacks, its algorithm half,
its Lightning strategy) talks to the coordinator.

It implements :class:`lightning_fed.strategies.base.SiteContext` for algorithms and adds the calls the machinery
needs. Every call that waits lets the worker's other sites compute meanwhile (:mod:`lightning_fed.scheduler`).
"""

from __future__ import annotations

from typing import Any

from lightning_fed.coordinator_process import CoordinatorLink
from lightning_fed.scheduler import Scheduler


class SiteContext:
    """A site's line to the federation. Calls that wait let the worker's other sites compute meanwhile."""

    def __init__(self, site: str, coordinator: CoordinatorLink, scheduler: Scheduler) -> None:
        self.site = site
        self._coordinator = coordinator
        self._scheduler = scheduler

    def ask(self, method: str, *args: Any) -> Any:
        """Call the coordinator's ``method`` as this site and wait for the answer."""
        ref = self._coordinator.remote(method, self.site, *args)
        return self.fetch(ref)

    def fetch(self, ref: Any) -> Any:
        """Wait for an object (e.g. the round's global model) while the worker's other sites compute."""
        return self._scheduler.wait(ref)

    def tell(self, method: str, *args: Any) -> None:
        """Call the coordinator's ``method`` as this site without waiting (status reports)."""
        self._coordinator.tell(method, self.site, *args)

    def all_gather(self, key: str, value: Any) -> dict[str, Any]:
        """Every site's ``value`` for ``key`` (for site halves, e.g. secure aggregation's public keys)."""
        return self.ask("all_gather", key, value)
