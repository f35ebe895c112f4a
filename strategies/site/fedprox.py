"""FedProx's site half: ``grad += mu * (w - w_global)`` on every trainable parameter before each optimizer step."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer

from lightning_fed.strategies.base import GlobalModel
from lightning_fed.strategies.site import SiteAlgorithm


class FedProxSite(SiteAlgorithm):
    """Adds ``mu * (w - w_global)`` to each trainable parameter's gradient."""

    def __init__(self, mu: float) -> None:
        self.mu = mu
        self.anchor: dict[str, torch.Tensor] = {}  # w_global of the current round

    def _set_anchor(self, pl_module: LightningModule) -> None:
        self.anchor = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.anchor:  # round 1: every site starts from the same model; on resume the anchor is restored
            self._set_anchor(pl_module)

    def receive_global(self, trainer: Trainer, pl_module: LightningModule, model: GlobalModel) -> None:
        super().receive_global(trainer, pl_module, model)
        self._set_anchor(pl_module)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self.mu == 0:
            return
        for name, param in pl_module.named_parameters():
            if param.grad is not None and name in self.anchor:
                param.grad.add_(param.detach() - self.anchor[name].to(param.device), alpha=self.mu)

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": {k: v.cpu() for k, v in self.anchor.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.anchor = dict(state_dict.get("anchor", {}))
