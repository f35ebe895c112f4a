"""SCAFFOLD's site half: gradients corrected by ``c - c_i``; ``c_i`` updated at the end of every round."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer

from lightning_fed.strategies.base import GlobalModel, SiteUpdate
from lightning_fed.strategies.site import SiteAlgorithm, load_weights


class ScaffoldSite(SiteAlgorithm):
    """Corrects every gradient by ``c - c_i`` and updates ``c_i`` at the end of each round."""

    def __init__(self) -> None:
        self.c_site: dict[str, torch.Tensor] = {}  # c_i
        self.c_server: dict[str, torch.Tensor] = {}  # c, as last received
        self.x: dict[str, torch.Tensor] = {}  # the round's starting global parameters
        self.steps = 0
        self.lr: Optional[float] = None

    def _trainable(self, pl_module: LightningModule) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in pl_module.named_parameters() if p.requires_grad}

    def _start_round(self, pl_module: LightningModule) -> None:
        self.x = {n: p.detach().clone() for n, p in self._trainable(pl_module).items()}
        self.steps = 0
        for name, p in self._trainable(pl_module).items():
            self.c_site.setdefault(name, torch.zeros_like(p, device="cpu"))
            self.c_server.setdefault(name, torch.zeros_like(p, device="cpu"))

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.x:
            self._start_round(pl_module)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        for name, p in self._trainable(pl_module).items():
            if p.grad is not None:
                p.grad.add_((self.c_server[name] - self.c_site[name]).to(p.device))
        self.steps += 1
        self.lr = float(optimizer.param_groups[0]["lr"])

    def local_update(self, trainer: Trainer, pl_module: LightningModule, num_samples: int) -> SiteUpdate:
        update = super().local_update(trainer, pl_module, num_samples)
        if self.steps == 0 or not self.lr:
            raise ValueError("scaffold needs at least one optimizer step with a positive learning rate per round")
        delta_c = {}
        for name, p in self._trainable(pl_module).items():
            y = p.detach().cpu()
            c_new = self.c_site[name] - self.c_server[name] + (self.x[name].cpu() - y) / (self.steps * self.lr)
            delta_c[name] = (c_new - self.c_site[name]).numpy()
            self.c_site[name] = c_new
        update.extras["delta_c"] = delta_c
        return update

    def receive_global(self, trainer: Trainer, pl_module: LightningModule, model: GlobalModel) -> None:
        load_weights(pl_module, model.weights)
        if "c" in model.extras:  # a round's result (an evaluation hands over weights only)
            self.c_server = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in model.extras["c"].items()}
            self._start_round(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"c_site": self.c_site, "c_server": self.c_server, "x": {k: v.cpu() for k, v in self.x.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.c_site, self.c_server, self.x = (
            dict(state_dict["c_site"]),
            dict(state_dict["c_server"]),
            dict(state_dict["x"]),
        )
