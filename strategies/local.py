"""Local training only: every site trains alone, nothing is exchanged. The baseline a federated rule must beat.

    site k:  w_k  <- its own local updates, every round
    server:  nothing (the "global model" stays the initial one)

The rounds still run, so sites stay in step (same epochs, agreed early stopping) and a comparison with a
federated rule differs only in the exchange. ``trainer.test`` evaluates every site with its own model;
``lightning-fed compare --modes local`` also tests every local model on every other site's test data.
"""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer

from lightning_fed.strategies.base import Aggregator, GlobalModel, SiteUpdate, Weights
from lightning_fed.strategies.registry import register_aggregator
from lightning_fed.strategies.site import SiteAlgorithm


class LocalSite(SiteAlgorithm):
    """Sends no weights and keeps its own model when the (empty) round result comes back."""

    evaluation_note = "each site evaluated with its own locally trained model (local: nothing exchanged)"

    def local_update(self, trainer: Trainer, pl_module: LightningModule, num_samples: int) -> SiteUpdate:
        return SiteUpdate(site="", weights={}, num_samples=num_samples)

    def receive_global(self, trainer: Trainer, pl_module: LightningModule, model: GlobalModel) -> None:
        pass


@register_aggregator("local")
class Local(Aggregator):
    """No aggregation: each site's model is trained on its own data only."""

    def site_algorithm(self) -> LocalSite:
        return LocalSite()

    def aggregate(self, round: int, updates: list[SiteUpdate], current: Weights | None) -> GlobalModel:
        return GlobalModel(weights={}, round=round)
