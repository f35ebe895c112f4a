"""FedBN's site half: sends everything but the normalisation layers and loads the global model around them."""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from lightning_fed.strategies.base import GlobalModel, SiteUpdate
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
