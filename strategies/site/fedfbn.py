"""FedFBN's site half: every BatchNorm frozen at its pretrained values; only the other tensors travel."""

from __future__ import annotations

from typing import Optional

from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_fed.strategies.base import GlobalModel, SiteUpdate
from lightning_fed.strategies.site import SiteAlgorithm, load_weights, state_to_numpy


def batchnorm_layers(module: nn.Module) -> dict[str, _BatchNorm]:
    return {name: layer for name, layer in module.named_modules() if isinstance(layer, _BatchNorm)}


def check_pretrained_batchnorm(module: nn.Module) -> None:
    """FedFBN needs BatchNorm layers that carry pretrained statistics; say clearly when they do not."""
    layers = batchnorm_layers(module)
    if not layers:
        raise ValueError("fedfbn freezes BatchNorm layers, but the model has none: use fedavg or fedprox")
    fresh = [
        n
        for n, layer in layers.items()
        if layer.track_running_stats
        and layer.running_mean is not None
        and bool((layer.running_mean == 0).all())
        and bool((layer.running_var == 1).all())
    ]
    if len(fresh) == len(layers):
        raise ValueError(
            "fedfbn needs a pretrained backbone, but every BatchNorm still has its initial statistics "
            "(running_mean 0, running_var 1): load pretrained weights (or a local checkpoint file) before fit"
        )


def _stay_in_eval(layer: nn.Module, args: tuple) -> None:
    layer.training = False


class FedFBNSite(SiteAlgorithm):
    """Freezes every BatchNorm at set-up and keeps it frozen; exchanges only the other tensors."""

    evaluation_note = "BatchNorm layers frozen at their pretrained values on every site (FedFBN)"

    def __init__(self) -> None:
        self._frozen: Optional[set[str]] = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._frozen is not None:
            return
        self._frozen = set()
        for name, layer in batchnorm_layers(pl_module).items():
            layer.requires_grad_(False)  # before configure_optimizers: the optimizer never sees them
            layer.eval()
            layer.register_forward_pre_hook(_stay_in_eval)
            self._frozen |= {f"{name}.{key}" if name else key for key in layer.state_dict()}

    def local_update(self, trainer: Trainer, pl_module: LightningModule, num_samples: int) -> SiteUpdate:
        state = {k: v for k, v in pl_module.state_dict().items() if k not in (self._frozen or set())}
        return SiteUpdate(site="", weights=state_to_numpy(state), num_samples=num_samples)

    def receive_global(self, trainer: Trainer, pl_module: LightningModule, model: GlobalModel) -> None:
        load_weights(pl_module, model.weights, skip=self._frozen)
