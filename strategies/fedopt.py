"""Adaptive server optimizers (Reddi et al., 2021, "Adaptive Federated Optimization", Algorithm 2).

The sites' mean update is a pseudo-gradient that a server optimizer applies to the global model:

    delta_t = sum_k (n_k / n) * (w_k - w_t)
    m_t     = beta1 * m_{t-1} + (1 - beta1) * delta_t
    v_t     = v_{t-1} + delta_t^2                                           (FedAdagrad)
    v_t     = beta2 * v_{t-1} + (1 - beta2) * delta_t^2                     (FedAdam)
    v_t     = v_{t-1} - (1 - beta2) * delta_t^2 * sign(v_{t-1} - delta_t^2)  (FedYogi)
    w_{t+1} = w_t + eta * m_t / (sqrt(v_t) + tau)

m and v start at 0 and tau^2 and are saved in every checkpoint. Integer buffers are taken from the largest site.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lightning_fed.strategies.base import Aggregator, GlobalModel, SiteUpdate, Weights, is_averageable
from lightning_fed.strategies.fedavg import weighted_average
from lightning_fed.strategies.registry import register_aggregator


class FedOpt(Aggregator):
    """Shared rule; subclasses define the second moment ``v``."""

    secure_weighting = "samples"

    def __init__(self, eta: float = 1e-2, beta1: float = 0.9, tau: float = 1e-3) -> None:
        if eta <= 0 or tau <= 0 or not 0 <= beta1 < 1:
            raise ValueError(
                f"{self.name or type(self).__name__} needs eta > 0, tau > 0, 0 <= beta1 < 1; got eta={eta}, beta1={beta1}, tau={tau}"
            )
        self.eta, self.beta1, self.tau = eta, beta1, tau
        self.m: Weights = {}
        self.v: Weights = {}

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def aggregate(self, round: int, updates: list[SiteUpdate], current: Weights | None) -> GlobalModel:
        if current is None:
            raise ValueError(f"{type(self).__name__} needs the round's starting global model")
        mean = weighted_average(updates)
        new: Weights = {}
        for key, w in current.items():
            if not is_averageable(w):
                new[key] = mean[key]
                continue
            w64 = w.astype(np.float64)
            delta = mean[key].astype(np.float64) - w64
            m = self.beta1 * self.m.get(key, np.zeros_like(delta)) + (1 - self.beta1) * delta
            v = self.second_moment(self.v.get(key, np.full_like(delta, self.tau**2)), delta)
            self.m[key], self.v[key] = m, v
            new[key] = (w64 + self.eta * m / (np.sqrt(v) + self.tau)).astype(w.dtype)
        return GlobalModel(weights=new, round=round)

    def state_dict(self) -> dict[str, Any]:
        return {"m": self.m, "v": self.v}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.m, self.v = dict(state["m"]), dict(state["v"])


@register_aggregator("fedadagrad")
class FedAdagrad(FedOpt):
    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return v + delta**2


class _DecayedSecondMoment(FedOpt):
    """FedAdam and FedYogi weigh the second moment's past with ``beta2`` (FedAdagrad keeps all of it)."""

    def __init__(self, eta: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(eta, beta1, tau)
        if not 0 <= beta2 < 1:
            raise ValueError(f"{self.name or type(self).__name__} needs 0 <= beta2 < 1, got {beta2}")
        self.beta2 = beta2


@register_aggregator("fedadam")
class FedAdam(_DecayedSecondMoment):
    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1 - self.beta2) * delta**2


@register_aggregator("fedyogi")
class FedYogi(_DecayedSecondMoment):
    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return v - (1 - self.beta2) * delta**2 * np.sign(v - delta**2)
