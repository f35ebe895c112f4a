"""lightning-fed: cross-silo federated learning for PyTorch Lightning on Ray.

    from lightning_fed import FederatedStrategy
    trainer = Trainer(strategy=FederatedStrategy(aggregator="fedavg", sync_every=1), max_epochs=10)
    trainer.fit(model, datamodule=dm)

Importing the package registers the Trainer strategy flags; the coordinator's process skips that and imports
only what aggregation needs. Run as the ``lightning-fed`` command, the package only starts a local Ray in the
background (:func:`lightning_fed.runtime.start_early`) and leaves the strategy (torch, Lightning) to the command,
so that Ray and a spare worker come up while the command imports them.
"""

import os
import sys
from importlib import import_module
from typing import Any, Optional

from lightning_fed.role import COORDINATOR_ROLE, COORDINATOR_ROLE_ENV  # lightning_fed.COORDINATOR_ROLE_ENV as before

__version__ = "0.1.0"

_RUNS_A_JOB = ("fit", "validate", "test", "compare", "sweep")


def _command_args() -> Optional[list[str]]:
    """The arguments of the ``lightning-fed`` command this process runs (``None`` when it runs something else)."""
    orig = list(getattr(sys, "orig_argv", []))
    if "-m" in orig and orig.index("-m") + 1 < len(orig) and orig[orig.index("-m") + 1] == "lightning_fed.cli":
        return orig[orig.index("-m") + 2 :]
    if sys.argv and os.path.basename(sys.argv[0]) == "lightning-fed":
        return sys.argv[1:]
    return None


if os.environ.get(COORDINATOR_ROLE_ENV) != COORDINATOR_ROLE:
    _args = _command_args()
    if (
        _args
        and _args[0] in _RUNS_A_JOB
        and not any(a in ("-h", "--help") or a.startswith("--print_config") for a in _args)
    ):
        # the command imports the strategy (torch, Lightning) itself, once this package is initialised
        # (lightning_fed.cli): Ray pickles the early spare worker's class by reference, an import of this package,
        # which waits for as long as the package is still initialising (measured: the spare was held back 0.9 s)
        import_module("lightning_fed.runtime").start_early()
    else:
        # `import lightning_fed` makes Trainer(strategy="fedavg") and the other aggregator flags work; the
        # coordinator's process (marked by the federation) aggregates numpy arrays and never needs Lightning
        import_module("lightning_fed.strategy")

_EXPORTS = {
    "FederatedStrategy": "lightning_fed.strategy",
    "FederationConfigError": "lightning_fed.errors",
    "RunFailedError": "lightning_fed.errors",
    "SiteFailedError": "lightning_fed.errors",
    "CoordinatorDiedError": "lightning_fed.errors",
    "Simulation": "lightning_fed.config",
    "Placement": "lightning_fed.config",
    "Checkpointing": "lightning_fed.config",
    "Cluster": "lightning_fed.config",
    "Reliability": "lightning_fed.config",
    "FineTuning": "lightning_fed.config",
    "Deployment": "lightning_fed.config",
    "DPSGD": "lightning_fed.privacy_settings",
    "Site": "lightning_fed.data.sites",
    "IID": "lightning_fed.data.partition",
    "Dirichlet": "lightning_fed.data.partition",
    "SizeAndRatio": "lightning_fed.data.partition",
    "Aggregator": "lightning_fed.strategies",
    "SiteAlgorithm": "lightning_fed.strategies",
    "available_aggregators": "lightning_fed.strategies",
    "register_aggregator": "lightning_fed.strategies",
    "warm_workers": "lightning_fed.warm",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_fed' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
