"""The aggregator's part of closing a round, once every update of the round is in: each update decoded
(:meth:`~lightning_fed.strategies.base.Aggregator.receive`) and screened (:mod:`lightning_fed.screening`), the
aggregator's follow-up question to the round's sites if it has one, and the new global model.

The :class:`~lightning_fed.coordinator.Coordinator` runs it and applies what comes back to its barriers, roster,
commits and traffic ledger. numpy only, like the coordinator: its process never imports Lightning (torch only with
an aggregator that needs it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Optional

from lightning_fed.config import Reliability
from lightning_fed.screening import screen
from lightning_fed.strategies.base import Aggregator, GlobalModel, SiteUpdate, Weights


@dataclass(frozen=True)
class ReceivedUpdates:
    """A round's updates as the aggregator reads them. ``kept``: decoded, by site in the federation's site order (the
    round combines these, in this order: reproducible). ``refused``: the sites whose update is never averaged, with
    why (the aggregator could not read it, or screening refused it)."""

    kept: dict[str, SiteUpdate]
    refused: dict[str, str]


class RoundAggregation:
    """One aggregator's steps in closing a round: :meth:`receive` the updates, ask its :meth:`follow_up` question,
    :meth:`aggregate` the new global model. When the aggregator raises, or too few updates are kept for
    ``min_sites``, the run stops with one line naming the round.

    Args:
        aggregator: the rule's server half.
        reliability: ``max_update_norm_ratio`` (screening) and ``min_sites``.
        stop: stops the run with a reason and raises in the caller
            (:meth:`~lightning_fed.barriers.Barriers.stop`).
    """

    def __init__(self, aggregator: Aggregator, reliability: Reliability, stop: Callable[[str], NoReturn]) -> None:
        self.aggregator = aggregator
        self.reliability = reliability
        self._stop = stop

    def receive(
        self, round: int, updates: dict[str, SiteUpdate], global_model: Optional[GlobalModel]
    ) -> ReceivedUpdates:
        """``updates`` (by site, in site order) decoded by the aggregator and screened against the round's global
        model (``None`` before there is one)."""
        current = _weights(global_model)
        received, refused = {}, {}
        for site, update in updates.items():
            try:
                received[site] = self.aggregator.receive(update, current)
            except ValueError as err:
                refused[site] = str(err)
        refused.update(screen(list(received.values()), current, self.reliability.max_update_norm_ratio))
        return ReceivedUpdates({s: u for s, u in received.items() if s not in refused}, refused)

    def follow_up(self, round: int, kept: dict[str, SiteUpdate]) -> Any:
        """The aggregator's question to the round's sites before it aggregates ``kept`` (``None``: it aggregates
        now). Fewer updates kept than ``min_sites`` stop the run."""
        fewest = self.reliability.min_sites or 1
        if len(kept) < fewest:
            self._stop(f"only {len(kept)} site(s) reported in round {round}, fewer than min_sites={fewest}")
        try:
            return self.aggregator.follow_up(round, list(kept.values()))
        except Exception as err:
            self._failed(round, err)

    def receive_answers(self, round: int, answers: dict[str, Any]) -> None:
        """The round's sites' answers to the aggregator's question, by site."""
        try:
            self.aggregator.receive_answers(round, answers)
        except Exception as err:
            self._failed(round, err)

    def aggregate(self, round: int, kept: dict[str, SiteUpdate], global_model: Optional[GlobalModel]) -> GlobalModel:
        """The new global model: ``kept`` combined, in site order, with the round's ``global_model``."""
        try:
            return self.aggregator.aggregate(round, list(kept.values()), _weights(global_model))
        except Exception as err:
            self._failed(round, err)

    def _failed(self, round: int, err: Exception) -> NoReturn:
        self._stop(
            f"aggregator {self.aggregator.name or type(self.aggregator).__name__} failed in round {round}: "
            f"{type(err).__name__}: {err}"
        )


def _weights(global_model: Optional[GlobalModel]) -> Optional[Weights]:
    return global_model.weights if global_model else None
