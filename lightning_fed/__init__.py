"""lightning-fed: cross-silo federated learning for PyTorch Lightning on Ray.

    from lightning_fed import FederatedStrategy
    trainer = Trainer(strategy=FederatedStrategy(aggregator="fedavg", sync_every=1), max_epochs=10)
    trainer.fit(model, datamodule=dm)

Importing the package registers the Trainer strategy flags; the coordinator's process skips that and imports
only what aggregation needs.
"""

import os
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

COORDINATOR_ROLE_ENV = "LIGHTNING_FED_ROLE"
if os.environ.get(COORDINATOR_ROLE_ENV) != "coordinator":
    # `import lightning_fed` makes Trainer(strategy="fedavg") and the other aggregator flags work; the
    # coordinator's process (marked by the launcher) aggregates numpy arrays and never needs Lightning
    import_module("lightning_fed.strategy")

_EXPORTS = {
    "FederatedStrategy": "lightning_fed.strategy",
    "FederationConfigError": "lightning_fed.launcher",
    "SiteFailedError": "lightning_fed.launcher",
    "DPSGD": "lightning_fed.privacy",
    "Site": "lightning_fed.data.sites",
    "IID": "lightning_fed.data.partition",
    "Dirichlet": "lightning_fed.data.partition",
    "SizeAndRatio": "lightning_fed.data.partition",
    "Aggregator": "lightning_fed.strategies",
    "SiteAlgorithm": "lightning_fed.strategies",
    "available_aggregators": "lightning_fed.strategies",
    "register_aggregator": "lightning_fed.strategies",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_fed' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
