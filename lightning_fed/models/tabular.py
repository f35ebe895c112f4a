"""A multilayer perceptron for tabular clinical data (e.g. the UCI heart-disease hospitals)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from lightning_fed.models.base import StagedModule


class TabularMLP(StagedModule):
    """``in_features`` → hidden layers (ReLU, dropout) → ``num_classes`` logits; cross-entropy, Adam.

    Logs ``train_loss``, ``val_loss``, ``test_loss``; lightning-fed adds per-site and federated metrics.
    """

    def __init__(
        self,
        in_features: int = 13,
        hidden: Sequence[int] = (32, 16),
        num_classes: int = 2,
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        self.net = nn.Sequential(*layers, nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        loss = self.cross_entropy(self(x), y, stage)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
