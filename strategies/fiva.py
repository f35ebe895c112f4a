"""FIVA, inverse-variance averaging (after Federated Inverse Variance Averaging, MLHC 2025): each parameter is
averaged with weights given by how precisely each site determined it.

    w_{t+1}[i] = sum_k p_k[i] w_k[i] / sum_k p_k[i],    p_k = n_k * F_k + prior

``p_k`` is site ``k``'s diagonal Laplace precision: its training samples ``n_k`` times the empirical Fisher
``F_k`` (the mean squared mini-batch gradient of its round,
:class:`~lightning_fed.strategies.site.fiva.FisherPrecision`), plus ``prior``, so a parameter a site's data hardly
touches (e.g. features of a vendor it never scanned) hardly moves the average. Tensors without a precision
(BatchNorm statistics, buffers) are sample-weighted as in FedAvg; integer buffers come from the largest site.
Each update carries one precision per parameter: twice FedAvg's upload.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from lightning_fed.strategies.base import Aggregator, GlobalModel, SiteUpdate, Weights, is_averageable
from lightning_fed.strategies.fedavg import weighted_average
from lightning_fed.strategies.registry import register_aggregator

if TYPE_CHECKING:
    from lightning_fed.strategies.site.fiva import FisherPrecision

PRECISION_KEY = "precision"


@register_aggregator("fiva")
class Fiva(Aggregator):
    """Per-parameter inverse-variance (precision-weighted) averaging."""

    def __init__(self, prior: float = 1e-8) -> None:
        if prior <= 0:
            raise ValueError(f"prior precision must be > 0 (it keeps a parameter no site trained defined), got {prior}")
        self.prior = prior

    def site_algorithm(self) -> "FisherPrecision":
        from lightning_fed.strategies.site.fiva import FisherPrecision

        return FisherPrecision(self.prior)

    def aggregate(self, round: int, updates: list[SiteUpdate], current: Weights | None) -> GlobalModel:
        missing = [u.site for u in updates if PRECISION_KEY not in u.extras]
        if missing:
            raise ValueError(f"sites {missing} sent no precisions: their site half is not FisherPrecision")
        out = weighted_average(updates)  # buffers and integer counters as FedAvg
        for key, value in out.items():
            if not is_averageable(value) or any(key not in u.extras[PRECISION_KEY] for u in updates):
                continue
            precisions = [np.asarray(u.extras[PRECISION_KEY][key], dtype=np.float64) for u in updates]
            numerator = sum(p * u.weights[key].astype(np.float64) for p, u in zip(precisions, updates))
            out[key] = (numerator / sum(precisions)).astype(value.dtype)
        return GlobalModel(weights=out, round=round)
