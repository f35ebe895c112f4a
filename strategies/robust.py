"""Byzantine-robust rules (Yin et al., 2018): coordinate-wise statistics instead of the weighted mean.

    median:        w_{t+1}[i] = median_k  w_k[i]
    trimmed_mean:  w_{t+1}[i] = mean of w_k[i] after dropping the floor(beta * K) largest and smallest values

Sites count equally (a robust rule must not let one site's claimed sample count outweigh the rest).
Integer buffers are taken from the largest site.
"""

from __future__ import annotations

import numpy as np

from lightning_fed.strategies.base import Aggregator, GlobalModel, SiteUpdate, Weights, combine_floating
from lightning_fed.strategies.registry import register_aggregator


@register_aggregator("median")
class Median(Aggregator):
    """Coordinate-wise median over sites."""

    def aggregate(self, round: int, updates: list[SiteUpdate], current: Weights | None) -> GlobalModel:
        return GlobalModel(weights=combine_floating(updates, lambda ws: np.median(ws, axis=0)), round=round)


@register_aggregator("trimmed_mean")
class TrimmedMean(Aggregator):
    """Coordinate-wise mean after trimming ``floor(beta * K)`` values from each end."""

    def __init__(self, beta: float = 0.1) -> None:
        if not 0 <= beta < 0.5:
            raise ValueError(f"trimmed_mean beta must lie in [0, 0.5), got {beta}")
        self.beta = beta

    def aggregate(self, round: int, updates: list[SiteUpdate], current: Weights | None) -> GlobalModel:
        k = int(np.floor(self.beta * len(updates)))

        def trimmed(ws: list[np.ndarray]) -> np.ndarray:
            return np.sort(np.stack(ws), axis=0)[k : len(ws) - k].mean(axis=0)

        return GlobalModel(weights=combine_floating(updates, trimmed), round=round)
