"""Merging what sites report after an evaluation, with numpy alone (the coordinator never loads torch).

A site reports its own scalar metrics and each classification metric's *state* (confusion counts, binned ROC
counts), never predictions. Scalars are combined as sample-weighted means; states, which are counts, are summed.
The merged states give exactly the metrics of every site's predictions pooled
(:func:`lightning_fed.metrics.federated_metrics` computes them, where torchmetrics is at hand).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np


def weighted_scalars(payloads: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Sample-weighted mean of every scalar all sites reported (training keys weighted by training samples)."""
    common = set.intersection(*(set(p["scalars"]) for p in payloads.values())) if payloads else set()
    out = {}
    for key in sorted(common):
        weight_key = "train_samples" if "train" in key else "num_samples"
        weights = {s: max(int(p.get(weight_key) or 0), 0) for s, p in payloads.items()}
        total = sum(weights.values())
        if total == 0:
            weights, total = {s: 1 for s in payloads}, len(payloads)
        out[key] = sum(weights[s] * float(p["scalars"][key]) for s, p in payloads.items()) / total
    return out


def sum_metric_states(exports: list[Optional[dict[str, Any]]]) -> Optional[dict[str, Any]]:
    """Every site's metric states summed (``None`` unless every site measured the same kind of task)."""
    if not exports or any(e is None for e in exports) or any(e["spec"] != exports[0]["spec"] for e in exports):
        return None
    states = {
        metric: {name: np.sum([np.asarray(e["states"][metric][name]) for e in exports], axis=0) for name in values}
        for metric, values in exports[0]["states"].items()
    }
    return {"spec": exports[0]["spec"], "states": states, "num_samples": sum(int(e["num_samples"]) for e in exports)}


def merge_reports(payloads: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{"scalars": weighted means, "metrics": summed states or None}`` of every site's evaluation report."""
    return {
        "scalars": weighted_scalars(payloads),
        "metrics": sum_metric_states([p.get("metrics") for p in payloads.values()]),
    }
