"""Continue mode on the driver (``on_site_failure="continue"``): a site that fails during the fit is left out, the
coordinator completes its rounds without it, and the driver starts it again, in a new worker if its worker died; it
rejoins at a later round (:meth:`~lightning_fed.coordinator.Coordinator.rejoin`). A site that fails too often in a
row stays out for the rest of the run (:mod:`lightning_fed.roster`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import ray
from ray.exceptions import RayActorError, RayTaskError

from lightning_fed.calls import POLL_SECONDS, FederationCalls
from lightning_fed.checkpoint import find_checkpoint
from lightning_fed.failures import EXITED, first_line
from lightning_fed.results import SiteFit
from lightning_fed.roster import FAILURES_BEFORE_OUT
from lightning_fed.site import SitePlan

log = logging.getLogger(__name__)


class SiteRestarts:
    """Every site's fit, with the failed ones left out and restarted instead of stopping the federation; those that
    stay out for good are recorded in ``out`` with the reason.

    Args:
        calls: the running federation's workers and coordinator (a failure the coordinator aborts on ends the run).
        plans: each site's plan: a restarted site is set up from it again.
        out: where the sites that stay out for good go, with the reason (the federation's record of them).
    """

    def __init__(self, calls: FederationCalls, plans: dict[str, SitePlan], out: dict[str, str]) -> None:
        self.calls = calls
        self.plans = plans
        self.out = out

    def gather(self, refs: dict[str, Any], on_poll: Callable[[], None]) -> dict[str, SiteFit]:
        """Every site's fit (``refs``: each site's call, in site order), leaving out (and restarting) those that
        fail. Returns the fits of the sites that finished, in site order."""
        waiting = {ref: (name, self.calls.hosts.of(name)) for name, ref in refs.items()}
        results: dict[str, SiteFit] = {}
        while waiting:
            self.calls.watch(list(waiting))
            done, _ = ray.wait(list(waiting), num_returns=1, timeout=POLL_SECONDS)
            for ref in done:
                name, worker = waiting.pop(ref)
                try:
                    results[name] = ray.get(ref)
                except (RayTaskError, RayActorError) as err:
                    restarted = self._restart(name, worker, err)
                    if restarted is not None:
                        waiting[restarted] = (name, self.calls.hosts.of(name))
                    continue
                self.calls.heard("fit", name, results[name])
            on_poll()
        self.calls.watch([])
        return {n: results[n] for n in refs if n in results}

    def _restart(self, name: str, worker: Any, err: Exception) -> Optional[Any]:
        """Leave ``name`` out (the coordinator completes the round without it) and start it again in a worker:
        a new one if its worker died. Returns the restarted site's fit, or ``None`` if it stays out."""
        dead = isinstance(err, RayActorError)
        reason = f"died: its worker {EXITED}" if dead else f"failed: {first_line(err)}"
        may_rejoin = self.calls.ask("leave_out", name, reason)
        if self.calls.ask("abort_reason") is not None:
            self.calls.fail([name], err, "fit")
        if not may_rejoin:
            self.out[name] = reason
            log.warning(
                "lightning-fed: site %r stays out of the federation: it failed %d times in a row (%s)",
                name,
                FAILURES_BEFORE_OUT,
                reason,
            )
            return None
        hosts, checkpoint_dir = self.calls.hosts, self.calls.checkpoint_dir
        host = hosts.replace(name, worker) if dead else hosts.of(name)
        try:
            part = find_checkpoint(checkpoint_dir).site_paths.get(name) if checkpoint_dir else None
        except (FileNotFoundError, ValueError):
            part = None  # nothing committed yet: it starts afresh from the round's global model
        return host.rejoin.remote(self.plans[name], str(part) if part is not None else None)
