"""FedBN (Li et al., 2021): normalisation layers stay local, everything else is averaged.

    site k keeps its own BN weights, biases and running statistics;
    server:  w_{t+1} = sum_k (n_k / n) * w_k   over every other tensor (FedAvg's server half)

Normalisation layers are found by module type (BatchNorm, SyncBatchNorm, InstanceNorm and their subclasses),
never by key name (:class:`~lightning_fed.strategies.site.fedbn.FedBNSite`). ``trainer.test`` evaluates every
site with its own normalisation layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.strategies.registry import register_aggregator

if TYPE_CHECKING:
    from lightning_fed.strategies.site.fedbn import FedBNSite


@register_aggregator("fedbn")
class FedBN(FedAvg):
    """FedAvg over everything except the normalisation layers, which each site keeps."""

    def site_algorithm(self) -> "FedBNSite":
        from lightning_fed.strategies.site.fedbn import FedBNSite

        return FedBNSite()
