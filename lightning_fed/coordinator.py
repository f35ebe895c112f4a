"""The coordinator: the round barrier between sites, the only place an :class:`Aggregator` runs.

It runs in an asynchronous Ray actor holding no CPU (:mod:`lightning_fed.coordinator_process`). Sites call it at
three kinds of moment, each a barrier (:mod:`lightning_fed.barriers`) that every expected site must arrive at before
any leaves:

- ``sync``: end of every k-th epoch; the aggregator turns the sites' updates into the next global model,
  which is put in the object store once and handed to every site by reference;
- ``agree``: stop/save decisions (EarlyStopping, ModelCheckpoint, max-time) agreed by every site;
- ``merge_metrics``: after validation; sample-weighted scalars and summed metric states, from which every site
  computes the same federated metrics.

A site that fails, dies, or finishes while others wait for it aborts every barrier with the reason, so no
site ever waits forever; with ``on_site_failure="continue"`` it is left out instead (:mod:`lightning_fed.roster`):
the barriers it was expected at complete without it, and it rejoins at the start of a later round
(:meth:`Coordinator.rejoin`). Rounds are committed to disk as the sites save their parts (:mod:`lightning_fed.commits`).
Everything here is numpy: the coordinator's process never imports Lightning, nor torch unless an aggregator's server
half does (DP-FedAvg's privacy accountant, opacus, brings it in); checkpoints are committed without torch.
"""

from __future__ import annotations

import builtins
import copy
import time
from dataclasses import dataclass
from typing import Any, Optional

import ray

from lightning_fed.aggregation_step import RoundAggregation
from lightning_fed.audit import describe
from lightning_fed.barriers import Barrier, BarrierKey, Barriers, FederationAborted, SiteLeftOut
from lightning_fed.commits import RoundCommits, check_resumable
from lightning_fed.config import Checkpointing, Reliability
from lightning_fed.metric_states import merge_reports
from lightning_fed.record import RunRecord
from lightning_fed.results import MergedValidation, ProgressSnapshot
from lightning_fed.roster import Roster
from lightning_fed.strategies.base import Aggregator, FollowUp, GlobalModel, SiteUpdate
from lightning_fed.traffic import TrafficLedger, wire_size

__all__ = ["Coordinator", "FederationAborted", "RejoinPoint", "SiteLeftOut"]


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
    """Round barrier, aggregation, agreed decisions and checkpoint commits for one federation.

    Args:
        aggregator: the rule's server half.
        sites: every site, in the federation's order (aggregation combines them in this order: reproducible).
        sync_every: epochs per round (a site that rejoins at a round is expected at that round's epochs on).
        reliability: what the run tolerates: failed sites left out or not, ``min_sites``, deadlines, update screening.
        checkpointing: how many committed rounds stay on disk.
        checkpoint_dir: where this run commits its rounds (``None``: it writes none).
        audit: record the structure of every message a site sends (:meth:`audit_log`).
        server_state: the server's state in the checkpoint a resumed run starts from.
        initial_model: round 0's global model, the one every site starts from (server optimizers need ``w_0``).
        layout: how the sites were placed; a resumed run places them alike (same threads, same floats).
        parts: each site's part in the resumed checkpoint, with the round the part is from.
    """

    def __init__(
        self,
        aggregator: Aggregator,
        sites: list[str],
        *,
        sync_every: int = 1,
        reliability: Reliability = Reliability(),
        checkpointing: Checkpointing = Checkpointing(),
        checkpoint_dir: Optional[str] = None,
        audit: bool = False,
        server_state: Optional[dict[str, Any]] = None,
        initial_model: Optional[GlobalModel] = None,
        layout: Optional[dict[str, Any]] = None,
        parts: Optional[dict[str, tuple[str, int]]] = None,
    ) -> None:
        self.aggregator, self.reliability, self.layout = aggregator, reliability, layout
        self.sites = list(sites)
        self.round = 0
        self.global_model: Optional[GlobalModel] = initial_model
        self.roster = Roster(self.sites)
        self.barriers = Barriers(self.roster, sync_every, reliability, on_late=self._late)
        self.aggregation = RoundAggregation(aggregator, reliability, stop=self.barriers.stop)  # a round's closing
        self.commits = RoundCommits(checkpoint_dir, self.sites, checkpointing.keep, parts)
        self._traffic = TrafficLedger()  # bytes per site and round (lightning_fed.traffic)
        self._audit: Optional[list[dict[str, Any]]] = [] if audit else None
        if server_state is not None:
            self._load_server_state(server_state)
        self.record = RunRecord()

    def _heard(self, method: str, site: str, *payload: Any, update: bool = False) -> None:
        """A site's message arrived: its structure goes into the audit log (``audit=True``), its size into the traffic
        ledger (``update``: it is the site's hand-over)."""
        if self._audit is not None:
            self._audit.append({"method": method, "site": site, "payload": describe(list(payload))})
        self._traffic.sent(site, wire_size((site, *payload)), update=update)

    def audit_log(self) -> Optional[list[dict[str, Any]]]:
        """The structure of every message sites sent (``audit=True``), in arrival order."""
        return self._audit

    # -- continue mode: leaving out and rejoining --------------------------------------------------
    def _late(self, missing: list[str], what: str) -> None:
        """Sites that did not reach a barrier in time: left out (continue mode), or the run stops."""
        if not self.reliability.tolerant:
            self.barriers.abort(f"sites {missing} did not reach {what}")
            return
        for late in missing:
            self.barriers.leave_out(late, f"missed {what}", self.round)

    def leave_out(self, site: str, reason: str) -> bool:
        """Leave ``site`` out (the driver saw it fail or its worker die). ``False`` if the run aborts instead, or the
        site has failed too often to come back."""
        self.barriers.leave_out(site, reason, self.round)
        return self.barriers.aborted is None and self.roster.may_rejoin(site)

    async def rejoin(self, site: str) -> RejoinPoint:
        """Called by a site that was left out, once restarted: waits for the round in progress to be aggregated and
        returns where the site comes back in (it takes part in every barrier from the next round on)."""
        self._heard("rejoin", site)
        if not await self.barriers.rejoin(site):  # the run ended meanwhile: the site only loads the final model
            self.roster.rejoin_finished(site, self.round)
            return RejoinPoint(self.round, self.final_global(), self.roster.carry.get(site), finished=True)
        joins = self.roster.joins_at(site)
        self._traffic.joins_at(site, joins)
        if self.global_model is not None:  # the global model it starts from
            self._traffic.received(site, wire_size(self.global_model))
        return RejoinPoint(joins, self.final_global(), self.roster.carry.get(site), finished=False)

    def entry_point(self, site: str) -> RejoinPoint:
        """Where a resumed run's site comes in whose checkpoint part is older than the round (it was out of it):
        at the next round, from the round's global model."""
        self.roster.enter_late(site, self.round + 1)
        return RejoinPoint(self.round + 1, self.final_global(), self.roster.carry.get(site), finished=False)

    # -- rounds ----------------------------------------------------------------------------------
    async def sync(self, site: str, round: int, update: SiteUpdate, carry: Any = None) -> Any:
        """Hand in this site's update for ``round``; returns ``[ref]`` to the new :class:`GlobalModel`, or a
        :class:`FollowUp` when the aggregator needs one more answer from the round's sites first (:meth:`follow_up`).

        ``carry``: what the site needs back if it is restarted after this hand-over (its privacy accountant)."""
        self._heard("sync", site, round, update, carry, update=True)
        update.site = site
        key = BarrierKey.hand_over(round)
        barrier = await self.barriers.gather(key, site, (update, carry))
        if not barrier.decided and barrier.question is None:
            self._close_round(round, barrier)
        if not barrier.decided:  # the aggregator asked the round's sites a question
            asked = FollowUp(round, barrier.question)
            self._traffic.received(site, wire_size(asked))
            return asked
        self.barriers.raise_if_stopped(site)
        self.barriers.release(key, barrier, site)
        return barrier.result

    async def follow_up(self, site: str, round: int, answer: Any) -> list:
        """This site's answer to the aggregator's question of ``round``; returns ``[ref]`` to the new global model
        once every site of the round that is still in has answered."""
        self._heard("follow_up", site, round, answer)
        key, answers_key = BarrierKey.hand_over(round), BarrierKey.answers(round)
        barrier = self.barriers.get(key)
        if barrier is None or barrier.question is None:
            raise ValueError(f"site {site!r} answered a question of round {round} that was never asked")
        answers = await self.barriers.gather(answers_key, site, answer)
        if not barrier.decided:
            self.aggregation.receive_answers(round, {s: answers.values[s] for s in self.barriers.present(answers)})
            self._aggregate_round(round, barrier, barrier.pending)
        self.barriers.release(answers_key, answers, site)
        self.barriers.raise_if_stopped(site)
        self.barriers.release(key, barrier, site)
        return barrier.result

    def _close_round(self, round: int, barrier: Barrier) -> None:
        """Every update of ``round`` is in: decode, screen, aggregate (or ask the sites the aggregator's question)."""
        updates = {s: barrier.values[s][0] for s in self.barriers.present(barrier)}  # site order: reproducible
        received = self.aggregation.receive(round, updates, self.global_model)
        for bad, why in received.refused.items():  # never averaged: the global model would carry it to every site
            self.barriers.leave_out(bad, f"sent an update that was refused in round {round}: {why}", self.round)
        self.barriers.raise_if_aborted()
        question = self.aggregation.follow_up(round, received.kept)
        if question is not None:  # the round's updates wait for the answers
            barrier.question, barrier.pending = question, received.kept
            return
        self._aggregate_round(round, barrier, received.kept)

    def _aggregate_round(self, round: int, barrier: Barrier, kept: dict[str, SiteUpdate]) -> None:
        """``kept``'s updates combined into the new global model, which every site of the round takes away."""
        t0 = time.monotonic()
        model = self.aggregation.aggregate(round, kept, self.global_model)
        present = list(kept)
        for s in present:
            self.roster.carry[s] = barrier.values[s][1]
        self.global_model, self.round = model, round
        if self.commits.enabled:
            self.commits.aggregated(round, self.server_state())
        barrier.result, barrier.pending = [ray.put(model)], None
        model_bytes = wire_size(model)
        for s in present:  # the model every site of the round fetches, counted in the round
            self._traffic.received(s, model_bytes)
            self._traffic.round_ended(s, round)
        aggregate_seconds = time.monotonic() - t0
        barrier.values = {s: None for s in barrier.values}  # free the updates, keep who arrived
        self.record.round(present, model.extras.get("metrics", {}), self.barriers.round_ended(round), aggregate_seconds)

    # -- what else sites call --------------------------------------------------------------------
    async def agree(self, site: str, key: Any, decision: bool, all: bool) -> bool:
        """Every site's decision combined: ``all`` sites agree (``all=True``) or ``any`` site asks.

        ``key`` names the moment, e.g. ``("epoch_end", 3)`` (:meth:`BarrierKey.from_site`): every site must ask in
        the same order."""
        self._heard("agree", site, key, decision, all)
        moment = BarrierKey.from_site(key)
        barrier = await self.barriers.gather(moment, site, bool(decision))
        values = [barrier.values[s] for s in self.barriers.present(barrier)]
        result = builtins.all(values) if all else any(values)
        self.barriers.release(moment, barrier, site)
        self._traffic.received(site, wire_size(result))
        return result

    async def merge_metrics(self, site: str, key: Any, payload: dict[str, Any], epoch: int) -> dict[str, Any]:
        """This validation merged over every site: sample-weighted scalars and summed metric states
        (:func:`~lightning_fed.metric_states.merge_reports`), from which each site computes the federated metrics.
        ``key``: ``(stage, epoch, n)``, the epoch's n-th validation."""
        self._heard("merge_metrics", site, key, payload, epoch)
        moment = BarrierKey.from_site(key)
        barrier = await self.barriers.gather(moment, site, payload)
        if not barrier.decided:
            payloads = {s: barrier.values[s] for s in self.barriers.present(barrier)}
            merged = merge_reports(payloads)
            sites = {s: {**p["scalars"], **(p.get("site_values") or {})} for s, p in payloads.items()}
            self.record.validation(MergedValidation(moment.kind, epoch, self.round, merged, sites))
            barrier.result = merged
            barrier.result_bytes = wire_size(merged)  # every site receives the same merge: measured once
        self.barriers.release(moment, barrier, site)
        self._traffic.received(site, barrier.result_bytes)
        return barrier.result

    async def all_gather(self, site: str, key: str, value: Any) -> dict[str, Any]:
        """Every site's ``value`` for ``key`` once all have sent theirs (e.g. public keys for secure aggregation)."""
        self._heard("all_gather", site, key, value)
        exchange = BarrierKey.exchange(key)
        barrier = await self.barriers.gather(exchange, site, value)
        values = {s: barrier.values[s] for s in self.barriers.present(barrier)}
        self.barriers.release(exchange, barrier, site)
        self._traffic.received(site, wire_size(values))
        return values

    def report(self, site: str, status: dict[str, Any]) -> None:
        self._heard("report", site, status)
        self.roster.report(site, status)

    def checkpoint_saved(self, site: str, round: int) -> None:
        """A site wrote its part of ``round``'s checkpoint; when every site in that round has, the round is
        committed (the part of a site that was out is its latest earlier one)."""
        self._heard("checkpoint_saved", site, round)
        self.commits.saved(site, round)
        self._commit_if_complete(round)

    def _commit_if_complete(self, round: int) -> None:
        error = self.commits.commit_if_complete(round, self.barriers.expected(BarrierKey.hand_over(round)))
        if error is not None:
            self.barriers.abort(error)

    def site_finished(self, site: str, error: Optional[str] = None) -> None:
        self._heard("site_finished", site, error)
        if site in self.roster.out:
            return  # its fit ended because it was left out: the driver restarts it
        if error and self.reliability.tolerant:
            self.barriers.leave_out(site, f"failed: {error}", self.round)
            return
        self.roster.finish(site, "failed" if error else "done")
        if error:
            self.barriers.abort(f"site {site!r} failed: {error}")
            return
        self.barriers.check_stragglers()
        self.barriers.wake_rejoiners_if_over()
        for round in self.commits.waiting():
            self._commit_if_complete(round)

    # -- what the driver calls -------------------------------------------------------------------
    def start_clock(self) -> None:
        """Round timings count from here (the sites' start-up is not part of round 1)."""
        self.barriers.round_started = time.monotonic()

    def abort(self, reason: str) -> None:
        self.barriers.abort(reason)

    def abort_reason(self) -> Optional[str]:
        return self.barriers.aborted

    def progress(self, since: int = 0) -> ProgressSnapshot:
        """Where the run stands; ``history`` holds the merged validations from the ``since``-th on."""
        # traffic's last entry: the round in progress
        return self.record.snapshot(
            self.round, self.roster, self.barriers.aborted, self._traffic.per_site(self.round + 1), since
        )

    def traffic(self) -> dict[str, dict[str, list[int]]]:
        """Bytes each site sent and received per round, the messages after the last round counted in it."""
        return self._traffic.per_site(self.round)

    def final_global(self) -> Optional[list]:
        """``[ref]`` to the current global model (``None`` before there is one)."""
        return None if self.global_model is None else [ray.put(self.global_model)]

    # -- state -----------------------------------------------------------------------------------
    def server_state(self) -> dict[str, Any]:
        """What a round checkpoint keeps of the server: enough to resume the run exactly."""
        return {
            "round": self.round,
            "aggregator": type(self.aggregator).__name__,
            "aggregator_name": self.aggregator.name,
            "aggregator_state": copy.deepcopy(self.aggregator.state_dict()),
            "global_model": self.global_model,
            "sites": list(self.sites),
            "layout": self.layout,
            "carry": copy.deepcopy(self.roster.carry),
            "traffic": self._traffic.state(),
        }

    def _load_server_state(self, state: dict[str, Any]) -> None:
        check_resumable(state, self.aggregator.name, self.sites)
        self.aggregator.load_state_dict(state["aggregator_state"])
        self.global_model = state["global_model"]
        self.round = int(state["round"])
        self.roster.carry = dict(state.get("carry") or {})
        self._traffic = TrafficLedger(state.get("traffic"))
