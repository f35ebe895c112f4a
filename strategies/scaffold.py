"""SCAFFOLD (Karimireddy et al., 2020, option II): control variates correct each site's drift.

    site i, every local step:   g <- g + c - c_i                                  (corrected gradient)
    site i, end of round:       c_i+ = c_i - c + (x - y_i) / (K * lr)             (K local steps, local lr)
                                sends  dy_i = y_i - x,  dc_i = c_i+ - c_i
    server:                     x <- x + eta_g * mean_i(dy_i)
                                c <- c + mean_i(dc_i)                              (every site takes part)

Control variates cover trainable parameters; buffers are averaged as in FedAvg. The rule assumes plain SGD
locally (``lr`` is read from the optimizer's first parameter group). Server ``c`` and each site's ``c_i`` are
saved in the checkpoints.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer

from lightning_fed.strategies.base import Aggregator, GlobalModel, SiteUpdate, Weights
from lightning_fed.strategies.fedavg import weighted_average
from lightning_fed.strategies.registry import register_aggregator
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
        self.c_site, self.c_server, self.x = dict(state_dict["c_site"]), dict(state_dict["c_server"]), dict(state_dict["x"])


@register_aggregator("scaffold")
class Scaffold(Aggregator):
    """Server half: averages the sites' model and control-variate deltas."""

    def __init__(self, eta_g: float = 1.0) -> None:
        if eta_g <= 0:
            raise ValueError(f"scaffold eta_g must be > 0, got {eta_g}")
        self.eta_g = eta_g
        self.c: Weights = {}

    def site_algorithm(self) -> ScaffoldSite:
        return ScaffoldSite()

    def aggregate(self, round: int, updates: list[SiteUpdate], current: Weights | None) -> GlobalModel:
        if current is None:
            raise ValueError("scaffold needs the round's starting global model")
        new = weighted_average(updates)  # buffers (and integer counters) as in FedAvg
        for key in updates[0].extras["delta_c"]:
            x = current[key].astype(np.float64)
            dy = np.mean([u.weights[key].astype(np.float64) - x for u in updates], axis=0)
            new[key] = (x + self.eta_g * dy).astype(current[key].dtype)
            dc = np.mean([u.extras["delta_c"][key].astype(np.float64) for u in updates], axis=0)
            self.c[key] = self.c.get(key, np.zeros_like(dc)) + dc
        return GlobalModel(weights=new, round=round, extras={"c": {k: v.astype(np.float32) for k, v in self.c.items()}})

    def state_dict(self) -> dict[str, Any]:
        return {"c": self.c}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.c = dict(state["c"])
