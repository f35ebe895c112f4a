"""Uncertainty-weighted averaging's site half: the scores a site sends, measured on its own training images."""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, Subset

from lightning_fed.strategies.base import GlobalModel, SiteUpdate
from lightning_fed.strategies.site import SiteAlgorithm
from lightning_fed.strategies.uncertainty_weighted import SCORE_KEY


class UncertaintyScores(SiteAlgorithm):
    """Measures the global model's epistemic uncertainty when it arrives, and the local model's aleatoric
    uncertainty when the round's update leaves, on the first ``max_images`` training images (labels unused)."""

    def __init__(self, max_images: int) -> None:
        self.max_images = max_images
        self.epistemic: Optional[float] = None  # of the global model this round started from

    def _mean_uncertainty(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        from lightning_fed.site_metrics import inputs_of

        loader = trainer.train_dataloader
        if isinstance(loader, dict):
            loader = next(iter(loader.values()))
        if isinstance(loader, (list, tuple)):
            loader = loader[0]
        dataset = loader.dataset
        images = Subset(dataset, range(min(len(dataset), self.max_images)))
        sums, pixels = {"epistemic": 0.0, "aleatoric": 0.0}, 0
        for batch in DataLoader(images, batch_size=16, collate_fn=loader.collate_fn):
            x = inputs_of(batch).to(pl_module.device)
            u = pl_module.predictive_uncertainty(x)
            sums["epistemic"] += float(u.mutual_information.double().sum())
            sums["aleatoric"] += float(u.aleatoric.double().sum())
            pixels += u.entropy.numel()
        return {k: v / max(pixels, 1) for k, v in sums.items()}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.epistemic is None:  # round 1: the shared initial model (resumed sites restore theirs)
            self.epistemic = self._mean_uncertainty(trainer, pl_module)["epistemic"]

    def local_update(self, trainer: Trainer, pl_module: LightningModule, num_samples: int) -> SiteUpdate:
        update = super().local_update(trainer, pl_module, num_samples)
        local = self._mean_uncertainty(trainer, pl_module)
        epistemic = self.epistemic if self.epistemic is not None else local["epistemic"]
        update.extras[SCORE_KEY] = {"epistemic": epistemic, "aleatoric": local["aleatoric"]}
        return update

    def receive_global(self, trainer: Trainer, pl_module: LightningModule, model: GlobalModel) -> None:
        super().receive_global(trainer, pl_module, model)
        self.epistemic = self._mean_uncertainty(trainer, pl_module)["epistemic"]

    def state_dict(self) -> dict[str, Any]:
        return {"epistemic": self.epistemic}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epistemic = state_dict.get("epistemic")
