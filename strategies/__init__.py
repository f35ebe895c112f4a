"""Federated algorithms, one short file each, found by name through the registry."""

from lightning_fed.strategies.base import (
    Aggregator,
    GlobalModel,
    SiteAlgorithm,
    SiteUpdate,
    Weights,
    load_weights,
    state_to_numpy,
)
from lightning_fed.strategies.registry import available_aggregators, get_aggregator, register_aggregator
from lightning_fed.strategies.fedavg import FedAvg  # noqa: E402  (registers "fedavg")

__all__ = [
    "Aggregator",
    "FedAvg",
    "GlobalModel",
    "SiteAlgorithm",
    "SiteUpdate",
    "Weights",
    "available_aggregators",
    "get_aggregator",
    "load_weights",
    "register_aggregator",
    "state_to_numpy",
]
