"""FedBN's site half: partial sharing whose personal tensors are the normalisation layers, found by layer type."""

from __future__ import annotations

from lightning.pytorch import LightningModule
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from lightning_fed.strategies.site import SiteAlgorithm
from lightning_fed.strategies.site.partial import PartialSharingSite, by_structure


def normalisation_keys(module: nn.Module) -> set[str]:
    """State-dict keys (parameters and buffers) of every normalisation layer in ``module``."""
    keys = set()
    for prefix, layer in module.named_modules():
        if isinstance(layer, _NormBase):
            keys |= {f"{prefix}.{name}" if prefix else name for name in layer.state_dict()}
    return keys


class FedBNSite(PartialSharingSite):
    """Sends everything but the normalisation layers; loads the global model around them."""

    evaluation_note = "each site evaluated with its own normalisation layers (FedBN)"  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__(SiteAlgorithm(), personal=by_structure)  # the names come from the layers' types

    def personal_names(self, pl_module: LightningModule) -> set[str]:
        keys = normalisation_keys(pl_module)
        if not keys:
            raise ValueError("fedbn keeps normalisation layers local, but the model has none: use fedavg")
        return keys
