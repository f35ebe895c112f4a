"""The coordinator: the round barrier between sites, the only place an :class:`Aggregator` runs.

It runs as an asynchronous Ray actor holding no CPU. Sites call it at three kinds of moment, each a barrier
keyed by name so that every site must arrive before any leaves:

- ``sync``: end of every k-th epoch; the aggregator turns the sites' updates into the next global model,
  which is put in the object store once and handed to every site by reference;
- ``agree``: stop/save decisions (EarlyStopping, ModelCheckpoint, max-time) agreed by every site;
- ``merge_metrics``: after validation; sample-weighted scalars and summed metric states, from which every site
  computes the same federated metrics.

A site that fails, dies, or finishes while others wait for it aborts every barrier with the reason, so no
site ever waits forever; with ``on_site_failure="continue"`` it is left out instead: the barriers it was
expected at complete without it, and it rejoins at the start of a later round (:meth:`Coordinator.rejoin`).
Keys carry the epoch they belong to, so a site that rejoins at round ``r`` is expected at exactly the barriers
of the epochs from round ``r`` on. Everything here is numpy: the coordinator's process never imports torch or Lightning
(its aggregators are server halves only, checkpoints are committed without torch).
"""

from __future__ import annotations

import asyncio
import copy
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import ray

from lightning_fed.metric_states import merge_reports
from lightning_fed.screening import screen
from lightning_fed.strategies.base import Aggregator, FollowUp, GlobalModel, SiteUpdate
from lightning_fed.traffic import TrafficLedger, wire_size


class FederationAborted(RuntimeError):
    """Raised in every waiting site when the federation is stopped (a site failed, died or fell out of step)."""


class SiteLeftOut(RuntimeError):
    """Raised in a site that was left out of the federation (continue mode): its fit ends, and it rejoins."""


FAILURES_BEFORE_OUT = 3  # a site failing this many times with no round finished in between stays out


_PENDING = object()


@dataclass
class _Barrier:
    values: dict[str, Any] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    result: Any = _PENDING
    readers: set = field(default_factory=set)
    question: Any = None  # the aggregator's follow-up question of a round barrier, while the sites answer it
    pending: Any = None  # that round's (sites, decoded updates), kept until the answers are in
    result_bytes: int = 0  # the serialized size of ``result`` (what each reader receives)


@dataclass(frozen=True)
class RejoinPoint:
    """Where a site that was left out comes back: the round it takes part in next, the global model it starts it
    from, and what it carried at its last hand-over (e.g. its privacy accountant). ``finished``: the federation
    ended while it was out; it only loads the final model."""

    round: int
    model: Optional[list]
    carry: Any
    finished: bool


class Coordinator:
    """Round barrier, aggregation, agreed decisions and checkpoint commits for one federation."""

    def __init__(
        self,
        aggregator: Aggregator,
        sites: list[str],
        checkpoint_dir: Optional[str] = None,
        keep_checkpoints: int = 2,
        barrier_timeout: Optional[float] = None,
        resume_state: Optional[dict[str, Any]] = None,
        initial_model: Optional[GlobalModel] = None,
        audit: bool = False,
        layout: Optional[dict[str, Any]] = None,
        max_update_norm_ratio: Optional[float] = None,
        tolerant: bool = False,
        min_sites: int = 1,
        round_timeout: Optional[float] = None,
        sync_every: int = 1,
        parts: Optional[dict[str, tuple[str, int]]] = None,
    ) -> None:
        self.aggregator = aggregator
        self.layout = layout  # how the sites were placed: a resumed run places them alike (same threads, same floats)
        self._audit: Optional[list[dict[str, Any]]] = [] if audit else None
        self.sites = list(sites)
        self.checkpoint_dir = checkpoint_dir
        self.keep_checkpoints = keep_checkpoints
        self.barrier_timeout = barrier_timeout
        self.max_update_norm_ratio = max_update_norm_ratio
        self.tolerant, self.min_sites, self.round_timeout, self.sync_every = tolerant, min_sites, round_timeout, sync_every
        self.round = 0
        # round 0's global model is the model every site starts from: server optimizers need w_0
        self.global_model: Optional[GlobalModel] = initial_model
        # each site's part in the latest commit, and the round it is from (continue mode: a site out of a round
        # has its latest part linked into that round's folder)
        self._parts: dict[str, tuple[str, int]] = dict(parts or {})
        self._traffic = TrafficLedger()  # bytes per site and round (lightning_fed.traffic)
        if resume_state is not None:
            self._load_server_state(resume_state)
        self._barriers: dict[tuple, _Barrier] = {}
        self._finished: set[str] = set()
        self._aborted: Optional[str] = None
        self._status: dict[str, dict[str, Any]] = {s: {"status": "starting"} for s in self.sites}
        self._history: list[dict[str, Any]] = []
        self._pending_checkpoints: dict[int, dict[str, Any]] = {}
        self._saved: dict[int, set[str]] = {}
        self._round_seconds: list[float] = []
        self._aggregate_seconds: list[float] = []
        self._last_sync = time.monotonic()
        # continue mode: who is out (and why), from which round each site takes part, what each carried last
        self._out: dict[str, str] = {}
        self._joins: dict[str, int] = {}
        self._carry: dict[str, Any] = {}
        self._rejoining: set[str] = set()
        self._failures: dict[str, tuple[int, int]] = {}  # site -> (round when it last failed, failures in a row)
        self._round_event = asyncio.Event()  # set (and replaced) when a round is aggregated or the run ends
        self._events: list[dict[str, Any]] = []
        self._round_sites: list[list[str]] = []
        self._round_metrics: list[dict[str, float]] = []  # what the aggregator reported about each round's model

    # -- who takes part in what --------------------------------------------------------------------
    def _expected(self, key: tuple) -> set[str]:
        """The sites a barrier waits for: every site, less those out, less those that rejoin at a later round."""
        if key[0] in ("round", "answer"):
            first = lambda s: self._joins.get(s, 1) <= key[1]  # noqa: E731
        elif isinstance(key[1], int) and key[0] != "gather":
            first = lambda s: (self._joins.get(s, 1) - 1) * self.sync_every <= key[1]  # noqa: E731  (key[1] is an epoch)
        else:
            first = lambda s: True  # noqa: E731
        return {s for s in self.sites if s not in self._out and first(s)}

    def _complete_if_ready(self, key: tuple, barrier: _Barrier) -> None:
        if not barrier.done.is_set() and set(barrier.values) >= self._expected(key):
            barrier.done.set()

    # -- barriers --------------------------------------------------------------------------------
    async def _gather(self, key: tuple, site: str, value: Any) -> _Barrier:
        self._raise_if_aborted()
        self._raise_if_out(site)
        barrier = self._barriers.setdefault(key, _Barrier())
        barrier.values[site] = value
        self._complete_if_ready(key, barrier)
        if not barrier.done.is_set():
            self._check_stragglers()
            self._check_deadlock()
        timeout = self.barrier_timeout
        if key[0] == "round" and self.round_timeout is not None:
            left = self.round_timeout - (time.monotonic() - self._last_sync)
            timeout = max(0.0, left) if timeout is None else min(timeout, max(0.0, left))
            what = f"round {key[1]}'s deadline (round_timeout={self.round_timeout:g}s)"
        else:
            what = f"{key[0]} {key[1]} within barrier_timeout={self.barrier_timeout}s"
        try:
            await asyncio.wait_for(asyncio.shield(barrier.done.wait()), timeout)
        except asyncio.TimeoutError:
            missing = sorted(self._expected(key) - set(barrier.values))
            if self.tolerant:
                for late in missing:
                    self._leave_out(late, f"missed {what}")
            else:
                self._abort(f"sites {missing} did not reach {what}")
            await barrier.done.wait()
        self._raise_if_aborted()
        self._raise_if_out(site)
        return barrier

    def _release(self, key: tuple, barrier: _Barrier, site: str) -> None:
        barrier.readers.add(site)
        if set(barrier.values) - set(self._out) <= barrier.readers:
            self._barriers.pop(key, None)

    def _present(self, barrier: _Barrier) -> list[str]:
        """The sites whose values a completed barrier combines, in the federation's site order (reproducible)."""
        return [s for s in self.sites if s in barrier.values and s not in self._out]

    def _check_stragglers(self) -> None:
        for key, barrier in self._barriers.items():
            gone = sorted((self._finished & self._expected(key)) - set(barrier.values))
            if gone and not barrier.done.is_set():
                waiting = sorted(barrier.values)
                self._abort(
                    f"site(s) {gone} finished while {waiting} wait at {key[0]} {key[1]}: the sites fell out of step "
                    "(give every site the same max_epochs/max_steps and validation schedule)"
                )
                return

    def _check_deadlock(self) -> None:
        """Every live site waits, but at different barriers: none can ever complete."""
        waiting = {site: key for key, b in self._barriers.items() if not b.done.is_set() for site in b.values}
        live = set(self.sites) - self._finished - set(self._out) - self._rejoining
        if live and set(waiting) >= live and len({waiting[s] for s in live}) > 1:
            where = ", ".join(f"{s} at {waiting[s][0]} {waiting[s][1]}" for s in sorted(live))
            self._abort(
                f"sites are waiting at different points ({where}): they fell out of step; give every site the same "
                "validation schedule (val_check_interval as a fraction of an epoch, check_val_every_n_epoch) and epochs"
            )

    def _abort(self, reason: str) -> None:
        if self._aborted is None:
            self._aborted = reason
        for barrier in self._barriers.values():
            barrier.done.set()
        self._round_event.set()

    def _raise_if_aborted(self) -> None:
        if self._aborted is not None:
            raise FederationAborted(self._aborted)

    def _raise_if_out(self, site: str) -> None:
        if site in self._out:
            raise SiteLeftOut(f"site {site!r} was left out of round {self.round + 1}: {self._out[site]}")

    def _record(self, method: str, site: str, *payload: Any) -> None:
        if self._audit is not None:
            from lightning_fed.audit import describe

            self._audit.append({"method": method, "site": site, "payload": describe(list(payload))})

    def audit_log(self) -> Optional[list[dict[str, Any]]]:
        """The structure of every message sites sent (``audit=True``), in arrival order."""
        return self._audit

    # -- continue mode: leaving out and rejoining --------------------------------------------------
    def _leave_out(self, site: str, reason: str) -> None:
        if site in self._out or site not in self.sites or self._aborted is not None:
            return
        if not self.tolerant:
            self._abort(f"site {site!r} {reason}")
            return
        self._out[site] = reason
        self._rejoining.discard(site)
        self._finished.discard(site)
        last, count = self._failures.get(site, (-1, 0))
        count = count + 1 if last == self.round else 1
        self._failures[site] = (self.round, count)
        stays_out = count >= FAILURES_BEFORE_OUT
        self._event(site, "left out" if not stays_out else "out for good", reason)
        self._status.setdefault(site, {})["status"] = "out" if stays_out else "left out"
        active = [s for s in self.sites if s not in self._out]
        if len(active) < self.min_sites:
            self._abort(f"site {site!r} {reason}; {len(active)} site(s) left, fewer than min_sites={self.min_sites}: "
                        "the run stops here (resume from its last checkpoint once the sites are back)")
            return
        for key, barrier in list(self._barriers.items()):
            self._complete_if_ready(key, barrier)
        self._wake_rejoiners_if_over()

    def _event(self, site: str, event: str, reason: str = "") -> None:
        self._events.append({"round": self.round + 1, "site": site, "event": event, "reason": reason, "time": time.time()})

    def leave_out(self, site: str, reason: str) -> bool:
        """Leave ``site`` out (the driver saw it fail or its worker die). ``False`` if the run aborts instead, or the
        site has failed too often to come back."""
        self._leave_out(site, reason)
        return self._aborted is None and self.may_rejoin(site)

    def may_rejoin(self, site: str) -> bool:
        return self._failures.get(site, (0, 0))[1] < FAILURES_BEFORE_OUT

    def _wake_rejoiners_if_over(self) -> None:
        if self._rejoining and not ({s for s in self.sites if s not in self._out} - self._finished):
            self._round_event.set()  # every site still in has finished: no round left to rejoin at

    async def rejoin(self, site: str) -> RejoinPoint:
        """Called by a site that was left out, once restarted: waits for the round in progress to be aggregated and
        returns where the site comes back in (it takes part in every barrier from the next round on)."""
        self._record("rejoin", site)
        self._traffic.sent(site, wire_size((site,)))
        self._raise_if_aborted()
        if site not in self._out:
            raise ValueError(f"site {site!r} is not out of the federation: nothing to rejoin")
        self._rejoining.add(site)
        self._status.setdefault(site, {})["status"] = "rejoining"
        self._wake_rejoiners_if_over()
        while True:
            event = self._round_event
            await event.wait()
            self._raise_if_aborted()
            if site not in self._rejoining:  # admitted when the round was aggregated (see sync)
                break
            if not ({s for s in self.sites if s not in self._out} - self._finished):
                self._rejoining.discard(site)
                self._out.pop(site, None)
                self._finished.add(site)
                self._event(site, "rejoined", "at the end of the run: loads the final model")
                return RejoinPoint(self.round, self.final_global(), self._carry.get(site), finished=True)
        self._traffic.joins_at(site, self._joins[site])
        if self.global_model is not None:  # the global model it starts from
            self._traffic.received(site, wire_size(self.global_model))
        return RejoinPoint(self._joins[site], self.final_global(), self._carry.get(site), finished=False)

    def entry_point(self, site: str) -> RejoinPoint:
        """Where a resumed run's site comes in whose checkpoint part is older than the round (it was out of it):
        at the next round, from the round's global model."""
        self._joins[site] = self.round + 1
        self._event(site, "rejoined", f"from round {self.round + 1} (its checkpoint part is from an earlier round)")
        return RejoinPoint(self.round + 1, self.final_global(), self._carry.get(site), finished=False)

    def _admit_rejoiners(self, next_round: int) -> None:
        for site in sorted(self._rejoining):
            self._out.pop(site, None)
            self._joins[site] = next_round
            self._status.setdefault(site, {})["status"] = "training"
            self._event(site, "rejoined", f"from round {next_round}")
        self._rejoining.clear()
        event, self._round_event = self._round_event, asyncio.Event()
        event.set()

    # -- what sites call -------------------------------------------------------------------------
    async def sync(self, site: str, round: int, update: SiteUpdate, carry: Any = None) -> Any:
        """Hand in this site's update for ``round``; returns ``[ref]`` to the new :class:`GlobalModel`, or a
        :class:`FollowUp` when the aggregator needs one more answer from the round's sites first (:meth:`follow_up`).

        ``carry``: what the site needs back if it is restarted after this hand-over (its privacy accountant)."""
        self._record("sync", site, round, update)
        self._traffic.sent(site, wire_size((site, round, update, carry)), update=True)
        update.site = site
        key = ("round", round)
        barrier = await self._gather(key, site, (update, carry))
        if barrier.result is _PENDING and barrier.question is None:
            self._close_round(round, barrier)
        if barrier.result is _PENDING:  # the aggregator asked the round's sites a question
            asked = FollowUp(round, barrier.question)
            self._traffic.received(site, wire_size(asked))
            return asked
        self._raise_if_out(site)
        self._release(key, barrier, site)
        return barrier.result

    async def follow_up(self, site: str, round: int, answer: Any) -> list:
        """This site's answer to the aggregator's question of ``round``; returns ``[ref]`` to the new global model
        once every site of the round that is still in has answered."""
        self._record("follow_up", site, round, answer)
        self._traffic.sent(site, wire_size((site, round, answer)))
        key = ("round", round)
        barrier = self._barriers.get(key)
        if barrier is None or barrier.question is None:
            raise ValueError(f"site {site!r} answered a question of round {round} that was never asked")
        answers = await self._gather(("answer", round), site, answer)
        if barrier.result is _PENDING:
            present, received = barrier.pending
            given = {s: answers.values[s] for s in self._present(answers)}
            try:
                self.aggregator.receive_answers(round, given)
            except Exception as err:
                self._aggregator_failed(round, err)
                self._raise_if_aborted()
            self._aggregate_round(round, barrier, present, received)
        self._release(("answer", round), answers, site)
        self._raise_if_out(site)
        self._release(key, barrier, site)
        return barrier.result

    def _aggregator_failed(self, round: int, err: Exception) -> None:
        self._abort(f"aggregator {self.aggregator.name or type(self.aggregator).__name__} failed in round {round}: {type(err).__name__}: {err}")

    def _close_round(self, round: int, barrier: _Barrier) -> None:
        """Every update of ``round`` is in: decode, screen, and aggregate (or ask the sites the aggregator's question)."""
        present = self._present(barrier)
        current = self.global_model.weights if self.global_model else None
        received, refused = {}, {}
        for s in present:  # fixed site order: reproducible aggregation
            try:
                received[s] = self.aggregator.receive(barrier.values[s][0], current)
            except ValueError as err:
                refused[s] = str(err)
        refused.update(screen(list(received.values()), current, self.max_update_norm_ratio))
        for bad, why in refused.items():  # never averaged: the global model would carry it to every site
            self._leave_out(bad, f"sent an update that was refused in round {round}: {why}")
        self._raise_if_aborted()
        present = [s for s in present if s not in refused]
        if len(present) < self.min_sites:
            self._abort(f"only {len(present)} site(s) reported in round {round}, fewer than min_sites={self.min_sites}")
            self._raise_if_aborted()
        try:
            question = self.aggregator.follow_up(round, [received[s] for s in present])
        except Exception as err:
            self._aggregator_failed(round, err)
            self._raise_if_aborted()
        if question is not None:
            barrier.question, barrier.pending = question, (present, received)
            return
        self._aggregate_round(round, barrier, present, received)

    def _aggregate_round(self, round: int, barrier: _Barrier, present: list[str], received: dict[str, SiteUpdate]) -> None:
        current = self.global_model.weights if self.global_model else None
        t0 = time.monotonic()
        try:
            model = self.aggregator.aggregate(round, [received[s] for s in present], current)
        except Exception as err:
            self._aggregator_failed(round, err)
            self._raise_if_aborted()
        for s in present:
            self._carry[s] = barrier.values[s][1]
        self.global_model, self.round = model, round
        self._round_sites.append(present)
        self._round_metrics.append({k: float(v) for k, v in model.extras.get("metrics", {}).items()})
        if self.checkpoint_dir is not None:
            self._pending_checkpoints[round] = self._server_state()
        barrier.result = [ray.put(model)]
        barrier.pending = None
        model_bytes = wire_size(model)
        for s in present:  # the model every site of the round fetches, counted in the round
            self._traffic.received(s, model_bytes)
            self._traffic.round_ended(s, round)
        self._aggregate_seconds.append(time.monotonic() - t0)
        barrier.values = {s: None for s in barrier.values}  # free the updates, keep who arrived
        now = time.monotonic()
        self._round_seconds.append(now - self._last_sync)
        self._last_sync = now
        self._admit_rejoiners(round + 1)

    async def agree(self, site: str, key: tuple, decision: bool, all: bool) -> bool:
        """Every site's decision combined: ``all`` sites agree (``all=True``) or ``any`` site asks.

        ``key`` names the moment, e.g. ``("epoch_end", 3)``: every site must ask in the same order."""
        self._record("agree", site, key, decision, all)
        self._traffic.sent(site, wire_size((site, key, decision, all)))
        barrier = await self._gather(key, site, bool(decision))
        values = [barrier.values[s] for s in self._present(barrier)]
        result = bool((all and all_(values)) or (not all and any(values)))
        self._release(key, barrier, site)
        self._traffic.received(site, wire_size(result))
        return result

    async def merge_metrics(self, site: str, key: Any, payload: dict[str, Any], epoch: int) -> dict[str, Any]:
        """This validation merged over every site: sample-weighted scalars and summed metric states
        (:func:`~lightning_fed.metric_states.merge_reports`), from which each site computes the federated metrics."""
        self._record("merge_metrics", site, key, payload, epoch)
        self._traffic.sent(site, wire_size((site, key, payload, epoch)))
        stage = key[0]
        barrier = await self._gather(key, site, payload)
        if barrier.result is _PENDING:
            payloads = {s: barrier.values[s] for s in self._present(barrier)}
            merged = merge_reports(payloads)
            self._history.append(
                {
                    "stage": stage,
                    "epoch": epoch,
                    "round": self.round,
                    "merged": merged,
                    "sites": {s: {**p["scalars"], **(p.get("site_values") or {})} for s, p in payloads.items()},
                }
            )
            barrier.result = merged
            barrier.result_bytes = wire_size(merged)  # every site receives the same merge: measured once
        self._release(key, barrier, site)
        self._traffic.received(site, barrier.result_bytes)
        return barrier.result

    async def all_gather(self, site: str, key: str, value: Any) -> dict[str, Any]:
        """Every site's ``value`` for ``key`` once all have sent theirs (e.g. public keys for secure aggregation)."""
        self._record("all_gather", site, key, value)
        self._traffic.sent(site, wire_size((site, key, value)))
        barrier = await self._gather(("gather", key), site, value)
        values = {s: barrier.values[s] for s in self._present(barrier)}
        self._release(("gather", key), barrier, site)
        self._traffic.received(site, wire_size(values))
        return values

    def report(self, site: str, status: dict[str, Any]) -> None:
        self._record("report", site, status)
        self._traffic.sent(site, wire_size((site, status)))
        if site in self._out and status.get("status") == "training":
            return  # a late report from a site already left out
        self._status[site] = {**self._status.get(site, {}), **status}

    def checkpoint_saved(self, site: str, round: int) -> None:
        """A site wrote its part of ``round``'s checkpoint; when every site in that round has, the round is
        committed (the part of a site that was out is its latest earlier one)."""
        self._record("checkpoint_saved", site, round)
        self._traffic.sent(site, wire_size((site, round)))
        saved = self._saved.setdefault(round, set())
        saved.add(site)
        self._commit_if_complete(round)

    def _commit_if_complete(self, round: int) -> None:
        saved = self._saved.get(round, set())
        if round not in self._pending_checkpoints or not saved >= self._expected(("round", round)):
            return
        # a site out of this round: its latest part, found in the latest committed folder (older ones get pruned)
        earlier = {s: self._parts[s] for s in self.sites if s not in saved and s in self._parts}
        missing = [s for s in self.sites if s not in saved and s not in earlier]
        state = self._pending_checkpoints.pop(round)
        from lightning_fed.checkpoint import commit_round, site_checkpoint_path

        try:
            commit_round(self.checkpoint_dir, round, self.sites, state, self.keep_checkpoints, earlier=earlier, absent=missing)
        except Exception as err:
            self._abort(f"checkpoint of round {round} could not be written: {type(err).__name__}: {err}")
        for site in [*saved, *earlier]:
            self._parts[site] = (str(site_checkpoint_path(self.checkpoint_dir, round, site)), round if site in saved else earlier[site][1])
        self._saved.pop(round, None)
        for older in [r for r in self._pending_checkpoints if r < round]:
            self._pending_checkpoints.pop(older)

    def site_finished(self, site: str, error: Optional[str] = None) -> None:
        self._record("site_finished", site, error)
        self._traffic.sent(site, wire_size((site, error)))
        if site in self._out:
            return  # its fit ended because it was left out: the driver restarts it
        if error:
            if self.tolerant:
                self._leave_out(site, f"failed: {error}")
                return
            self._finished.add(site)
            self._status.setdefault(site, {})["status"] = "failed"
            self._abort(f"site {site!r} failed: {error}")
            return
        self._finished.add(site)
        self._status.setdefault(site, {})["status"] = "done"
        self._check_stragglers()
        self._wake_rejoiners_if_over()
        for round in list(self._pending_checkpoints):
            self._commit_if_complete(round)

    # -- what the driver calls -------------------------------------------------------------------
    def start_clock(self) -> None:
        """Round timings count from here (the sites' start-up is not part of round 1)."""
        self._last_sync = time.monotonic()

    def abort(self, reason: str) -> None:
        self._abort(reason)

    def abort_reason(self) -> Optional[str]:
        return self._aborted

    def progress(self, since: int = 0) -> dict[str, Any]:
        return {
            "round": self.round,
            "sites": copy.deepcopy(self._status),
            "history": self._history[since:],
            "history_len": len(self._history),
            "round_seconds": list(self._round_seconds),
            "aggregate_seconds": list(self._aggregate_seconds),
            "aborted": self._aborted,
            "events": list(self._events),
            "round_sites": [list(r) for r in self._round_sites],
            "round_metrics": [dict(m) for m in self._round_metrics],
            "traffic": self._traffic.per_site(self.round + 1),  # the last entry: the round in progress
        }

    def traffic(self) -> dict[str, dict[str, list[int]]]:
        """Bytes each site sent and received per round, the messages after the last round counted in it."""
        return self._traffic.per_site(self.round)

    def final_global(self) -> Optional[list]:
        """``[ref]`` to the current global model (``None`` before there is one)."""
        return None if self.global_model is None else [ray.put(self.global_model)]

    def server_state(self) -> dict[str, Any]:
        return self._server_state()

    # -- state -----------------------------------------------------------------------------------
    def _server_state(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "aggregator": type(self.aggregator).__name__,
            "aggregator_name": self.aggregator.name,
            "aggregator_state": copy.deepcopy(self.aggregator.state_dict()),
            "global_model": self.global_model,
            "sites": list(self.sites),
            "layout": self.layout,
            "carry": copy.deepcopy(self._carry),
            "traffic": self._traffic.state(),
        }

    def _load_server_state(self, state: dict[str, Any]) -> None:
        if state.get("aggregator_name") != self.aggregator.name:
            raise ValueError(
                f"checkpoint was written by aggregator {state.get('aggregator_name')!r}, this run uses {self.aggregator.name!r}: "
                "resume with the same aggregator"
            )
        if sorted(state.get("sites", [])) != sorted(self.sites):
            raise ValueError(f"checkpoint has sites {state.get('sites')}, this run has {self.sites}: resume with the same sites")
        self.aggregator.load_state_dict(state["aggregator_state"])
        self.global_model = state["global_model"]
        self.round = int(state["round"])
        self._carry = dict(state.get("carry") or {})
        self._traffic = TrafficLedger(state.get("traffic"))


def all_(values: Any) -> bool:
    return all(values)


RemoteCoordinator = ray.remote(num_cpus=0, max_restarts=0)(Coordinator)
