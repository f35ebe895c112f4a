"""FIVA's site half: the diagonal Laplace precision of this site's round, from its own gradients."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer

from lightning_fed.strategies.base import GlobalModel, SiteUpdate
from lightning_fed.strategies.fiva import PRECISION_KEY
from lightning_fed.strategies.site import SiteAlgorithm


class FisherPrecision(SiteAlgorithm):
    """Accumulates each trainable parameter's squared gradient after every backward pass of the round; the update
    carries ``n * mean(grad**2) + prior`` per parameter."""

    def __init__(self, prior: float) -> None:
        self.prior = prior
        self.squares: dict[str, torch.Tensor] = {}
        self.batches = 0

    def _reset(self) -> None:
        self.squares, self.batches = {}, 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for name, p in pl_module.named_parameters():
            if p.grad is not None:
                square = p.grad.detach().float() ** 2
                self.squares[name] = self.squares[name] + square if name in self.squares else square
        self.batches += 1

    def local_update(self, trainer: Trainer, pl_module: LightningModule, num_samples: int) -> SiteUpdate:
        update = super().local_update(trainer, pl_module, num_samples)
        scale = num_samples / max(self.batches, 1)
        update.extras[PRECISION_KEY] = {
            name: (square * scale + self.prior).cpu().numpy() for name, square in self.squares.items()
        }
        return update

    def receive_global(self, trainer: Trainer, pl_module: LightningModule, model: GlobalModel) -> None:
        super().receive_global(trainer, pl_module, model)
        self._reset()  # a new round: a new Laplace approximation around the new global model

    def state_dict(self) -> dict[str, Any]:
        return {"squares": {k: v.cpu() for k, v in self.squares.items()}, "batches": self.batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.squares, self.batches = dict(state_dict.get("squares", {})), int(state_dict.get("batches", 0))
