"""FedAvg (McMahan et al., 2017): the global model is the sample-weighted mean of the site models.

    w_{t+1} = sum_k (n_k / n) * w_k,    n = sum_k n_k

Floating-point tensors are accumulated in float64 and cast back to their dtype. Integer buffers (such as
BatchNorm's ``num_batches_tracked``) are counters, not weights: they are never averaged and are taken from the
site with the most samples.
"""

from __future__ import annotations

from lightning_fed.strategies.base import Aggregator, GlobalModel, SiteUpdate, Weights, combine_floating
from lightning_fed.strategies.registry import register_aggregator


def weighted_average(updates: list[SiteUpdate]) -> Weights:
    """``sum_k n_k/n * w_k`` over floating tensors; integer tensors from the largest site."""
    total = sum(u.num_samples for u in updates)
    if total <= 0:
        raise ValueError("cannot average: the sites reported no training samples this round")
    shares = [u.num_samples / total for u in updates]
    return combine_floating(updates, lambda ws: sum(share * w for share, w in zip(shares, ws)))


@register_aggregator("fedavg")
class FedAvg(Aggregator):
    """Sample-weighted federated averaging."""

    secure_weighting = "samples"

    def aggregate(self, round: int, updates: list[SiteUpdate], current: Weights | None) -> GlobalModel:
        return GlobalModel(weights=weighted_average(updates), round=round)
