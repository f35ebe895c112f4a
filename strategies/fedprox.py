"""FedProx (Li et al., 2020): each site minimises its loss plus a proximal term that keeps it near the global model.

    site k:  min_w  F_k(w) + mu/2 * ||w - w_global||^2      =>  grad += mu * (w - w_global)
    server:  w_{t+1} = sum_k (n_k / n) * w_k                (as FedAvg)

The term's gradient is added to every trainable parameter right before the optimizer step, so the user's
LightningModule and ``configure_optimizers`` stay as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer

from lightning_fed.strategies.base import Aggregator, GlobalModel, SiteUpdate, Weights
from lightning_fed.strategies.fedavg import weighted_average
from lightning_fed.strategies.registry import register_aggregator
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


@register_aggregator("fedprox")
class FedProx(Aggregator):
    """FedAvg on the server; the proximal term ``mu/2 ||w - w_global||^2`` on every site."""

    secure_weighting = "samples"

    def __init__(self, mu: float = 0.01) -> None:
        if mu < 0:
            raise ValueError(f"FedProx mu must be >= 0, got {mu}")
        self.mu = mu

    def site_algorithm(self) -> FedProxSite:
        return FedProxSite(self.mu)

    def aggregate(self, round: int, updates: list[SiteUpdate], current: Weights | None) -> GlobalModel:
        return GlobalModel(weights=weighted_average(updates), round=round)
