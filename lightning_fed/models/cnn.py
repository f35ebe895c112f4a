"""Study B's classifier: two convolution layers and a fully connected layer."""

from __future__ import annotations

import torch
from torch import nn

from lightning_fed.models.base import StagedModule


class SmallCNN(StagedModule):
    """2 × (conv 3×3 + ReLU + max-pool) → fully connected → ``num_classes`` logits (softmax in the loss).

    Logs ``train_loss``, ``val_loss``/``val_acc`` and ``test_loss``/``test_acc``; recall, precision and AUROC per site
    and federated are added by lightning-fed's metrics, whatever module you bring.
    """

    def __init__(
        self,
        num_classes: int = 2,
        in_channels: int = 1,
        channels: tuple[int, int] = (16, 32),
        lr: float = 1e-3,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(c2 * (image_size // 4) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.cross_entropy(logits, y, stage)
        self.log(f"{stage}_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(y))
        if stage != "train":
            self.log(f"{stage}_acc", (logits.argmax(1) == y).float().mean(), on_epoch=True, batch_size=len(y))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
