"""``FederatedStrategy``: the one flag that turns a Lightning script into a federation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from lightning.pytorch import Trainer
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry

from lightning_fed.data.partition import IID, Partitioner
from lightning_fed.launcher import FederatedLauncher, Federation, SitePool
from lightning_fed.privacy import DPSGD, PrivacySpec
from lightning_fed.strategies import Aggregator, available_aggregators, get_aggregator


class FederatedStrategy(SingleDeviceStrategy):
    """Train one model across sites: each site a Ray actor with its own Trainer, data and state.

    ``Trainer(strategy=FederatedStrategy(aggregator="fedavg", sync_every=1), max_epochs=10)`` and then
    ``trainer.fit(model, datamodule=dm)`` as usual. Every site runs the same Lightning loop on its own data;
    every ``sync_every`` epochs the sites hand their weights to the coordinator, which aggregates them with the
    named algorithm and hands the global model back before validation. After ``fit`` the driver's
    ``trainer.lightning_module`` holds the global model; ``trainer.test`` evaluates it on every site's own test
    data and reports per-site and federated metrics.

    Args:
        aggregator: a registered name (``"fedavg"``, ...) or an :class:`~lightning_fed.strategies.Aggregator`.
        sync_every: epochs between weight hand-overs (k).
        aggregator_kwargs: options for a named aggregator, e.g. ``{"mu": 0.01}``.
        num_sites: simulated sites when the datamodule does not describe its own (``federated_sites()``).
        partitioner: how simulation splits the training data (:class:`IID` by default, or ``Dirichlet``,
            ``SizeAndRatio``, any callable ``(labels, num_sites) -> index arrays``).
        site_cpus, site_gpus: Ray resources per simulated site (sites from a datamodule carry their own).
        checkpoint_dir: where round checkpoints go (default ``<log_dir>/federated_checkpoints``);
            ``fit(ckpt_path=<that folder>)`` or ``fit(ckpt_path="last")`` resumes the federation.
        checkpoint_every: rounds between checkpoints (0 disables them).
        keep_checkpoints: complete rounds kept on disk.
        ray_address: a cluster to join (default: ``RAY_ADDRESS``, else a local Ray started and stopped here).
        ray_init_kwargs: extra ``ray.init`` arguments (e.g. ``{"num_cpus": 8}`` for a local Ray).
        barrier_timeout: seconds a site may wait for the others at a barrier before the run aborts (None: no limit;
            a failed or dead site aborts at once regardless).
        placement_timeout: seconds to wait for the cluster to place every site.
        seed: base seed; site ``i`` is seeded with ``seed + i`` (default: ``PL_GLOBAL_SEED`` or 0).
        progress: show the federated progress view on the driver.
        metric_thresholds: bins for AUROC (binned states merge exactly across sites).
        privacy: sample-level DP-SGD (Opacus): one :class:`~lightning_fed.privacy.DPSGD` for every site, or a dict
            ``{site name: DPSGD | None}`` (``"*"`` for the rest) to make only some sites private. Each private
            site keeps one accountant for the whole run; ``trainer.callback_metrics["fl/dp_epsilon_max"]`` and
            ``strategy.last_fit["privacy"]`` report ε per site and the max over sites.
        audit_messages: record the structure (paths, array shapes, dtypes; never values) of everything a site sends
            the coordinator or returns to the driver; read it with ``strategy.federation.audit()``.
        secagg: secure aggregation: sites mask their (fixed-point) updates with pairwise masks agreed by
            Diffie-Hellman, so the coordinator sees only masked updates and their true sum. Works with averaging
            rules (``fedavg``, ``fedprox``, ``fedbn``, ``fedfbn``, server optimizers, ``dp_fedavg``).
        class_balance: ``"loss"`` (class-weighted loss) or ``"sampler"`` (balanced sampling), each site weighting
            by its own training labels (:class:`~lightning_fed.balance.ClassBalance`); ``None`` leaves the loss as is.

    ``strategy.site_pool`` (a :class:`~lightning_fed.launcher.SitePool`, set by ``lightning-fed compare``/``sweep``)
    keeps site actors warm between runs of the same site layout.
    """

    strategy_name = "federated"

    def __init__(
        self,
        aggregator: Union[str, Aggregator] = "fedavg",
        sync_every: int = 1,
        aggregator_kwargs: Optional[dict[str, Any]] = None,
        num_sites: int = 2,
        partitioner: Optional[Partitioner] = None,
        site_cpus: float = 1.0,
        site_gpus: float = 0.0,
        checkpoint_dir: Optional[str] = None,
        checkpoint_every: int = 1,
        keep_checkpoints: int = 2,
        ray_address: Optional[str] = None,
        ray_init_kwargs: Optional[dict[str, Any]] = None,
        barrier_timeout: Optional[float] = None,
        placement_timeout: float = 60.0,
        seed: Optional[int] = None,
        progress: bool = True,
        metric_thresholds: int = 1000,
        poll_interval: float = 0.5,
        privacy: PrivacySpec = None,
        audit_messages: bool = False,
        secagg: bool = False,
        class_balance: Optional[str] = None,
    ) -> None:
        super().__init__(device="cpu")
        if isinstance(aggregator, str):
            self.aggregator = get_aggregator(aggregator, **(aggregator_kwargs or {}))
        elif isinstance(aggregator, Aggregator):
            if aggregator_kwargs:
                raise ValueError("aggregator_kwargs only applies to a named aggregator; configure the instance directly")
            self.aggregator = aggregator
        else:
            raise TypeError(f"aggregator must be a registered name or an Aggregator, got {type(aggregator).__name__}")
        for name, value, low in (("sync_every", sync_every, 1), ("num_sites", num_sites, 1), ("checkpoint_every", checkpoint_every, 0), ("keep_checkpoints", keep_checkpoints, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.sync_every = sync_every
        self.num_sites = num_sites
        self.seed = int(seed if seed is not None else os.environ.get("PL_GLOBAL_SEED", 0))
        self.partitioner: Partitioner = partitioner if partitioner is not None else IID(seed=self.seed)
        self.site_cpus, self.site_gpus = site_cpus, site_gpus
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every, self.keep_checkpoints = checkpoint_every, keep_checkpoints
        self.ray_address, self.ray_init_kwargs = ray_address, dict(ray_init_kwargs or {})
        self.barrier_timeout, self.placement_timeout = barrier_timeout, placement_timeout
        self.progress, self.metric_thresholds, self.poll_interval = progress, metric_thresholds, poll_interval
        if privacy is not None and not isinstance(privacy, (DPSGD, dict)):
            raise ValueError(f"privacy must be a DPSGD or a dict of site name -> DPSGD, got {type(privacy).__name__}")
        self.privacy = privacy
        self.audit_messages = audit_messages
        if secagg:  # the coordinator then only ever sees masked updates and their true sum
            from lightning_fed.strategies.secagg import SecureAggregation

            self.aggregator = SecureAggregation(self.aggregator)
        self.secagg = secagg
        if class_balance not in (None, "loss", "sampler"):
            raise ValueError(f"class_balance must be 'loss', 'sampler' or None, got {class_balance!r}")
        self.class_balance = class_balance
        self.site_pool: Optional[SitePool] = None
        self.federation: Optional[Federation] = None
        self.last_fit: Optional[dict[str, Any]] = None
        self.last_evaluation: Optional[dict[str, Any]] = None
        self._run_root: Optional[str] = None

    def _configure_launcher(self) -> None:
        self._launcher = FederatedLauncher(self)

    def describe(self) -> dict[str, Any]:
        """The federation's settings, logged as hyperparameters."""
        return {"fl_aggregator": repr(self.aggregator), "fl_sync_every": self.sync_every}

    def run_root(self, trainer: Trainer) -> str:
        """Folder for this run's site logs and checkpoints: the first logger's ``log_dir``, else ``default_root_dir``."""
        if self._run_root is None:
            log_dir = trainer.loggers[0].log_dir if trainer.loggers else None
            self._run_root = str(log_dir or trainer.default_root_dir)
        return self._run_root

    def resolve_checkpoint_dir(self, trainer: Trainer, resume: Any) -> Optional[str]:
        if self.checkpoint_every == 0:
            return None
        if resume is not None:
            return str(resume.folder.parent)
        if self.checkpoint_dir:
            return self.checkpoint_dir
        return str(Path(self.run_root(trainer)) / "federated_checkpoints")

    def shutdown(self) -> None:
        """Finish the site loggers and end the site actors (and Ray, if it was started for this run)."""
        if self.federation is not None:
            self.federation.shutdown()
            self.federation = None


def _register_flags() -> None:
    """``Trainer(strategy="fedavg")`` and friends: one lower-case flag per registered aggregator."""
    for name in ["federated", *available_aggregators()]:
        if name not in StrategyRegistry:
            aggregator = "fedavg" if name == "federated" else name
            StrategyRegistry.register(name, FederatedStrategy, description=f"lightning-fed: federated training with {aggregator}", aggregator=aggregator)


_register_flags()
