"""What the ready modules share: one ``_step(batch, stage)`` behind Lightning's three step hooks."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule


class StagedModule(LightningModule):
    """``training_step``/``validation_step``/``test_step`` all call ``_step(batch, "train" | "val" | "test")``."""

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")
