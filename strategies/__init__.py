"""Federated algorithms, one short file each, found by name through the registry.

Server halves (:class:`Aggregator`, one module per algorithm) need only numpy, so the coordinator's process never
loads torch or Lightning. Site halves (:class:`SiteAlgorithm`, Lightning callbacks) live in
:mod:`lightning_fed.strategies.site` and are imported where a site runs.
"""

from typing import Any

from lightning_fed.strategies.base import Aggregator, GlobalModel, SiteContext, SiteUpdate, Weights, is_averageable
from lightning_fed.strategies.cyclic import Cyclic  # noqa: E402
from lightning_fed.strategies.ditto import Ditto  # noqa: E402
from lightning_fed.strategies.dp_fedavg import DPFedAvg  # noqa: E402
from lightning_fed.strategies.fedavg import FedAvg  # noqa: E402  (each import registers its rule's name)
from lightning_fed.strategies.fedbn import FedBN  # noqa: E402
from lightning_fed.strategies.fedfbn import FedFBN  # noqa: E402
from lightning_fed.strategies.fedopt import FedAdagrad, FedAdam, FedYogi  # noqa: E402
from lightning_fed.strategies.fedper import FedPer  # noqa: E402
from lightning_fed.strategies.fedprox import FedProx  # noqa: E402
from lightning_fed.strategies.fedrep import FedRep  # noqa: E402
from lightning_fed.strategies.fiva import Fiva  # noqa: E402
from lightning_fed.strategies.local import Local  # noqa: E402
from lightning_fed.strategies.partial import PartialSharing  # noqa: E402
from lightning_fed.strategies.registry import available_aggregators, get_aggregator, register_aggregator
from lightning_fed.strategies.robust import Median, TrimmedMean  # noqa: E402
from lightning_fed.strategies.scaffold import Scaffold  # noqa: E402
from lightning_fed.strategies.uncertainty_weighted import UncertaintyWeighted  # noqa: E402

_SITE_HALF = ("SiteAlgorithm", "load_weights", "state_to_numpy")

__all__ = [
    "Aggregator",
    "Cyclic",
    "DPFedAvg",
    "Ditto",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedBN",
    "FedFBN",
    "FedPer",
    "FedRep",
    "FedProx",
    "FedYogi",
    "Fiva",
    "Local",
    "Median",
    "PartialSharing",
    "Scaffold",
    "TrimmedMean",
    "UncertaintyWeighted",
    "GlobalModel",
    "SiteAlgorithm",
    "SiteContext",
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
    if name in _SITE_HALF:  # Lightning callbacks: loaded only where they are used
        from lightning_fed.strategies import site

        return getattr(site, name)
    raise AttributeError(f"module 'lightning_fed.strategies' has no attribute {name!r}")
