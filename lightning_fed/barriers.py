"""Barriers: every site expected at a moment arrives before any leaves, or the run stops and every waiting site
learns why.

A barrier is named by a :class:`BarrierKey`: what kind of moment it is and the round or epoch it belongs to, which
decides the sites it waits for (a site that rejoins at round ``r`` is expected from round ``r``'s epochs on).
:class:`Barriers` keeps the open ones, reading who is out or back in from the :class:`~lightning_fed.roster.Roster`.
Torch-free: this runs in the coordinator's process.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn, Optional

from lightning_fed.config import Reliability
from lightning_fed.roster import Roster


class FederationAborted(RuntimeError):
    """Raised in every waiting site when the federation is stopped (a site failed, died or fell out of step)."""


class SiteLeftOut(RuntimeError):
    """Raised in a site that was left out of the federation (continue mode): its fit ends, and it rejoins."""


@dataclass(frozen=True)
class BarrierKey:
    """One barrier's name: its ``kind`` and the ``round`` or ``epoch`` it belongs to (never both), and ``tag``, what
    else tells apart two barriers of that kind (an epoch's second validation, the name of a key exchange).

    Sites name the moments they agree on as tuples, kind first, epoch second (``("epoch_end", 3)``,
    ``("val", 3, 2)``): :meth:`from_site` reads them, so the wire stays plain data."""

    kind: str
    round: Optional[int] = None
    epoch: Optional[int] = None
    tag: tuple = ()

    @classmethod
    def hand_over(cls, round: int) -> "BarrierKey":
        """Where the sites hand in their updates of ``round``."""
        return cls("round", round=round)

    @classmethod
    def answers(cls, round: int) -> "BarrierKey":
        """Where the sites answer the aggregator's follow-up question of ``round``."""
        return cls("answer", round=round)

    @classmethod
    def exchange(cls, name: str) -> "BarrierKey":
        """A key exchange by name (``all_gather``): every site still in takes part, whatever its round."""
        return cls("gather", tag=(name,))

    @classmethod
    def from_site(cls, key: Any) -> "BarrierKey":
        """The key a site sent: ``(kind, epoch, *rest)``, or ``(kind, *rest)`` for a moment tied to no epoch."""
        if isinstance(key, BarrierKey):
            return key
        kind, *rest = key if isinstance(key, (tuple, list)) else (key,)
        if rest and isinstance(rest[0], int) and not isinstance(rest[0], bool):
            return cls(str(kind), epoch=rest[0], tag=tuple(rest[1:]))
        return cls(str(kind), tag=tuple(rest))

    def expects(self, joins_at: int, sync_every: int) -> bool:
        """Whether a site that takes part from round ``joins_at`` on is expected here."""
        if self.round is not None:
            return joins_at <= self.round
        if self.epoch is not None:  # round r's epochs are (r - 1) * sync_every onwards
            return (joins_at - 1) * sync_every <= self.epoch
        return True

    def __str__(self) -> str:
        where = (
            self.round if self.round is not None else self.epoch if self.epoch is not None else (self.tag or ("",))[0]
        )
        return f"{self.kind} {where}".strip()


_PENDING = object()


@dataclass
class Barrier:
    """One open barrier: what each site brought, and what every site takes away once it completes."""

    values: dict[str, Any] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    result: Any = _PENDING
    readers: set = field(default_factory=set)
    question: Any = None  # the aggregator's follow-up question of a round barrier, while the sites answer it
    pending: Any = None  # that round's (sites, decoded updates), kept until the answers are in
    result_bytes: int = 0  # the serialized size of ``result`` (what each reader receives)

    @property
    def decided(self) -> bool:
        """Whether the barrier's result was computed (by the first site to leave it)."""
        return self.result is not _PENDING


class Barriers:
    """The federation's open barriers and the sites they wait for; why the run stopped, if it did (every barrier then
    ends with that reason); and, with ``on_site_failure="continue"``, sites left out of the barriers and let back in
    at a round's end.

    ``on_late(sites, what)``: called with the sites still missing when a barrier's time is up (they are left out, or
    the run stops)."""

    def __init__(
        self, roster: Roster, sync_every: int, reliability: Reliability, on_late: Callable[[list[str], str], None]
    ) -> None:
        self.roster, self.sync_every, self.reliability = roster, sync_every, reliability
        self.timeout, self.round_timeout = reliability.barrier_timeout, reliability.round_timeout
        self.on_late = on_late
        self.aborted: Optional[str] = None
        self.round_started = time.monotonic()  # a round's deadline counts from the previous round's model
        self._open: dict[BarrierKey, Barrier] = {}
        self._round_event = asyncio.Event()  # set (and replaced) when a round is aggregated or the run ends

    def expected(self, key: BarrierKey) -> set[str]:
        """The sites ``key`` waits for: every site, less those out, less those that take part from a later round."""
        return {s for s in self.roster.active() if key.expects(self.roster.joins_at(s), self.sync_every)}

    # -- arriving and leaving --------------------------------------------------------------------
    async def gather(self, key: BarrierKey, site: str, value: Any) -> Barrier:
        """Hand in ``site``'s ``value`` and wait until every expected site has (raises if the run stops meanwhile,
        or ``site`` is left out)."""
        self.raise_if_stopped(site)
        barrier = self._open.setdefault(key, Barrier())
        barrier.values[site] = value
        self._complete_if_ready(key, barrier)
        if not barrier.done.is_set():
            self.check_stragglers()
            self._check_deadlock()
        timeout, what = self._deadline(key)
        try:
            await asyncio.wait_for(asyncio.shield(barrier.done.wait()), timeout)
        except asyncio.TimeoutError:
            self.on_late(sorted(self.expected(key) - set(barrier.values)), what)
            await barrier.done.wait()
        self.raise_if_stopped(site)
        return barrier

    def _deadline(self, key: BarrierKey) -> tuple[Optional[float], str]:
        if key.kind == "round" and self.round_timeout is not None:
            left = max(0.0, self.round_timeout - (time.monotonic() - self.round_started))
            what = f"round {key.round}'s deadline (round_timeout={self.round_timeout:g}s)"
            return (left if self.timeout is None else min(self.timeout, left)), what
        return self.timeout, f"{key} within barrier_timeout={self.timeout}s"

    def get(self, key: BarrierKey) -> Optional[Barrier]:
        return self._open.get(key)

    def release(self, key: BarrierKey, barrier: Barrier, site: str) -> None:
        """``site`` took the barrier's result; once every site still in has, the barrier is forgotten."""
        barrier.readers.add(site)
        if set(barrier.values) - set(self.roster.out) <= barrier.readers:
            self._open.pop(key, None)

    def present(self, barrier: Barrier) -> list[str]:
        """The sites whose values a completed barrier combines, in the federation's site order (reproducible)."""
        return [s for s in self.roster.sites if s in barrier.values and s not in self.roster.out]

    def complete_ready(self) -> None:
        """Complete every barrier that no longer waits for anyone (after a site was left out)."""
        for key, barrier in list(self._open.items()):
            self._complete_if_ready(key, barrier)

    def _complete_if_ready(self, key: BarrierKey, barrier: Barrier) -> None:
        if not barrier.done.is_set() and set(barrier.values) >= self.expected(key):
            barrier.done.set()

    # -- sites out of step -----------------------------------------------------------------------
    def check_stragglers(self) -> None:
        """Stop the run if a site finished while others wait for it at a barrier."""
        for key, barrier in self._open.items():
            gone = sorted((self.roster.finished & self.expected(key)) - set(barrier.values))
            if gone and not barrier.done.is_set():
                self.abort(
                    f"site(s) {gone} finished while {sorted(barrier.values)} wait at {key}: the sites fell out of "
                    "step (give every site the same max_epochs/max_steps and validation schedule)"
                )
                return

    def _check_deadlock(self) -> None:
        """Every live site waits, but at different barriers: none can ever complete."""
        waiting = {site: key for key, b in self._open.items() if not b.done.is_set() for site in b.values}
        live = self.roster.live()
        if live and set(waiting) >= live and len({waiting[s] for s in live}) > 1:
            where = ", ".join(f"{s} at {waiting[s]}" for s in sorted(live))
            self.abort(
                f"sites are waiting at different points ({where}): they fell out of step; give every site the same "
                "validation schedule (val_check_interval as a fraction of an epoch, check_val_every_n_epoch) and epochs"
            )

    # -- continue mode: sites left out of the barriers, and let back in at a round's end ------------
    def leave_out(self, site: str, reason: str, round: int) -> None:
        """Leave ``site`` out of round ``round + 1`` on: the barriers complete without it. Where failures are not
        tolerated, or too few sites would be left (``min_sites``), the run stops instead."""
        if site in self.roster.out or site not in self.roster.sites or self.aborted is not None:
            return
        if not self.reliability.tolerant:
            self.abort(f"site {site!r} {reason}")
            return
        self.roster.leave_out(site, reason, round)
        active, fewest = self.roster.active(), self.reliability.min_sites or 1
        if len(active) < fewest:
            self.abort(
                f"site {site!r} {reason}; {len(active)} site(s) left, fewer than min_sites={fewest}: the run stops "
                "here (resume from its last checkpoint once the sites are back)"
            )
            return
        self.complete_ready()
        self.wake_rejoiners_if_over()

    async def rejoin(self, site: str) -> bool:
        """Wait until ``site``, restarted after it was left out, is let back in at the end of the round in progress
        (``True``), or until every site still in has finished (``False``: no round is left to rejoin at)."""
        self.raise_if_aborted()
        self.roster.wait_to_rejoin(site)
        self.wake_rejoiners_if_over()
        while True:
            await self._round_event.wait()
            self.raise_if_aborted()
            if site not in self.roster.rejoining:  # admitted when the round was aggregated (see round_ended)
                return True
            if not self.roster.running():
                return False

    def wake_rejoiners_if_over(self) -> None:
        if self.roster.rejoining and not self.roster.running():
            self._round_event.set()  # every site still in has finished: no round left to rejoin at

    def round_ended(self, round: int) -> float:
        """``round`` was aggregated: the sites waiting to rejoin take part from the next one, the next round's clock
        starts. Returns the seconds the round took."""
        self.roster.admit(round + 1)
        now = time.monotonic()
        seconds, self.round_started = now - self.round_started, now
        event, self._round_event = self._round_event, asyncio.Event()
        event.set()
        return seconds

    # -- stopping --------------------------------------------------------------------------------
    def abort(self, reason: str) -> None:
        """Stop the run: every barrier, and every site waiting to rejoin, ends with ``reason`` (the first one given)."""
        if self.aborted is None:
            self.aborted = reason
        for barrier in self._open.values():
            barrier.done.set()
        self._round_event.set()

    def stop(self, reason: str) -> NoReturn:
        """:meth:`abort`, and raise in the caller (the run's first reason, if it had already stopped)."""
        self.abort(reason)
        raise FederationAborted(self.aborted)

    def raise_if_aborted(self) -> None:
        if self.aborted is not None:
            raise FederationAborted(self.aborted)

    def raise_if_stopped(self, site: str) -> None:
        """Raise in ``site`` if the run stopped or ``site`` was left out of it."""
        self.raise_if_aborted()
        if site in self.roster.out:
            raise SiteLeftOut(self.roster.left_out_message(site))
