"""SCAFFOLD (Karimireddy et al., 2020, option II): control variates correct each site's drift.

    site i, every local step:   g <- g + c - c_i                                  (corrected gradient)
    site i, end of round:       c_i+ = c_i - c + (x - y_i) / (K * lr)             (K local steps, local lr)
                                sends  dy_i = y_i - x,  dc_i = c_i+ - c_i
    server:                     x <- x + eta_g * mean_i(dy_i)
                                c <- c + mean_i(dc_i)                              (every site takes part)

Control variates cover trainable parameters; buffers are averaged as in FedAvg. The rule assumes plain SGD
locally (``lr`` is read from the optimizer's first parameter group). Server ``c`` and each site's ``c_i`` are
saved in the checkpoints. Site half: :class:`~lightning_fed.strategies.site.scaffold.ScaffoldSite`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_fed.strategies.base import Aggregator, GlobalModel, SiteUpdate, Weights
from lightning_fed.strategies.fedavg import weighted_average
from lightning_fed.strategies.registry import register_aggregator

if TYPE_CHECKING:
    from lightning_fed.strategies.site.scaffold import ScaffoldSite


@register_aggregator("scaffold")
class Scaffold(Aggregator):
    """Server half: averages the sites' model and control-variate deltas."""

    def __init__(self, eta_g: float = 1.0) -> None:
        if eta_g <= 0:
            raise ValueError(f"scaffold eta_g must be > 0, got {eta_g}")
        self.eta_g = eta_g
        self.c: Weights = {}

    def check_partial_rounds(self) -> None:
        raise ValueError(
            "scaffold's server control variate c <- c + mean(dc_i) assumes every site reports every round "
            "(with some missing it drifts): use on_site_failure='abort' with scaffold"
        )

    def site_algorithm(self) -> "ScaffoldSite":
        from lightning_fed.strategies.site.scaffold import ScaffoldSite

        return ScaffoldSite()

    def aggregate(self, round: int, updates: list[SiteUpdate], current: Weights | None) -> GlobalModel:
        if current is None:
            raise ValueError("scaffold needs the round's starting global model")
        new = weighted_average(updates)  # buffers (and integer counters) as in FedAvg
        for key in updates[0].extras["delta_c"]:
            x = current[key].astype(np.float64)
            dy = np.mean([u.weights[key].astype(np.float64) - x for u in updates], axis=0)
            new[key] = (x + self.eta_g * dy).astype(current[key].dtype)
            dc = np.mean([u.extras["delta_c"][key].astype(np.float64) for u in updates], axis=0)
            self.c[key] = self.c.get(key, np.zeros_like(dc)) + dc
        return GlobalModel(weights=new, round=round, extras={"c": {k: v.astype(np.float32) for k, v in self.c.items()}})

    def state_dict(self) -> dict[str, Any]:
        return {"c": self.c}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.c = dict(state["c"])
