"""Local training only: every site trains alone, nothing is exchanged. The baseline a federated rule must beat.

    site k:  w_k  <- its own local updates, every round
    server:  nothing (the "global model" stays the initial one)

The rounds still run, so sites stay in step (same epochs, agreed early stopping) and a comparison with a
federated rule differs only in the exchange. ``trainer.test`` evaluates every site with its own model;
``lightning-fed compare --modes local`` also tests every local model on every other site's test data.
Site half: :class:`~lightning_fed.strategies.site.local.LocalSite`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_fed.strategies.base import Aggregator, GlobalModel, SiteUpdate, Weights
from lightning_fed.strategies.registry import register_aggregator

if TYPE_CHECKING:
    from lightning_fed.strategies.site.local import LocalSite


@register_aggregator("local")
class Local(Aggregator):
    """No aggregation: each site's model is trained on its own data only."""

    def site_algorithm(self) -> "LocalSite":
        from lightning_fed.strategies.site.local import LocalSite

        return LocalSite()

    def aggregate(self, round: int, updates: list[SiteUpdate], current: Weights | None) -> GlobalModel:
        return GlobalModel(weights={}, round=round)
