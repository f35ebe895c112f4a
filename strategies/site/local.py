"""The local rule's site half: sends no weights, keeps its own model."""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer

from lightning_fed.strategies.base import GlobalModel, SiteUpdate
from lightning_fed.strategies.site import SiteAlgorithm


class LocalSite(SiteAlgorithm):
    """Sends no weights and keeps its own model when the (empty) round result comes back."""

    evaluation_note = "each site evaluated with its own locally trained model (local: nothing exchanged)"

    def local_update(self, trainer: Trainer, pl_module: LightningModule, num_samples: int) -> SiteUpdate:
        return SiteUpdate(site="", weights={}, num_samples=num_samples)

    def receive_global(self, trainer: Trainer, pl_module: LightningModule, model: GlobalModel) -> None:
        pass
