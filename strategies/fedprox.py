"""FedProx (Li et al., 2020): each site minimises its loss plus a proximal term that keeps it near the global model.

    site k:  min_w  F_k(w) + mu/2 * ||w - w_global||^2      =>  grad += mu * (w - w_global)
    server:  w_{t+1} = sum_k (n_k / n) * w_k                (FedAvg's server half)

The term's gradient is added to every trainable parameter right before the optimizer step
(:class:`~lightning_fed.strategies.site.fedprox.FedProxSite`), so the user's LightningModule and
``configure_optimizers`` stay as they are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.strategies.registry import register_aggregator

if TYPE_CHECKING:
    from lightning_fed.strategies.site.fedprox import FedProxSite


@register_aggregator("fedprox")
class FedProx(FedAvg):
    """FedAvg on the server; the proximal term ``mu/2 ||w - w_global||^2`` on every site."""

    def __init__(self, mu: float = 0.01) -> None:
        if mu < 0:
            raise ValueError(f"FedProx mu must be >= 0, got {mu}")
        self.mu = mu

    def site_algorithm(self) -> "FedProxSite":
        from lightning_fed.strategies.site.fedprox import FedProxSite

        return FedProxSite(self.mu)
