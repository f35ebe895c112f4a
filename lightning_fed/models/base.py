"""What the ready modules share: one ``_step(batch, stage)`` behind Lightning's three step hooks, and class weights."""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule
from torch.nn import functional as F


class StagedModule(LightningModule):
    """``training_step``/``validation_step``/``test_step`` all call ``_step(batch, "train" | "val" | "test")``.

    ``set_class_weights`` (called by :class:`~lightning_fed.balance.ClassBalance` with weights from the site's own
    labels) makes the training loss class-weighted; the weights are a plain attribute, never part of the state
    dict, so they stay at the site and are never averaged.
    """

    class_weights: Optional[torch.Tensor] = None

    def set_class_weights(self, weights: Optional[torch.Tensor]) -> None:
        self.class_weights = weights

    def _loss_weights(self, num_classes: int, stage: str) -> Optional[torch.Tensor]:
        # validation and test losses stay unweighted: comparable across sites and runs
        if self.class_weights is None or stage != "train":
            return None
        w = self.class_weights.to(self.device, torch.float32)
        if w.numel() < num_classes:  # classes this site never saw: weight 1 (they contribute no loss here anyway)
            w = torch.cat([w, w.new_ones(num_classes - w.numel())])
        return w[:num_classes]

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor, stage: str) -> torch.Tensor:
        """Cross-entropy, class-weighted in training when class weights are set."""
        return F.cross_entropy(logits, targets, weight=self._loss_weights(logits.shape[-1], stage))

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")
