"""lightning-fed: cross-silo federated learning for PyTorch Lightning on Ray.

    from lightning_fed import FederatedStrategy
    trainer = Trainer(strategy=FederatedStrategy(aggregator="fedavg", sync_every=1), max_epochs=10)
    trainer.fit(model, datamodule=dm)
"""

from lightning_fed.data import IID, Dirichlet, Site, SizeAndRatio
from lightning_fed.launcher import FederationConfigError, SiteFailedError
from lightning_fed.strategies import Aggregator, SiteAlgorithm, available_aggregators, register_aggregator
from lightning_fed.strategy import FederatedStrategy

__version__ = "0.1.0"

__all__ = [
    "Aggregator",
    "Dirichlet",
    "FederatedStrategy",
    "FederationConfigError",
    "IID",
    "Site",
    "SiteAlgorithm",
    "SiteFailedError",
    "SizeAndRatio",
    "available_aggregators",
    "register_aggregator",
]
