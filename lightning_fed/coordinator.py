"""The coordinator: the round barrier between sites, the only place an :class:`Aggregator` runs.

It runs as an asynchronous Ray actor holding no CPU. Sites call it at three kinds of moment, each a barrier
keyed by name so that every site must arrive before any leaves:

- ``sync``: end of every k-th epoch; the aggregator turns the sites' updates into the next global model,
  which is put in the object store once and handed to every site by reference;
- ``agree``: stop/save decisions (EarlyStopping, ModelCheckpoint, max-time) agreed by every site;
- ``merge_metrics``: after validation; sample-weighted scalars and summed metric states, from which every site
  computes the same federated metrics.

A site that fails, dies, or finishes while others wait for it aborts every barrier with the reason, so no
site ever waits forever. Everything here is numpy: the coordinator's process never imports torch or Lightning
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
from lightning_fed.strategies.base import Aggregator, GlobalModel, SiteUpdate


class FederationAborted(RuntimeError):
    """Raised in every waiting site when the federation is stopped (a site failed, died or fell out of step)."""


_PENDING = object()


@dataclass
class _Barrier:
    values: dict[str, Any] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    result: Any = _PENDING
    readers: int = 0


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
    ) -> None:
        self.aggregator = aggregator
        self.layout = layout  # how the sites were placed: a resumed run places them alike (same threads, same floats)
        self._audit: Optional[list[dict[str, Any]]] = [] if audit else None
        self.sites = list(sites)
        self.checkpoint_dir = checkpoint_dir
        self.keep_checkpoints = keep_checkpoints
        self.barrier_timeout = barrier_timeout
        self.max_update_norm_ratio = max_update_norm_ratio
        self.round = 0
        # round 0's global model is the model every site starts from: server optimizers need w_0
        self.global_model: Optional[GlobalModel] = initial_model
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

    # -- barriers --------------------------------------------------------------------------------
    async def _gather(self, key: tuple, site: str, value: Any) -> _Barrier:
        self._raise_if_aborted()
        barrier = self._barriers.setdefault(key, _Barrier())
        barrier.values[site] = value
        if len(barrier.values) == len(self.sites):
            barrier.done.set()
        else:
            self._check_stragglers()
            self._check_deadlock()
        try:
            await asyncio.wait_for(barrier.done.wait(), self.barrier_timeout)
        except asyncio.TimeoutError:
            missing = sorted(set(self.sites) - set(barrier.values))
            self._abort(f"sites {missing} did not reach {key[0]} {key[1]} within barrier_timeout={self.barrier_timeout}s")
        self._raise_if_aborted()
        return barrier

    def _release(self, key: tuple, barrier: _Barrier) -> None:
        barrier.readers += 1
        if barrier.readers == len(self.sites):
            self._barriers.pop(key, None)

    def _check_stragglers(self) -> None:
        for key, barrier in self._barriers.items():
            gone = sorted(self._finished - set(barrier.values))
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
        live = set(self.sites) - self._finished
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

    def _raise_if_aborted(self) -> None:
        if self._aborted is not None:
            raise FederationAborted(self._aborted)

    def _record(self, method: str, site: str, *payload: Any) -> None:
        if self._audit is not None:
            from lightning_fed.audit import describe

            self._audit.append({"method": method, "site": site, "payload": describe(list(payload))})

    def audit_log(self) -> Optional[list[dict[str, Any]]]:
        """The structure of every message sites sent (``audit=True``), in arrival order."""
        return self._audit

    # -- what sites call -------------------------------------------------------------------------
    async def sync(self, site: str, round: int, update: SiteUpdate) -> list:
        """Hand in this site's update for ``round``; returns ``[ref]`` to the new :class:`GlobalModel`."""
        self._record("sync", site, round, update)
        update.site = site
        key = ("round", round)
        barrier = await self._gather(key, site, update)
        if barrier.result is _PENDING:
            updates = [barrier.values[s] for s in self.sites]  # fixed site order: reproducible aggregation
            current = self.global_model.weights if self.global_model else None
            refused = screen(updates, current, self.max_update_norm_ratio)
            if refused:  # never averaged: the global model would carry it to every site
                site, why = next(iter(refused.items()))
                self._abort(f"site {site!r}'s update was refused in round {round}: {why}")
                self._raise_if_aborted()
            t0 = time.monotonic()
            try:
                model = self.aggregator.aggregate(round, updates, self.global_model.weights if self.global_model else None)
            except Exception as err:
                self._abort(f"aggregator {self.aggregator.name or type(self.aggregator).__name__} failed in round {round}: {type(err).__name__}: {err}")
                self._raise_if_aborted()
            self.global_model, self.round = model, round
            if self.checkpoint_dir is not None:
                self._pending_checkpoints[round] = self._server_state()
            barrier.result = [ray.put(model)]
            self._aggregate_seconds.append(time.monotonic() - t0)
            barrier.values = {s: None for s in barrier.values}  # free the updates, keep who arrived
            now = time.monotonic()
            self._round_seconds.append(now - self._last_sync)
            self._last_sync = now
        self._release(key, barrier)
        return barrier.result

    async def agree(self, site: str, key: tuple[str, int], decision: bool, all: bool) -> bool:
        """Every site's decision combined: ``all`` sites agree (``all=True``) or ``any`` site asks.

        ``key`` names the moment, e.g. ``("epoch_end", 3)``: every site must ask in the same order."""
        self._record("agree", site, key, decision, all)
        barrier = await self._gather(key, site, bool(decision))
        result = (all and all_(barrier.values.values())) or (not all and any(barrier.values.values()))
        self._release(key, barrier)
        return bool(result)

    async def merge_metrics(self, site: str, key: Any, payload: dict[str, Any], epoch: int) -> dict[str, Any]:
        """This validation merged over every site: sample-weighted scalars and summed metric states
        (:func:`~lightning_fed.metric_states.merge_reports`), from which each site computes the federated metrics."""
        self._record("merge_metrics", site, key, payload, epoch)
        stage = key[0]
        barrier = await self._gather(key, site, payload)
        if barrier.result is _PENDING:
            payloads = {s: barrier.values[s] for s in self.sites}
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
        self._release(key, barrier)
        return barrier.result

    async def all_gather(self, site: str, key: str, value: Any) -> dict[str, Any]:
        """Every site's ``value`` for ``key`` once all have sent theirs (e.g. public keys for secure aggregation)."""
        self._record("all_gather", site, key, value)
        barrier = await self._gather(("gather", key), site, value)
        values = dict(barrier.values)
        self._release(("gather", key), barrier)
        return values

    def report(self, site: str, status: dict[str, Any]) -> None:
        self._record("report", site, status)
        self._status[site] = {**self._status.get(site, {}), **status}

    def checkpoint_saved(self, site: str, round: int) -> None:
        """A site wrote its part of ``round``'s checkpoint; when all have, the round is committed."""
        self._record("checkpoint_saved", site, round)
        saved = self._saved.setdefault(round, set())
        saved.add(site)
        if saved == set(self.sites) and round in self._pending_checkpoints:
            state = self._pending_checkpoints.pop(round)
            from lightning_fed.checkpoint import commit_round

            try:
                commit_round(self.checkpoint_dir, round, self.sites, state, self.keep_checkpoints)
            except Exception as err:
                self._abort(f"checkpoint of round {round} could not be written: {type(err).__name__}: {err}")
            self._saved.pop(round, None)
            for older in [r for r in self._pending_checkpoints if r < round]:
                self._pending_checkpoints.pop(older)

    def site_finished(self, site: str, error: Optional[str] = None) -> None:
        self._record("site_finished", site, error)
        self._finished.add(site)
        self._status.setdefault(site, {})["status"] = "failed" if error else "done"
        if error:
            self._abort(f"site {site!r} failed: {error}")
        else:
            self._check_stragglers()

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
        }

    def final_global(self) -> Optional[list]:
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


def all_(values: Any) -> bool:
    return all(values)


RemoteCoordinator = ray.remote(num_cpus=0, max_restarts=0)(Coordinator)
