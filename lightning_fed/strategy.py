"""``FederatedStrategy``: the one flag that turns a Lightning script into a federation."""

from __future__ import annotations

import os
from typing import Any, Optional, Union

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry

from lightning_fed.config import (
    Checkpointing,
    Cluster,
    Deployment,
    FederationConfig,
    FineTuning,
    Placement,
    Reliability,
    Simulation,
    merge_group,
    shorthand_groups,
)
from lightning_fed.data.sites import Site
from lightning_fed.federation import Federation, WorkerPool
from lightning_fed.launcher import FederatedLauncher
from lightning_fed.privacy import PrivacySpec
from lightning_fed.results import Evaluation, FitResult
from lightning_fed.strategies import Aggregator, available_aggregators, get_aggregator
from lightning_fed.strategies.compression import Codec, Compressed, get_codec
from lightning_fed.strategies.partial import PartialSharing, PersonalSpec


class FederatedStrategy(SingleDeviceStrategy):
    """Train one model across sites: each site with its own Trainer, data and state, hosted by Ray worker processes.

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
        privacy: sample-level DP-SGD (Opacus): one :class:`~lightning_fed.privacy_settings.DPSGD` for every site, or a dict
            ``{site name: DPSGD | None}`` (``"*"`` for the rest) to make only some sites private. Each private
            site keeps one accountant for the whole run; ``trainer.callback_metrics["fl/dp_epsilon_max"]`` and
            ``strategy.last_fit.privacy`` report ε per site and the max over sites.
        secagg: secure aggregation: every round, sites agree fresh keys (X25519, signed with per-site Ed25519
            identity keys) and mask their fixed-point updates with pairwise ChaCha20 masks, so the coordinator sees
            only masked updates and their true sum; a site that drops after masking has its masks rebuilt from
            Shamir shares held by the others. Works with averaging rules (``fedavg``, ``fedprox``, ``fedbn``,
            ``fedfbn``, server optimizers, ``dp_fedavg``).
        secagg_kwargs: options of secure aggregation: ``threshold`` (shares needed to rebuild a dropped site's
            mask key; default a majority of the round's sites), ``identity_dir`` (a folder of per-site identity keys
            made by ``lightning-fed keys``; default: keys made for the run), ``fractional_bits``.
        compression: send each update as an encoded difference from the global model: ``"fp16"`` (half
            precision), ``"int8"`` (8-bit with a scale per block of 256 values) or ``"topk"`` (the 1 % largest values
            of each tensor, with error feedback); options in ``compression_kwargs`` (``{"fraction": 0.05}``,
            ``{"block": 64}``, ``{"error_feedback": False}``) or a :class:`~lightning_fed.strategies.compression.Codec`
            instance. Composes with every rule and with DP (DP-FedAvg's clipped update stays within its clip norm).
        compression_kwargs: options of a named ``compression``.
        class_balance: ``"loss"`` (class-weighted loss) or ``"sampler"`` (balanced sampling), each site weighting
            by its own training labels (:class:`~lightning_fed.balance.ClassBalance`); ``None`` leaves the loss as is.
        audit_messages: record the structure (paths, array shapes, dtypes; never values) of everything a site sends
            the coordinator or returns to the driver; read it with ``strategy.federation.audit()``.
        simulation: how a plain datamodule is split into sites (:class:`~lightning_fed.config.Simulation`:
            ``num_sites``, ``partitioner``, ``site_cpus``, ``site_gpus``).
        placement: how sites are placed onto worker processes (:class:`~lightning_fed.config.Placement`: by
            default sites that share a machine are packed onto a few workers sized to its CPUs/GPUs;
            ``sites_per_worker=1`` gives every site a process of its own). Never changes results.
        checkpointing: round checkpoints (:class:`~lightning_fed.config.Checkpointing`: ``dirpath``,
            ``every_n_rounds``, ``keep``); ``fit(ckpt_path=<dirpath>)`` or ``fit(ckpt_path="last")`` resumes.
        cluster: which Ray cluster (:class:`~lightning_fed.config.Cluster`: ``address``, ``init_kwargs``); by default
            ``RAY_ADDRESS`` (as under ``ray job submit``) or a connected Ray, else a local Ray for the run.
        seed: base seed; site ``i`` is seeded with ``seed + i`` (default: ``PL_GLOBAL_SEED`` or 0).
        reliability: what the federation tolerates (:class:`~lightning_fed.config.Reliability`:
            ``on_site_failure`` ``"abort"`` or ``"continue"`` (a failed site is left out, restarted and rejoins),
            ``min_sites``, ``round_timeout``, ``barrier_timeout``, ``max_update_norm_ratio``); an update holding NaN
            or Inf is always refused, naming its site.
        metric_thresholds: bins for AUROC (binned states merge exactly across sites).
        progress: show the federated progress view on the driver.
        sync_every_steps: count a round in optimizer steps instead of epochs, FLamby's way: every site hands its
            update over after exactly this many steps, wherever its epochs end, and validates at each round's end;
            give ``Trainer(max_steps=rounds * sync_every_steps)`` (:mod:`lightning_fed.rounds` says what this
            rules out: round checkpoints, continue mode, ``EarlyStopping``, ``max_time``).
        fine_tuning: after the last round every site fine-tunes the model it ended with on its own data, with its own
            optimizer state (:class:`~lightning_fed.config.FineTuning`: ``steps`` or ``epochs``; FLamby's FedAvg +
            fine-tuning); ``trainer.test`` then reports the global model under the module's own keys and each site's
            fine-tuned model under ``fine_tuned/...``. Not with DP-SGD (its accountant would not cover the steps).
        personal: partial sharing: the state-dict tensors these name (shell patterns such as ``["classifier.*"]``, or
            a callable ``name -> bool``) stay at each site: never sent, never overwritten by aggregation, tested at
            their site; composes with every averaging rule (:mod:`lightning_fed.strategies.partial`).
        deployment: after the run every site picks, on its own validation data, the model it should deploy (global,
            personal, fine-tuned, local-only) and calibrates it (:class:`~lightning_fed.config.Deployment`);
            ``trainer.test`` reports it under ``deployed/...`` and ``last_fit.sites[name].deployment`` says why.
        **shorthands: today's flat names, sorted into the groups above: ``num_sites``, ``partitioner``,
            ``site_cpus``, ``site_gpus``, ``checkpoint_dir``, ``checkpoint_every``, ``keep_checkpoints``,
            ``ray_address``, ``ray_init_kwargs``, ``placement_timeout``, ``workers``, ``sites_per_worker``,
            ``worker_cpus``, ``barrier_timeout``, ``max_update_norm_ratio``, ``on_site_failure``, ``min_sites``,
            ``round_timeout``, ``fine_tune_steps``, ``fine_tune_epochs`` (:func:`~lightning_fed.config.shorthand_groups`).

    After a run, ``strategy.last_fit`` (:class:`~lightning_fed.results.FitResult`) and ``strategy.last_evaluation``
    (:class:`~lightning_fed.results.Evaluation`) hold typed results, and ``strategy.federation`` the live
    federation until :meth:`shutdown`.
    """

    strategy_name = "federated"

    def __init__(
        self,
        aggregator: Union[str, Aggregator] = "fedavg",
        sync_every: int = 1,
        aggregator_kwargs: Optional[dict[str, Any]] = None,
        privacy: PrivacySpec = None,
        secagg: bool = False,
        secagg_kwargs: Optional[dict[str, Any]] = None,
        compression: Union[str, Codec, None] = None,
        compression_kwargs: Optional[dict[str, Any]] = None,
        class_balance: Optional[str] = None,
        audit_messages: bool = False,
        simulation: Optional[Simulation] = None,
        placement: Optional[Placement] = None,
        checkpointing: Optional[Checkpointing] = None,
        cluster: Optional[Cluster] = None,
        reliability: Optional[Reliability] = None,
        seed: Optional[int] = None,
        metric_thresholds: int = 1000,
        progress: bool = True,
        sync_every_steps: Optional[int] = None,
        fine_tuning: Optional[FineTuning] = None,
        personal: Optional[PersonalSpec] = None,
        deployment: Optional[Deployment] = None,
        **shorthands: Any,
    ) -> None:
        super().__init__(device="cpu")
        try:
            groups = shorthand_groups(**shorthands)
        except TypeError as err:
            raise TypeError(f"FederatedStrategy: {err} (see help(FederatedStrategy) for the options)") from None
        if isinstance(aggregator, str):
            rule = get_aggregator(aggregator, **(aggregator_kwargs or {}))
        elif isinstance(aggregator, Aggregator):
            if aggregator_kwargs:
                raise ValueError(
                    "aggregator_kwargs only applies to a named aggregator; configure the instance directly"
                )
            rule = aggregator
        else:
            raise TypeError(f"aggregator must be a registered name or an Aggregator, got {type(aggregator).__name__}")
        if personal is not None:  # innermost: the personal tensors are gone before anything is encoded or masked
            rule = PartialSharing(rule, personal)
        if compression is not None:  # sites send encoded differences; the coordinator decodes before the rule
            rule = Compressed(rule, get_codec(compression, compression_kwargs))
        elif compression_kwargs:
            raise ValueError("compression_kwargs given without compression: name a codec (compression='topk', ...)")
        if secagg:  # the coordinator then only ever sees masked updates and their true sum
            from lightning_fed.strategies.secagg import SecureAggregation

            try:
                rule = SecureAggregation(rule, **(secagg_kwargs or {}))
            except TypeError as err:
                raise ValueError(f"bad secagg_kwargs: {err} (threshold, identity_dir, fractional_bits)") from None
        elif secagg_kwargs:
            raise ValueError("secagg_kwargs given without secagg=True: turn secure aggregation on or drop its options")
        if groups["fine_tuning"]:
            if fine_tuning is not None:
                raise ValueError("give fine_tuning=FineTuning(...) or fine_tune_steps/fine_tune_epochs, not both")
            fine_tuning = FineTuning(**groups["fine_tuning"])
        self._config = FederationConfig(
            aggregator=rule,
            sync_every=sync_every,
            seed=int(seed if seed is not None else os.environ.get("PL_GLOBAL_SEED", 0)),
            simulation=merge_group(simulation, Simulation, groups["simulation"], "simulation"),
            placement=merge_group(placement, Placement, groups["placement"], "placement"),
            checkpointing=merge_group(checkpointing, Checkpointing, groups["checkpointing"], "checkpointing"),
            cluster=merge_group(cluster, Cluster, groups["cluster"], "cluster"),
            reliability=merge_group(reliability, Reliability, groups["reliability"], "reliability"),
            privacy=privacy,
            class_balance=class_balance,
            audit_messages=audit_messages,
            metric_thresholds=metric_thresholds,
            progress=progress,
            sync_every_steps=sync_every_steps,
            fine_tuning=fine_tuning,
            deployment=deployment,
        )
        self._launcher: Optional[FederatedLauncher] = None

    # -- configuration ---------------------------------------------------------------------------
    @property
    def config(self) -> FederationConfig:
        """The frozen settings every federation of this strategy runs with."""
        return self._config

    @property
    def aggregator(self) -> Aggregator:
        return self._config.aggregator

    def reconfigure(self, **changes: Any) -> None:
        """Change settings for the next run (``compare`` trains the same recipe as ``local``, ``pooled``, ...)."""
        self._config = self._config.replace(**changes)
        if self._launcher is not None:
            self._launcher.config = self._config

    def _configure_launcher(self) -> None:
        # kept when a second Trainer takes this strategy: the live federation and last results stay reachable
        if self._launcher is None:
            self._launcher = FederatedLauncher(self._config)

    @property
    def federated_launcher(self) -> FederatedLauncher:
        self._configure_launcher()
        assert self._launcher is not None
        return self._launcher

    # -- what a run leaves -----------------------------------------------------------------------
    @property
    def federation(self) -> Optional[Federation]:
        """The live federation (sites stay up between ``fit`` and ``test``) until :meth:`shutdown`."""
        return self._launcher.federation if self._launcher is not None else None

    @property
    def last_fit(self) -> Optional[FitResult]:
        return self._launcher.last_fit if self._launcher is not None else None

    @property
    def last_evaluation(self) -> Optional[Evaluation]:
        return self._launcher.last_evaluation if self._launcher is not None else None

    @property
    def worker_pool(self) -> Optional[WorkerPool]:
        """Warm workers kept between runs of the same layout (set by ``lightning-fed compare``/``sweep``)."""
        return self._launcher.pool if self._launcher is not None else None

    @worker_pool.setter
    def worker_pool(self, pool: Optional[WorkerPool]) -> None:
        self.federated_launcher.pool = pool

    def sites(
        self, source: Any, model: LightningModule, splits: tuple[str, ...] = ("train", "val", "test")
    ) -> list[Site]:
        """The sites a datamodule (or its simulation) gives, as a federation of this strategy would run them."""
        return self.federated_launcher.sites(source, model, splits)

    def start_federation(
        self, trainer: Trainer, model: LightningModule, sites: list[Site], stage: str, source_id: Optional[int] = None
    ) -> Federation:
        """Start a federation of ``sites`` for ``stage`` (``"fit"``, ``"validate"`` or ``"test"``) outside
        ``trainer.fit``/``trainer.test``, and return it: ``compare`` tests a trained model this way at sites it did
        not train on (``federation.evaluate("test", weights)``).

        ``trainer`` is put in that stage, as ``trainer.test(...)`` would be, and its loop settings, callbacks and
        loggers are what every site replays. Any live federation of this strategy is shut down first (Ray stays up);
        the new one runs on this strategy's :attr:`worker_pool` when it has one and stays reachable as
        :attr:`federation` until :meth:`shutdown`. ``source_id`` names the data the sites came from (e.g.
        ``id(datamodule)``), so that a later ``trainer.test`` on the same data reuses the federation."""
        from lightning.pytorch.trainer.states import TrainerFn

        trainer.state.fn = TrainerFn(stage)
        return self.federated_launcher.start(trainer, model, sites, stage, source_id)

    def shutdown(self) -> None:
        """Finish the site loggers and end the workers (and Ray, if it was started for this run)."""
        if self._launcher is not None:
            self._launcher.shutdown()


def _register_flags() -> None:
    """``Trainer(strategy="fedavg")`` and friends: one lower-case flag per registered aggregator."""
    for name in ["federated", *available_aggregators()]:
        if name not in StrategyRegistry:
            aggregator = "fedavg" if name == "federated" else name
            StrategyRegistry.register(
                name,
                FederatedStrategy,
                description=f"lightning-fed: federated training with {aggregator}",
                aggregator=aggregator,
            )


_register_flags()
