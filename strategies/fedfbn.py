"""FedFBN (Kanhere et al., 2023): a pretrained backbone whose BatchNorm layers stay frozen for the whole run.

    every BatchNorm: affine parameters not trained, running statistics never updated (always in eval mode)
    everything else: w_{t+1} = sum_k (n_k / n) * w_k      (FedAvg's server half)

BatchNorm layers are found by module type. Eval mode is enforced right before each BatchNorm forward, so no
``model.train()`` call (Lightning's at every epoch, or the user's own) can unfreeze them. The frozen layers never
travel: every site keeps the pretrained values, bit for bit. Frozen BN in eval mode also keeps per-sample
independence, so FedFBN combines with DP-SGD. Site half: :class:`~lightning_fed.strategies.site.fedfbn.FedFBNSite`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.strategies.registry import register_aggregator

if TYPE_CHECKING:
    from lightning_fed.strategies.site.fedfbn import FedFBNSite


@register_aggregator("fedfbn")
class FedFBN(FedAvg):
    """FedAvg over everything but the frozen, pretrained BatchNorm layers."""

    def check_model(self, model: Any) -> None:
        from lightning_fed.strategies.site.fedfbn import check_pretrained_batchnorm

        check_pretrained_batchnorm(model)

    def site_algorithm(self) -> "FedFBNSite":
        from lightning_fed.strategies.site.fedfbn import FedFBNSite

        return FedFBNSite()
