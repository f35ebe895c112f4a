"""Federated algorithms, one short file each, found by name through the registry.

Server halves (:class:`Aggregator`) need only numpy; site halves (:class:`SiteAlgorithm`) are Lightning callbacks
and are imported on first use, so the coordinator process never loads Lightning.
"""

from importlib import import_module
from typing import Any

from lightning_fed.strategies.base import Aggregator, GlobalModel, SiteUpdate, Weights, is_averageable
from lightning_fed.strategies.registry import available_aggregators, get_aggregator, register_aggregator
from lightning_fed.strategies.fedavg import FedAvg  # noqa: E402  (registers "fedavg")
from lightning_fed.strategies.fedopt import FedAdagrad, FedAdam, FedYogi  # noqa: E402
from lightning_fed.strategies.robust import Median, TrimmedMean  # noqa: E402

_SITE_HALF = ("SiteAlgorithm", "load_weights", "state_to_numpy")
_WITH_SITE_HALF = {"FedProx": "fedprox", "FedBN": "fedbn", "FedFBN": "fedfbn", "Scaffold": "scaffold", "DPFedAvg": "dp_fedavg", "Local": "local"}

__all__ = [
    "Aggregator",
    "DPFedAvg",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedBN",
    "FedFBN",
    "FedProx",
    "FedYogi",
    "Local",
    "Median",
    "Scaffold",
    "TrimmedMean",
    "GlobalModel",
    "SiteAlgorithm",
    "SiteUpdate",
    "Weights",
    "available_aggregators",
    "get_aggregator",
    "is_averageable",
    "load_weights",
    "register_aggregator",
    "state_to_numpy",
]


def __getattr__(name: str) -> Any:
    if name in _SITE_HALF:
        from lightning_fed.strategies import site

        return getattr(site, name)
    if name in _WITH_SITE_HALF:
        return getattr(import_module(f"lightning_fed.strategies.{_WITH_SITE_HALF[name]}"), name)
    raise AttributeError(f"module 'lightning_fed.strategies' has no attribute {name!r}")
