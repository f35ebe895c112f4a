"""Who takes part in what: the sites of a federation, which are out and why, from which round each takes part, what
each carried at its last hand-over, who waits to rejoin, how often each failed in a row, and what the progress view
shows about them (their reported status, and events: left out, out for good, rejoined).

The coordinator decides (leave a site out, admit it back); the :class:`Roster` remembers, so the rules of
``on_site_failure="continue"`` read in one place. Torch-free: this runs in the coordinator's process.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from lightning_fed.results import SiteEvent

FAILURES_BEFORE_OUT = 3  # a site failing this many times with no round finished in between stays out


class Roster:
    """The sites of one federation and where each stands.

    Args:
        sites: every site, in the federation's order.
        carry: what each site carried at its last hand-over (a resumed run's, from its checkpoint).
    """

    def __init__(self, sites: list[str], carry: Optional[dict[str, Any]] = None) -> None:
        self.sites = list(sites)
        self.out: dict[str, str] = {}  # site -> why it is out
        self.joins: dict[str, int] = {}  # site -> the first round it takes part in (1 if not listed)
        self.carry: dict[str, Any] = dict(carry or {})
        self.rejoining: set[str] = set()
        self.finished: set[str] = set()
        self.failures: dict[
            str, tuple[int, int]
        ] = {}  # site -> (rounds aggregated when it last failed, failures in a row)
        self.status: dict[str, dict[str, Any]] = {s: {"status": "starting"} for s in self.sites}
        self.events: list[SiteEvent] = []

    # -- who is where ----------------------------------------------------------------------------
    def active(self) -> list[str]:
        """The sites not out, in order."""
        return [s for s in self.sites if s not in self.out]

    def running(self) -> set[str]:
        """The sites still in that have not finished: when none is left, no round is left to rejoin at."""
        return set(self.active()) - self.finished

    def live(self) -> set[str]:
        """The sites that can still arrive at a barrier: neither finished, out, nor waiting to rejoin."""
        return set(self.sites) - self.finished - set(self.out) - self.rejoining

    def joins_at(self, site: str) -> int:
        return self.joins.get(site, 1)

    def may_rejoin(self, site: str) -> bool:
        """Whether ``site`` has failed fewer than :data:`FAILURES_BEFORE_OUT` times in a row."""
        return self.failures.get(site, (0, 0))[1] < FAILURES_BEFORE_OUT

    def left_out_message(self, site: str) -> str:
        return f"site {site!r} was left out of round {self.failures[site][0] + 1}: {self.out[site]}"

    # -- changes ---------------------------------------------------------------------------------
    def leave_out(self, site: str, reason: str, round: int) -> bool:
        """``site`` is out of round ``round + 1`` (``round``: rounds aggregated so far). Failing again before another
        round is aggregated counts as failing in a row. Returns whether it is now out for good."""
        self.out[site] = reason
        self.rejoining.discard(site)
        self.finished.discard(site)
        last, count = self.failures.get(site, (-1, 0))
        count = count + 1 if last == round else 1
        self.failures[site] = (round, count)
        for_good = count >= FAILURES_BEFORE_OUT
        self.event(round + 1, site, "out for good" if for_good else "left out", reason)
        self.set_status(site, "out" if for_good else "left out")
        return for_good

    def wait_to_rejoin(self, site: str) -> None:
        """``site`` was restarted and waits for the round in progress to end."""
        if site not in self.out:
            raise ValueError(f"site {site!r} is not out of the federation: nothing to rejoin")
        self.rejoining.add(site)
        self.set_status(site, "rejoining")

    def admit(self, next_round: int) -> None:
        """Every site waiting to rejoin takes part from ``next_round`` on."""
        for site in sorted(self.rejoining):
            self.out.pop(site, None)
            self.joins[site] = next_round
            self.set_status(site, "training")
            self.event(next_round, site, "rejoined", f"from round {next_round}")
        self.rejoining.clear()

    def rejoin_finished(self, site: str, round: int) -> None:
        """The run ended while ``site`` was out: it only loads the final model."""
        self.rejoining.discard(site)
        self.out.pop(site, None)
        self.finish(site, "done")
        self.event(round + 1, site, "rejoined", "at the end of the run: loads the final model")

    def enter_late(self, site: str, next_round: int) -> None:
        """A resumed run's site whose checkpoint part is older than the run's round comes in at ``next_round``."""
        self.joins[site] = next_round
        self.event(
            next_round, site, "rejoined", f"from round {next_round} (its checkpoint part is from an earlier round)"
        )

    def finish(self, site: str, status: str) -> None:
        self.finished.add(site)
        self.set_status(site, status)

    def report(self, site: str, status: dict[str, Any]) -> None:
        """What a site says of itself (epoch, step, metrics); a late "training" from a site already out is ignored."""
        if site in self.out and status.get("status") == "training":
            return
        self.status[site] = {**self.status.get(site, {}), **status}

    def set_status(self, site: str, status: str) -> None:
        self.status.setdefault(site, {})["status"] = status

    def event(self, round: int, site: str, event: str, reason: str = "") -> None:
        self.events.append(SiteEvent(round=round, site=site, event=event, reason=reason, time=time.time()))
