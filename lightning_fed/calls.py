"""The driver's calls into a running federation, and how one that fails ends the run.

:class:`FederationCalls` holds what the driver has of a running federation (the workers hosting its sites, the
coordinator) and makes every call the driver waits on through them: one per site, one per worker, or one to the
coordinator. The first to fail ends the run: the federation is shut down and one line says what failed and in which
round (:mod:`lightning_fed.failures`), raised as :class:`~lightning_fed.errors.SiteFailedError` or
:class:`~lightning_fed.errors.CoordinatorDiedError`. :class:`~lightning_fed.federation.Federation` owns one.
"""

from __future__ import annotations

from typing import Any, Callable, NoReturn, Optional

import ray
from ray.exceptions import RayActorError, RayTaskError

from lightning_fed.audit import describe
from lightning_fed.coordinator_process import CoordinatorLink
from lightning_fed.errors import CoordinatorDiedError, SiteFailedError
from lightning_fed.failures import coordinator_death, reported_reason, site_failure, when
from lightning_fed.pool import Workers

POLL_SECONDS = 0.5  # how often the driver refreshes the progress view while sites train
ABANDON_SECONDS = 1.0  # after a failure, how long the driver reads what the other sites' calls end with


class FederationCalls:
    """A running federation's workers and coordinator, and the driver's calls to them: results in site (or worker)
    order, each recorded in the driver's message audit; a failure or a death ends the run with one line.

    The federation sets :attr:`hosts` and :attr:`coordinator` as it starts them (and back to none as it shuts down),
    and :attr:`markers` once its sites are hosted.

    Args:
        checkpoint_dir: where the run commits its rounds (a fit's error names it, to resume from).
        audit: the driver's message audit, appended to (``None``: no audit).
        rounds_seen: how many rounds the driver has seen aggregated so far (a fit's error names the round after).
        shutdown: ends the federation at once (not gracefully), before the error is raised.
    """

    def __init__(
        self,
        checkpoint_dir: Optional[str],
        audit: Optional[list[dict[str, Any]]],
        rounds_seen: Callable[[], int],
        shutdown: Callable[[], None],
    ) -> None:
        self.hosts = Workers.none()  # the worker processes hosting the sites
        self.coordinator: Optional[CoordinatorLink] = None
        self.markers: dict[str, str] = {}  # per hosted site: the file where its worker notes which site computes
        self.checkpoint_dir = checkpoint_dir
        self.audit = audit
        self._in_flight: list[Any] = []  # the site calls the driver waits on now (read when a failure ends the run)
        self._rounds_seen = rounds_seen
        self._shutdown = shutdown

    # -- waiting on sites ------------------------------------------------------------------------
    def gather_workers(self, refs: dict[int, Any], what: str) -> dict[int, Any]:
        """One call per worker (each covering its sites); failures name the site."""
        return self._wait({w: (ref, list(self.hosts.specs[w].sites)) for w, ref in refs.items()}, what)

    def gather(self, refs: dict[str, Any], what: str, on_poll: Optional[Callable[[], None]] = None) -> dict[str, Any]:
        """One call per site; the first failure stops the federation and raises with the site's name."""
        return self._wait({name: (ref, [name]) for name, ref in refs.items()}, what, on_poll)

    def heard(self, what: str, site: Any, result: Any) -> None:
        """A call's result came back: its structure goes into the driver's message audit (when there is one)."""
        if self.audit is not None:
            self.audit.append({"method": what, "site": site, "payload": describe([result])})

    def _wait(
        self, calls: dict[Any, tuple[Any, list[str]]], what: str, on_poll: Optional[Callable[[], None]] = None
    ) -> dict[Any, Any]:
        by_ref = {ref: key for key, (ref, _) in calls.items()}
        pending, results = list(by_ref), {}
        self.watch(pending)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=POLL_SECONDS)
            for ref in done:
                key = by_ref[ref]
                try:
                    results[key] = ray.get(ref)
                except (RayTaskError, RayActorError) as err:
                    self.fail(calls[key][1], err, what)
                self.heard(what, key if isinstance(key, str) else calls[key][1], results[key])
            if on_poll is not None:
                on_poll()
        self.watch([])
        return {key: results[key] for key in calls}  # call order (site order), not completion order

    def watch(self, refs: list[Any]) -> None:
        """The site calls the driver waits on now: when a failure ends the run, what they end with is read."""
        self._in_flight = list(refs)

    def _read_abandoned(self) -> None:
        """Once a failure has ended the run: read what the other sites' calls ended with (most stop with the run, at
        once), so that Ray never reports them as unhandled errors on the user's terminal. A call still running
        after :data:`ABANDON_SECONDS` is left."""
        refs, self._in_flight = self._in_flight, []
        if not refs:
            return
        ended, _ = ray.wait(refs, num_returns=len(refs), timeout=ABANDON_SECONDS)
        for ref in ended:
            try:
                ray.get(ref)
            except Exception:  # the run's failure, seen from that site
                pass

    def ask(self, method: str, *args: Any) -> Any:
        """The coordinator's answer to ``method`` (a call of the fit); its death ends the run."""
        try:
            return ray.get(self.coordinator.remote(method, *args))
        except RayActorError:
            self.coordinator_died("fit")

    # -- failures: one line saying what failed, and in which round (lightning_fed.failures) ----------
    def fail(self, sites: list[str], err: Exception, what: str) -> NoReturn:
        """``sites``' call during ``what`` failed with ``err``: the federation stops, and the error says why."""
        # a site that raised reports why to the coordinator (it may still be on its way); a dead one cannot
        reason = self._coordinator_reason(what, wait=not isinstance(err, RayActorError))
        if reason is None:
            hosted = self.hosts.hosted_with(sites[0])
            marker = self.markers.get(hosted[0], "")
            reason = site_failure(sites[0], err, what, hosted, marker, self.when(what))
            if self.coordinator is not None:
                self.coordinator.remote("abort", reason)
        self._shutdown()
        self._read_abandoned()
        raise SiteFailedError(reason, self.checkpoint_dir if what == "fit" else None) from None

    def _coordinator_reason(self, what: str, wait: bool = True) -> Optional[str]:
        """The site's own one-line report, if it reached the coordinator. A dead coordinator is the failure itself."""
        try:
            return reported_reason(self.coordinator, wait) if self.coordinator is not None else None
        except RayActorError:
            self.coordinator_died(what)

    def coordinator_died(self, what: str) -> NoReturn:
        """The coordinator's process died during ``what``: the federation stops, and the error says when."""
        line = coordinator_death(self.when(what))
        self._shutdown()
        self._read_abandoned()
        raise CoordinatorDiedError(line, self.checkpoint_dir if what == "fit" else None) from None

    def when(self, what: str) -> str:
        """``in round N`` during a fit, else ``during <what>`` (:func:`lightning_fed.failures.when`)."""
        return when(what, self._rounds_seen(), self.checkpoint_dir)
