"""FedBN (Li et al., 2021): normalisation layers stay local, everything else is averaged.

    site k keeps its own BN weights, biases and running statistics;
    server:  w_{t+1} = sum_k (n_k / n) * w_k   over every other tensor

Normalisation layers are found by module type (BatchNorm, SyncBatchNorm, InstanceNorm and their subclasses),
never by key name. ``trainer.test`` evaluates every site with its own normalisation layers.
"""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from lightning_fed.strategies.base import Aggregator, GlobalModel, SiteUpdate, Weights
from lightning_fed.strategies.fedavg import weighted_average
from lightning_fed.strategies.registry import register_aggregator
from lightning_fed.strategies.site import SiteAlgorithm, load_weights, state_to_numpy


def normalisation_keys(module: nn.Module) -> set[str]:
    """State-dict keys (parameters and buffers) of every normalisation layer in ``module``."""
    keys = set()
    for prefix, layer in module.named_modules():
        if isinstance(layer, _NormBase):
            keys |= {f"{prefix}.{name}" if prefix else name for name in layer.state_dict()}
    return keys


class FedBNSite(SiteAlgorithm):
    """Sends everything but the normalisation layers; loads the global model around them."""

    evaluation_note = "each site evaluated with its own normalisation layers (FedBN)"

    def local_keys(self, pl_module: LightningModule) -> set[str]:
        keys = normalisation_keys(pl_module)
        if not keys:
            raise ValueError("fedbn keeps normalisation layers local, but the model has none: use fedavg")
        return keys

    def local_update(self, trainer: Trainer, pl_module: LightningModule, num_samples: int) -> SiteUpdate:
        local = self.local_keys(pl_module)
        state = {k: v for k, v in pl_module.state_dict().items() if k not in local}
        return SiteUpdate(site="", weights=state_to_numpy(state), num_samples=num_samples)

    def receive_global(self, trainer: Trainer, pl_module: LightningModule, model: GlobalModel) -> None:
        load_weights(pl_module, model.weights, skip=self.local_keys(pl_module))


@register_aggregator("fedbn")
class FedBN(Aggregator):
    """FedAvg over everything except the normalisation layers, which each site keeps."""

    secure_weighting = "samples"

    def site_algorithm(self) -> FedBNSite:
        return FedBNSite()

    def aggregate(self, round: int, updates: list[SiteUpdate], current: Weights | None) -> GlobalModel:
        return GlobalModel(weights=weighted_average(updates), round=round)
