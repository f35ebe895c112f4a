"""What a running federation has done so far, round by round, kept by the coordinator for the driver's progress view,
loggers and :class:`~lightning_fed.results.FitResult`: the sites each round combined, the aggregator's figures about
each round's model, how long each round and its aggregation took, and every merged validation. Torch-free.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

from lightning_fed.results import MergedValidation, ProgressSnapshot
from lightning_fed.roster import Roster


class RunRecord:
    """The rounds and validations of one run, in order."""

    def __init__(self) -> None:
        self.validations: list[MergedValidation] = []
        self.round_seconds: list[float] = []
        self.aggregate_seconds: list[float] = []
        self.round_sites: list[list[str]] = []
        self.round_metrics: list[dict[str, float]] = []  # what the aggregator reported about each round's model

    def round(self, sites: list[str], metrics: dict[str, Any], seconds: float, aggregate_seconds: float) -> None:
        """A round was aggregated from ``sites`` in ``aggregate_seconds`` (``seconds`` since the previous one)."""
        self.round_sites.append(list(sites))
        self.round_metrics.append({k: float(v) for k, v in metrics.items()})
        self.round_seconds.append(seconds)
        self.aggregate_seconds.append(aggregate_seconds)

    def validation(self, merged: MergedValidation) -> None:
        self.validations.append(merged)

    def snapshot(
        self,
        round: int,
        roster: Roster,
        aborted: Optional[str],
        traffic: dict[str, dict[str, list[int]]],
        since: int = 0,
    ) -> ProgressSnapshot:
        """Where the run stands after ``round`` rounds, with the merged validations from the ``since``-th on."""
        return ProgressSnapshot(
            round=round,
            sites=copy.deepcopy(roster.status),
            history=self.validations[since:],
            history_len=len(self.validations),
            round_seconds=list(self.round_seconds),
            aggregate_seconds=list(self.aggregate_seconds),
            aborted=aborted,
            events=list(roster.events),
            round_sites=[list(r) for r in self.round_sites],
            round_metrics=[dict(m) for m in self.round_metrics],
            traffic=traffic,
        )
