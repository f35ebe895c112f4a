"""Lightning's side of a federation: ``fit``/``validate``/``test`` run across the sites, results come home.

Lightning routes ``fit``/``validate``/``test`` through ``strategy.launcher.launch``; :class:`FederatedLauncher`
runs them in a :class:`~lightning_fed.federation.Federation` instead of in the driver process, then updates the
driver's Trainer the way DDP-spawn's launcher does (weights, ``trainer.state``, loop counters, callback metrics).
``predict`` runs locally on the global model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.strategies.launchers.launcher import _Launcher
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus

from lightning_fed.checkpoint import RoundCheckpoint, find_checkpoint, is_federated_checkpoint
from lightning_fed.config import FederationConfig
from lightning_fed.data.partition import IID
from lightning_fed.data.sites import Site, describe_sites, simulate_sites
from lightning_fed.federation import Federation, FederationConfigError, SiteFailedError, WorkerPool
from lightning_fed.loggers import log_driver_metrics, site_logger_specs
from lightning_fed.progress import show_evaluation
from lightning_fed.results import Evaluation, FitResult
from lightning_fed.runtime import RayRuntime
from lightning_fed.site import TrainerJob
from lightning_fed.strategies.site import load_weights, state_to_numpy
from lightning_fed.warm import current_pool

_STAGES = {TrainerFn.FITTING: "fit", TrainerFn.TESTING: "test", TrainerFn.VALIDATING: "validate"}


def trainer_settings(trainer: Trainer) -> dict[str, Any]:
    """The driver Trainer's loop settings, replayed in every site's Trainer."""
    return {
        "max_epochs": trainer.max_epochs,
        "min_epochs": trainer.min_epochs,
        "max_steps": trainer.max_steps,
        "min_steps": trainer.min_steps,
        "limit_train_batches": trainer.limit_train_batches,
        "limit_val_batches": trainer.limit_val_batches,
        "limit_test_batches": trainer.limit_test_batches,
        "val_check_interval": trainer.val_check_interval,
        "check_val_every_n_epoch": trainer.check_val_every_n_epoch,
        "num_sanity_val_steps": trainer.num_sanity_val_steps,
        "log_every_n_steps": trainer.log_every_n_steps,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "gradient_clip_val": trainer.gradient_clip_val,
        "gradient_clip_algorithm": getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm),
        "precision": trainer.precision,
        "reload_dataloaders_every_n_epochs": trainer.reload_dataloaders_every_n_epochs,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }


def user_callbacks(trainer: Trainer) -> list:
    """The driver's callbacks that sites replay (progress bars, model summaries and the CLI's config saver stay on
    the driver: they describe the run, not a site's training)."""
    from lightning.pytorch.cli import SaveConfigCallback

    return [cb for cb in trainer.callbacks if not isinstance(cb, (ProgressBar, ModelSummary, SaveConfigCallback))]


def refuse_unrunnable_fit(config: FederationConfig, trainer: Trainer, model: LightningModule) -> None:
    """What the federation cannot run with this Trainer and model, refused before anything starts: one line with the
    way out (the aggregator's needs of the model; what the round schedule rules out, :mod:`lightning_fed.rounds`)."""
    try:
        config.aggregator.check_model(model)
    except ValueError as err:
        raise FederationConfigError(str(err)) from None
    refused = config.rounds.refusals(
        trainer_settings(trainer),
        user_callbacks(trainer),
        config.checkpointing.every_n_rounds,
        config.reliability.tolerant,
    )
    if refused:
        raise FederationConfigError(refused[0])


def _module_loaders(model: LightningModule) -> dict[str, Any]:
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if is_overridden("setup", model):
        model.setup("fit")  # as Lightning would before asking for loaders
    return {
        split: getattr(model, f"{split}_dataloader")() if is_overridden(f"{split}_dataloader", model) else None
        for split in ("train", "val", "test")
    }


class FederatedLauncher(_Launcher):
    """Runs ``fit``/``validate``/``test`` across the federation instead of in the driver process.

    It owns the live :class:`Federation` (kept between ``fit`` and a later ``test`` on the same data), the Ray it
    runs on (started once, stopped by :meth:`shutdown`) and the last results; ``FederatedStrategy`` exposes them as
    ``strategy.federation``, ``last_fit`` and ``last_evaluation``.
    """

    def __init__(self, config: FederationConfig) -> None:
        self.config = config
        self.runtime: Optional[RayRuntime] = None
        self.federation: Optional[Federation] = None
        self.pool: Optional[WorkerPool] = None
        self.last_fit: Optional[FitResult] = None
        self.last_evaluation: Optional[Evaluation] = None
        self._run_root: Optional[str] = None

    @property
    def is_interactive_compatible(self) -> bool:
        return True

    def launch(self, function: Callable, *args: Any, trainer: Optional[Trainer] = None, **kwargs: Any) -> Any:
        assert trainer is not None
        fn = trainer.state.fn
        if fn == TrainerFn.FITTING:
            return self._fit(trainer, *args, **kwargs)
        if fn in (TrainerFn.TESTING, TrainerFn.VALIDATING):
            return self._evaluate(trainer, _STAGES[fn], *args, **kwargs)
        return function(*args, **kwargs)  # predict: the driver holds the global model

    def kill(self, signum: Any) -> None:
        self.shutdown()

    # -- the public seams (also used by compare/sweep) -------------------------------------------
    def sites(
        self, source: Any, model: LightningModule, splits: tuple[str, ...] = ("train", "val", "test")
    ) -> list[Site]:
        """The sites of ``source``: a datamodule's own (``federated_sites()``), or the simulation of a plain
        datamodule / dataloaders across ``config.simulation.num_sites`` sites."""
        sites = describe_sites(source) if isinstance(source, LightningDataModule) else None
        if sites is None:
            if isinstance(source, dict) and all(v is None for v in source.values()):
                raise FederationConfigError(
                    "no data: pass a datamodule (or dataloaders) to fit/test, as you would without lightning-fed"
                )
            sim = self.config.simulation
            partitioner = sim.partitioner if sim.partitioner is not None else IID(seed=self.config.seed)
            sites = simulate_sites(source, sim.num_sites, partitioner, splits, sim.site_cpus, sim.site_gpus)
        return sites

    def start(
        self,
        trainer: Trainer,
        model: LightningModule,
        sites: list[Site],
        stage: str,
        source_id: Optional[int] = None,
        resume: Optional[RoundCheckpoint] = None,
    ) -> Federation:
        """A new federation of ``sites`` for ``stage`` (any previous one is shut down first; Ray stays up)."""
        self._close_federation()
        if self.runtime is None or (self.runtime.address, self.runtime.init_kwargs) != self._cluster():
            self.runtime = RayRuntime(self.config.cluster.address, self.config.cluster.init_kwargs)
        job = TrainerJob(
            module_ref=None,
            trainer_settings=self.config.rounds.site_settings(trainer_settings(trainer)),
            callbacks=user_callbacks(trainer),
            loggers=site_logger_specs(trainer.loggers),
            root_dir=self.run_root(trainer),
            rounds=self.config.rounds,
            checkpoint_dir=self.checkpoint_dir(trainer, resume),
            checkpoint_every=self.config.checkpointing.every_n_rounds,
            metric_thresholds=self.config.metric_thresholds,
            class_balance=self.config.class_balance,
            fine_tuning=self.config.fine_tuning,
            deployment=self.config.deployment,
        )
        # after the W&B group is set (the job's logger specs), before the sites write into the run's folder: a CSV
        # logger that finds its folder in use warns that it will delete what is there
        if stage == "fit":
            for logger in trainer.loggers:
                logger.log_hyperparams({**dict(model.hparams), **self.config.hyperparameters()})
        self.federation = Federation(
            self.config,
            sites,
            model,
            job,
            stage,
            self.runtime,
            resume=resume,
            pool=self.pool if self.pool is not None else current_pool(),
            source_id=source_id,
        )
        return self.federation

    def _cluster(self) -> tuple:
        return (self.config.cluster.address or os.environ.get("RAY_ADDRESS"), dict(self.config.cluster.init_kwargs))

    def _close_federation(self) -> None:
        if self.federation is not None:
            self.federation.shutdown()
            self.federation = None

    def shutdown(self) -> None:
        """Finish the site loggers, end the workers, and stop Ray if it was started for this strategy."""
        self._close_federation()
        if self.runtime is not None:
            self.runtime.shutdown()
            self.runtime = None

    def run_root(self, trainer: Trainer) -> str:
        """Folder for this run's site logs and checkpoints: the first logger's ``log_dir``, else ``default_root_dir``."""
        if self._run_root is None:
            log_dir = trainer.loggers[0].log_dir if trainer.loggers else None
            self._run_root = str(log_dir or trainer.default_root_dir)
        return self._run_root

    def checkpoint_dir(self, trainer: Trainer, resume: Optional[RoundCheckpoint]) -> Optional[str]:
        checkpointing = self.config.checkpointing
        if checkpointing.every_n_rounds == 0:
            return None
        if resume is not None:
            return str(resume.folder.parent)
        if checkpointing.dirpath:
            return checkpointing.dirpath
        return str(Path(self.run_root(trainer)) / "federated_checkpoints")

    # -- fit -------------------------------------------------------------------------------------
    def _fit(
        self,
        trainer: Trainer,
        model: LightningModule,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        datamodule: Optional[LightningDataModule] = None,
        ckpt_path: Any = None,
        weights_only: Any = None,
    ) -> None:
        if isinstance(train_dataloaders, LightningDataModule):
            datamodule, train_dataloaders = train_dataloaders, None
        refuse_unrunnable_fit(self.config, trainer, model)
        resume = self._resume_point(ckpt_path)
        source = datamodule if datamodule is not None else {"train": train_dataloaders, "val": val_dataloaders}
        if isinstance(source, dict) and all(v is None for v in source.values()):
            source = _module_loaders(model)  # a module that brings its own *_dataloader hooks
        sites = self.sites(source, model)
        federation = self.start(
            trainer, model, sites, "fit", id(datamodule) if datamodule is not None else None, resume
        )
        try:
            rounds = self.config.rounds.total_rounds(trainer.max_epochs, trainer.max_steps)
            result = federation.fit(rounds, trainer.loggers, resume)
        except BaseException as err:
            federation.shutdown(graceful=False)
            if isinstance(err, SiteFailedError):
                err.checkpoint_dir = self.checkpoint_dir(trainer, resume)  # where to resume from (the CLI says so)
            raise
        self._bring_home(trainer, model, result)
        self.last_fit = result

    def _resume_point(self, ckpt_path: Any) -> Optional[RoundCheckpoint]:
        if ckpt_path is None:
            return None
        if ckpt_path == "last":
            if not self.config.checkpointing.dirpath:
                raise FederationConfigError(
                    "fit(ckpt_path='last') needs FederatedStrategy(checkpoint_dir=...) to know where the federation's checkpoints are"
                )
            return find_checkpoint(self.config.checkpointing.dirpath)
        if not is_federated_checkpoint(ckpt_path):
            raise FederationConfigError(
                f"fit(ckpt_path={str(ckpt_path)!r}) must be a federated checkpoint folder (one with last.json or manifest.json); "
                "to start from a plain Lightning checkpoint, load its weights into the model before fit"
            )
        return find_checkpoint(ckpt_path)

    def _bring_home(self, trainer: Trainer, model: LightningModule, result: FitResult) -> None:
        """Global weights, state, counters and metrics onto the driver's Trainer, as if it had trained itself."""
        if result.global_model is not None:
            load_weights(model, result.global_model.weights)
        reference = max(result.sites.values(), key=lambda r: r.global_step)
        trainer.fit_loop.load_state_dict(reference.fit_loop)
        trainer.fit_loop.restarting = False
        metrics = {}
        for name, site in result.sites.items():
            for key, value in site.callback_metrics.items():
                if key.startswith("fl/"):
                    metrics[key] = value
                else:
                    metrics[key if key.startswith("site/") else f"site/{name}/{key}"] = value
        metrics.update(result.metrics)
        metrics.update(self._own_keys(result, metrics))
        if (
            result.global_model is not None
        ):  # figures the aggregator reports about the global model (e.g. client-level ε)
            metrics.update({f"fl/{k}": float(v) for k, v in result.global_model.extras.get("metrics", {}).items()})
        if result.events:  # continue mode: rounds the federation aggregated without some sites
            everyone = len(self.federation.names) if self.federation is not None else len(result.sites)
            metrics["fl/rounds_with_sites_left_out"] = float(sum(len(r) < everyone for r in result.round_sites))
        for name, site in result.sites.items():  # what each site's fine-tuning ended with
            if site.fine_tuning is not None:
                metrics.update({f"site/{name}/fine_tuned/{k}": v for k, v in site.fine_tuning.train_metrics.items()})
        if result.privacy is not None:
            # the federation's guarantee is the weakest site's: the max ε, never a mean
            metrics["fl/dp_epsilon_max"] = result.privacy.max_epsilon
            metrics.update({f"site/{n}/dp_epsilon": p.epsilon for n, p in result.privacy.sites.items()})
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        trainer.state.status = TrainerStatus.FINISHED
        trainer.state.stage = None
        trainer.training = False
        for logger in trainer.loggers:
            logger.save()

    def _own_keys(self, result: FitResult, metrics: dict[str, float]) -> dict[str, float]:
        """The module's own keys (``val_loss``, ...) as a plain fit would leave them, with federated values: the
        merged ``fl/<key>`` where the sites merged it, else the mean of the sites' values weighted by training samples."""
        assert self.federation is not None
        sizes = {n: max(r.train_samples, 0) for n, r in self.federation.ready.items()}
        own: dict[str, float] = {}
        for key in sorted({k for s in result.sites.values() for k in s.callback_metrics if "/" not in k}):
            if f"fl/{key}" in metrics:
                own[key] = metrics[f"fl/{key}"]
                continue
            values = {n: s.callback_metrics[key] for n, s in result.sites.items() if key in s.callback_metrics}
            total = sum(sizes.get(n, 0) for n in values)
            own[key] = (
                (sum(v * sizes.get(n, 0) for n, v in values.items()) / total)
                if total
                else sum(values.values()) / len(values)
            )
        return own

    # -- evaluate --------------------------------------------------------------------------------
    def _evaluate(
        self,
        trainer: Trainer,
        stage: str,
        model: Optional[LightningModule] = None,
        dataloaders: Any = None,
        ckpt_path: Any = None,
        verbose: bool = True,
        datamodule: Optional[LightningDataModule] = None,
        weights_only: Any = None,
    ) -> list[dict[str, Any]]:
        if isinstance(dataloaders, LightningDataModule):
            datamodule, dataloaders = dataloaders, None
        model = model or trainer.lightning_module
        if model is None:
            raise FederationConfigError(f"trainer.{stage}() needs a model: pass one or call fit first")
        if ckpt_path is not None:
            self._load_weights(model, ckpt_path)
        federation = self.federation
        reuse = (
            federation is not None
            and federation.alive
            and (
                (datamodule is None and dataloaders is None)
                or (datamodule is not None and id(datamodule) == federation.source_id)
            )
        )
        if not reuse:
            split = "test" if stage == "test" else "val"
            source = datamodule if datamodule is not None else {split: dataloaders}
            if datamodule is None and dataloaders is None:
                raise FederationConfigError(f"trainer.{stage}() needs data: pass the datamodule or dataloaders")
            federation = self.start(
                trainer,
                model,
                self.sites(source, model, splits=(split,)),
                stage,
                id(datamodule) if datamodule is not None else None,
            )
        assert federation is not None
        evaluation = federation.evaluate(stage, state_to_numpy(model.state_dict()))
        output = evaluation.metrics()
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in output.items()})
        log_driver_metrics(trainer.loggers, output, step=None)
        self.last_evaluation = evaluation
        if verbose:
            show_evaluation(evaluation)
        trainer.state.status = TrainerStatus.FINISHED
        trainer.state.stage = None
        return [output]

    def _load_weights(self, model: LightningModule, ckpt_path: Any) -> None:
        if ckpt_path in ("last", "best") or is_federated_checkpoint(ckpt_path):
            root = self.config.checkpointing.dirpath if ckpt_path in ("last", "best") else ckpt_path
            if not root:
                raise FederationConfigError(f"ckpt_path={ckpt_path!r} needs FederatedStrategy(checkpoint_dir=...)")
            state = find_checkpoint(root).server_state()
            load_weights(model, state["global_model"].weights)
            return
        if not Path(str(ckpt_path)).is_file():
            raise FederationConfigError(f"checkpoint {ckpt_path} does not exist")
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(checkpoint.get("state_dict", checkpoint))
