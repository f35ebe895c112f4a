"""Refusing garbage before it is averaged: updates holding NaN or Inf, and updates far from the round's others.

numpy only: the coordinator screens every round's updates before the aggregator sees them.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from lightning_fed.strategies.base import SiteUpdate, Weights, is_averageable


def non_finite_key(weights: Weights) -> Optional[str]:
    """The first floating tensor holding NaN or Inf (``None`` if all are finite)."""
    for key, value in weights.items():
        if is_averageable(np.asarray(value)) and not np.all(np.isfinite(value)):
            return key
    return None


def update_norm(update: SiteUpdate, current: Optional[Weights]) -> Optional[float]:
    """L2 distance of an update from the round's global model (its own norm when it is a difference already);
    ``None`` for masked updates (secure aggregation) or without a global model to compare with."""
    if "secagg" in update.extras:
        return None
    is_delta = bool(update.extras.get("delta"))
    if not is_delta and current is None:
        return None
    total = 0.0
    for key, value in update.weights.items():
        if not is_averageable(np.asarray(value)) or (not is_delta and key not in current):
            continue
        diff = (
            np.asarray(value, np.float64)
            if is_delta
            else np.asarray(value, np.float64) - np.asarray(current[key], np.float64)
        )
        total += float(np.sum(np.square(diff)))
    return math.sqrt(total)


def screen(updates: list[SiteUpdate], current: Optional[Weights], max_norm_ratio: Optional[float]) -> dict[str, str]:
    """``{site: why}`` for every update to refuse this round."""
    refused = {}
    for update in updates:
        key = None if "secagg" in update.extras else non_finite_key(update.weights)
        if key is not None:
            refused[update.site] = f"its update holds NaN or Inf (in {key!r}): its training diverged"
    if max_norm_ratio is not None:
        norms = {u.site: update_norm(u, current) for u in updates if u.site not in refused}
        known = [n for n in norms.values() if n is not None]
        if len(known) >= 2:
            median = float(np.median(known))
            for site, norm in norms.items():
                if norm is not None and median > 0 and norm > max_norm_ratio * median:
                    refused[site] = (
                        f"its update is {norm / median:.1f}x the round's median distance from the global "
                        f"model (max_update_norm_ratio={max_norm_ratio:g})"
                    )
    return refused
