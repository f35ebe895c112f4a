"""Ditto (Li et al., 2021): FedAvg's shared model, and beside it a personal model per site kept close to it.

    site k:  w_k: the shared model, trained as FedAvg trains it and sent every round
             v_k: its personal model, one step per training batch on the same batch:
                  v_k ← v_k − η (∇F_k(v_k) + λ (v_k − w_t)),   w_t the global model of the round
    server:  w_{t+1} = sum_k (n_k / n) * w_k   (FedAvg's server half); v_k never leaves site k

``λ`` (``lam``) pulls each personal model towards the global one: 0 trains it alone, a large ``λ`` keeps it near the
global model. The personal model starts as the round-0 model and uses the first optimizer the module's
``configure_optimizers`` returns (its LR schedulers are not stepped for it), with its own state; model, optimizer
state and ``w_t`` are in the site's checkpoints, so a resumed run continues them exactly. ``trainer.test`` tests the
global model at every site and each site's personal model at its own site (``personal/...``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.strategies.registry import register_aggregator

if TYPE_CHECKING:
    from lightning_fed.strategies.site.ditto import DittoSite


@register_aggregator("ditto")
class Ditto(FedAvg):
    """FedAvg, with a personal model per site trained beside the shared one (proximal weight ``lam``)."""

    trains_personal_models = True

    def __init__(self, lam: float = 0.1) -> None:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam < 0:
            raise ValueError(f"ditto: lam must be a number >= 0, got {lam!r}")
        self.lam = float(lam)

    def site_algorithm(self) -> "DittoSite":
        from lightning_fed.strategies.site.ditto import DittoSite

        return DittoSite(self.lam)
