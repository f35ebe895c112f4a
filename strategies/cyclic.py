"""Cyclic weight transfer (Chang et al., 2018; FLamby's ``Cyclic``): the model visits the sites one after another,
each training it from the model the previous site handed on.

    round r,  cycle c = (r - 1) // n,  position p = (r - 1) mod n       (n sites)
    every site k:  w_k  <- K local steps from w_{r-1}
    server:        w_r  =  w_{pi_c(p)}                                  (the turn site's update, every tensor)
    pi_c = the sites in federation order (deterministic_cycle=True), or a fresh permutation for every cycle drawn
           from numpy's default_rng(seed) (FLamby's reshuffle: the same orders as FLamby's Cyclic for the same seed)

So round r's global model is the turn site's K steps from the previous turn site's model: exactly the sequence of
models cyclic weight transfer produces, with every site visited once per cycle. The cost: the machinery trains every
site every round, and the n - 1 updates that are not the turn site's are discarded (n times the compute of one
visit, in the wall time of one when sites train in parallel; bytes as FedAvg). The cycle order and the generator
are server state, saved in every round checkpoint. A round without the turn site's update cannot be aggregated, so
continue mode is refused.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from lightning_fed.strategies.base import Aggregator, GlobalModel, SiteUpdate, Weights
from lightning_fed.strategies.registry import register_aggregator


@register_aggregator("cyclic")
class Cyclic(Aggregator):
    """The global model of round r is the update of the site whose turn it is; sites take turns in cycles."""

    def __init__(self, deterministic_cycle: bool = False, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"cyclic seed must be an integer >= 0, got {seed!r}")
        self.deterministic_cycle = bool(deterministic_cycle)
        self.seed = int(seed)
        self._sites: list[str] = []  # the federation's site order (prepare), else the first round's
        self._rng = np.random.default_rng(self.seed)
        self._cycle = -1  # index of the cycle ``_order`` belongs to (-1: none drawn yet)
        self._order: list[str] = []

    def check_partial_rounds(self) -> None:
        raise ValueError(
            "cyclic hands on the model of the site whose turn it is, and a round without that site has none to "
            "hand on: use on_site_failure='abort' with cyclic"
        )

    def prepare(self, sites: list[str]) -> None:
        if len(set(sites)) != len(sites):
            raise ValueError(f"cyclic needs distinct site names, got {sites}")
        self._sites = list(sites)

    def turn(self, round: int) -> str:
        """The site whose update becomes round ``round``'s global model (rounds asked in increasing order: a
        seeded cycle is drawn when its first round is asked)."""
        if not self._sites:
            raise ValueError("cyclic does not know the sites yet: call prepare(sites) or aggregate a round first")
        if round < 1:
            raise ValueError(f"rounds count from 1, got {round}")
        cycle, position = divmod(round - 1, len(self._sites))
        if cycle < self._cycle:
            raise ValueError(
                f"cyclic is at cycle {self._cycle + 1} and cannot go back to round {round} (cycle {cycle + 1}): "
                "resume from the checkpoint of an earlier round instead"
            )
        while self._cycle < cycle:
            self._order = self._draw()
            self._cycle += 1
        return self._order[position]

    def _draw(self) -> list[str]:
        if self.deterministic_cycle:
            return list(self._sites)
        return [self._sites[i] for i in self._rng.permutation(len(self._sites))]

    def aggregate(self, round: int, updates: list[SiteUpdate], current: Optional[Weights]) -> GlobalModel:
        if not self._sites:  # aggregated without prepare (e.g. by hand): the round's sites, in the order given
            self.prepare([u.site for u in updates])
        site = self.turn(round)
        chosen = next((u for u in updates if u.site == site), None)
        if chosen is None:
            raise ValueError(
                f"round {round} is site {site!r}'s turn but its update is not among the round's "
                f"({sorted(u.site for u in updates)}): cyclic cannot skip a turn, rerun with every site"
            )
        weights = {k: np.array(v, copy=True) for k, v in chosen.weights.items()}  # never a view of a site's update
        return GlobalModel(
            weights=weights, round=round, extras={"metrics": {"cyclic_site": float(self._sites.index(site))}}
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "sites": list(self._sites),
            "cycle": self._cycle,
            "order": list(self._order),
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sites = list(state["sites"])
        self._cycle = int(state["cycle"])
        self._order = list(state["order"])
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = state["rng"]
