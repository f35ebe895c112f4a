"""One site: its own Trainer, LightningModule, data, algorithm state and random streams for the whole run.

The site's Trainer is built once and lives through every round, so optimizer and LR-scheduler state, epoch and
step counters, EarlyStopping patience, ModelCheckpoint top-k and any privacy accountant behave exactly as in a
normal ``fit``. Its data is set up inside its worker from the site's own datamodule: samples never leave it.

A site is hosted by a worker process (:mod:`lightning_fed.worker`), alone or with other sites; every method of
:class:`SiteRuntime` runs on the worker's compute thread with the site's own random streams in place
(:mod:`lightning_fed.scheduler`). Everything the site asks of the coordinator goes through its
:class:`~lightning_fed.context.SiteContext`, and the worker's other sites compute while it waits.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import ray
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.trainer.states import RunningStage

from lightning_fed.balance import ClassBalance
from lightning_fed.config import Deployment, FineTuning
from lightning_fed.context import SiteContext
from lightning_fed.coordinator_process import CoordinatorLink
from lightning_fed.data.sites import Site
from lightning_fed.deploy import calibration_on, choose_deployment
from lightning_fed.fine_tuning import fine_tune
from lightning_fed.loggers import SiteLoggerSpec, finish_site_loggers
from lightning_fed.privacy import DPSGD, SiteDPSGD
from lightning_fed.results import SiteDeployment, SiteEvaluation, SiteFineTuning, SiteFit, SitePrivacy, SiteReady
from lightning_fed.rounds import RoundSchedule
from lightning_fed.scheduler import Scheduler, SiteState
from lightning_fed.site_metrics import SiteMetrics
from lightning_fed.strategies.base import GlobalModel, Weights
from lightning_fed.strategies.site import SiteAlgorithm, load_weights, state_to_numpy
from lightning_fed.sync import EpochCount, FederatedSync, RoundClose, restore_carried, scalar_metrics


@dataclass(frozen=True)
class TrainerJob:
    """The driver's Lightning side of a run, replayed at every site: built once on the driver, shipped once."""

    module_ref: Any  # ObjectRef of the driver's LightningModule (put once, read by every site)
    trainer_settings: dict[str, Any]
    callbacks: list[Callback]
    loggers: list[SiteLoggerSpec]
    root_dir: str
    checkpoint_dir: Optional[str]
    checkpoint_every: int
    metric_thresholds: int
    class_balance: Optional[str]
    rounds: RoundSchedule  # sync_every epochs, or optimizer steps
    fine_tuning: Optional[FineTuning] = None  # each site's local fine-tuning after the last round
    deployment: Optional[Deployment] = None  # each site's choice of the model to deploy, after that


@dataclass(frozen=True)
class SitePlan:
    """Everything one site needs: where its data is, the job, its algorithm half and privacy settings."""

    site: Site
    index: int
    seed: int
    job: TrainerJob
    coordinator: CoordinatorLink
    algorithm: SiteAlgorithm
    privacy: Optional[DPSGD] = None


class SiteStrategy(SingleDeviceStrategy):
    """A site is one device. Decisions that must be the same everywhere (stop, save) are agreed with the other
    sites through the coordinator; barriers and broadcasts are local because each site writes only its own files."""

    def __init__(self, context: SiteContext, device: torch.device, sync: FederatedSync) -> None:
        super().__init__(device=device)
        self.context = context
        self.sync = sync
        self._decisions = EpochCount()

    def process_dataloader(self, dataloader: Any) -> Any:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and trainer.state.stage == RunningStage.TRAINING:
            self.sync.restore_sampler_generators(dataloader)  # a resumed fit's loader continues the checkpoint's
        return super().process_dataloader(dataloader)

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        if self.lightning_module is None or self.lightning_module.trainer.state.fn != "fit":
            return decision
        key = self._decisions.key("decision", self.lightning_module.trainer.current_epoch)
        return bool(self.context.ask("agree", key, bool(decision), all))


def site_device() -> tuple[str, torch.device]:
    """The accelerator is resolved here, inside the site: a CPU-only driver can drive GPU sites."""
    if ray.get_gpu_ids() and torch.cuda.is_available():
        return "gpu", torch.device("cuda", 0)
    return "cpu", torch.device("cpu")


class SiteRuntime:
    """One site inside a worker. :meth:`start` and every other method run on the worker's compute thread as this
    site (the worker's :class:`~lightning_fed.scheduler.Scheduler` sees to it), with its own random streams."""

    def __init__(
        self, plan: SitePlan, scheduler: Scheduler, worker: int, mark: Callable[[str], None], marker: str = ""
    ) -> None:
        self.plan = plan
        self.name = plan.site.name
        self.worker = worker
        self.marker = marker
        self.context = SiteContext(self.name, plan.coordinator, scheduler)
        self.state = SiteState(announce=lambda busy: mark(self.name if busy else ""))

    def start(self, stage: str) -> SiteReady:
        """Seed the site's streams, build its module, datamodule, callbacks and Trainer, and check its data."""
        plan = self.plan
        seed_everything(plan.seed + plan.index, workers=True, verbose=False)
        self.module: LightningModule = ray.get(plan.job.module_ref)
        self.datamodule = plan.site.build_datamodule()
        plan.algorithm.bind(self.context)
        self.metrics = SiteMetrics(self.name, plan.job.metric_thresholds)
        self.sync = FederatedSync(
            self.context, plan.algorithm, plan.job.rounds, self.metrics, labelled=plan.site.labelled
        )
        self.privacy = SiteDPSGD(self.name, plan.privacy) if plan.privacy is not None else None
        self.trainer = self._build_trainer()
        self.fine_tuned: Optional[LightningModule] = None  # this site's fine-tuned model, once it has one
        self.fine_tuning: Optional[SiteFineTuning] = None
        self.local: Optional[LightningModule] = None  # the local-only model a deployment trained here
        self.deployed: Optional[LightningModule] = None  # the model this site chose to deploy, and its temperature
        self.temperature: Optional[float] = None
        self.deployment: Optional[SiteDeployment] = None
        return self.ready(stage)

    def _build_trainer(self) -> Trainer:
        job = self.plan.job
        accelerator, device = site_device()
        callbacks: list[Callback] = [self.sync, self.metrics, self.plan.algorithm]
        if self.privacy is not None:
            callbacks.append(self.privacy)  # after the algorithm: FedFBN has frozen BatchNorm by the time DP checks
        callbacks += self._training_callbacks()
        for cb in copy.deepcopy(job.callbacks):
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None:
                cb.dirpath = os.path.join(cb.dirpath, self.name)  # sites must not overwrite each other's files
            callbacks.append(cb)
        callbacks.append(RoundClose(self.context, self.sync, job.checkpoint_dir, job.checkpoint_every))
        loggers = [spec.build(self.name) for spec in job.loggers]
        return Trainer(
            accelerator=accelerator,
            devices=1,
            strategy=SiteStrategy(self.context, device, self.sync),
            callbacks=callbacks,
            logger=loggers or False,
            default_root_dir=str(Path(job.root_dir) / "sites" / self.name),
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=True,
            **job.trainer_settings,
        )

    def _training_callbacks(self) -> list[Callback]:
        """The site's callbacks that change how it trains (also in its fine-tuning)."""
        job = self.plan.job
        return [ClassBalance(job.class_balance)] if job.class_balance is not None else []

    def ready(self, stage: str) -> SiteReady:
        """Start-up check: the site's data is there (and, to fit, has training samples) before anything runs."""
        self.datamodule.prepare_data()
        self.datamodule.setup(stage)
        n = -1
        if stage == "fit":
            n = train_samples(self.datamodule.train_dataloader())
            self.sync.train_size = n if n > 0 else None
            if self.plan.job.deployment is not None and not _has_batches(self.datamodule, "val_dataloader"):
                raise ValueError(
                    f"site {self.name!r} has no validation data, and the model it deploys is chosen on it "
                    "(deployment=...): give every site a validation split, or drop deployment"
                )
        return SiteReady(
            self.name, n, str(site_device()[1]), ray.get_runtime_context().get_node_id(), self.worker, self.marker
        )

    def fit(self, ckpt_path: Optional[str] = None, join: Any = None) -> SiteFit:
        """Train to the end of the run. ``join``: a :class:`~lightning_fed.coordinator.RejoinPoint` (this site was
        left out and restarts from ``ckpt_path``, or afresh), or ``"ask"`` to wait for the coordinator's."""
        if join == "ask":
            join = self.context.ask("rejoin")
        if join is not None and join.finished:  # the run ended while this site was out: it only takes the last model
            if join.model:
                self.plan.algorithm.receive_global(self.trainer, self.module, self.context.fetch(join.model[0]))
            restore_carried(self.trainer, join.carry)
            return self._finish()
        self.sync.join = join
        self.context.tell("report", {"status": "training", "epoch": 0})
        try:
            self.trainer.fit(self.module, datamodule=self.datamodule, ckpt_path=ckpt_path)
        except BaseException as err:
            self.context.tell("site_finished", describe_error(err))
            raise
        self.context.tell("site_finished", None)
        return self._finish()

    def _finish(self) -> SiteFit:
        """The federated run is over at this site: fine-tune and choose the model to deploy (when asked), then say
        how it ended."""
        job = self.plan.job
        if job.fine_tuning is not None:
            self.context.tell("report", {"status": "fine-tuning"})
            self.fine_tuned, self.fine_tuning = self._train_alone(job.fine_tuning, self.module, "fine_tuned")
        if job.deployment is not None:
            self.context.tell("report", {"status": "choosing"})
            self._choose_deployment(job.deployment)
        if job.fine_tuning is not None or job.deployment is not None:
            self.context.tell("report", {"status": "done"})
        return self._fit_result()

    def _train_alone(self, settings: FineTuning, start: LightningModule, name: str) -> tuple[LightningModule, Any]:
        """A copy of ``start`` trained on this site's data alone (the run's optimizer state carried on, unless it is
        the local-only model, which starts afresh)."""
        return fine_tune(
            self.name,
            settings,
            self.trainer,
            start,
            self.datamodule,
            self.plan.job.trainer_settings,
            self.folder,
            site_device()[0],
            self._training_callbacks(),
            carry=name != "local",
            name=name,
        )

    @property
    def folder(self) -> str:
        """This site's folder in the run's (its logs, fine-tuned and deployed models)."""
        return str(Path(self.plan.job.root_dir) / "sites" / self.name)

    def own_models(self) -> dict[str, LightningModule]:
        """The models this site holds beside the global one: its algorithm's, its fine-tuned and local-only ones."""
        own = dict(self.plan.algorithm.personal_models())
        if self.fine_tuned is not None:
            own["fine_tuned"] = self.fine_tuned
        if self.local is not None:
            own["local"] = self.local
        return own

    def _choose_deployment(self, settings: Deployment) -> None:
        if settings.local_baseline:
            steps = self.plan.job.trainer_settings.get("max_steps") or -1
            length = FineTuning(steps=steps) if steps > 0 else FineTuning(epochs=self.trainer.max_epochs or 1)
            self.local, _ = self._train_alone(length, ray.get(self.plan.job.module_ref), "local")
        candidates = {"global": self.module, **self.own_models()}
        self.deployed, self.temperature, self.deployment = choose_deployment(
            self.name,
            settings,
            candidates,
            lambda module: validation_values(self._evaluate("validate", module)),
            self.datamodule.val_dataloader(),
            site_device()[1],
            self.folder,
        )

    def _fit_result(self) -> SiteFit:
        t = self.trainer
        return SiteFit(
            site=self.name,
            epoch=t.current_epoch,
            global_step=t.global_step,
            fit_loop=t.fit_loop.state_dict(),
            callback_metrics={
                k: float(v) for k, v in t.callback_metrics.items() if isinstance(v, torch.Tensor) and v.numel() == 1
            },
            best_model_path=getattr(t.checkpoint_callback, "best_model_path", None),
            sync_seconds=list(self.sync.sync_seconds),
            privacy=SitePrivacy(**self.privacy.report()) if self.privacy is not None else None,
            fine_tuning=self.fine_tuning,
            deployment=self.deployment,
        )

    def evaluate(self, stage: str, model: GlobalModel, exact: bool = False) -> SiteEvaluation:
        """Load the global model (through the algorithm, e.g. keeping local BN) and run ``test``/``validate`` here;
        then this site's own models (the algorithm's, e.g. Ditto's personal one, and its fine-tuned one), each on the
        same data.

        ``exact``: load every tensor as given instead, and test only that model (to test another model, e.g. another
        site's local one, here).
        """
        if exact:
            load_weights(self.module, model.weights)
        else:
            self.plan.algorithm.receive_global(self.trainer, self.module, model)
        result = self._evaluate(stage, self.module)
        if exact:
            return result
        personal = {name: self._evaluate(stage, m) for name, m in self.own_models().items()}
        if self.deployed is not None and self.deployment is not None:  # the chosen model, calibrated on this split
            chosen = self.deployment.chosen  # tested above already: its figures, not a second pass
            deployed = result if chosen == "global" else personal[chosen]
            loader = self.datamodule.test_dataloader() if stage == "test" else self.datamodule.val_dataloader()
            calibration = calibration_on(self.deployed, self.temperature, loader, site_device()[1])
            values = {**deployed.values, "model": self.deployment.chosen, **calibration}
            personal["deployed"] = dataclasses.replace(deployed, values=values)
        return dataclasses.replace(result, personal=personal)

    def _evaluate(self, stage: str, module: LightningModule) -> SiteEvaluation:
        run = self.trainer.test if stage == "test" else self.trainer.validate
        outputs = run(module, datamodule=self.datamodule, verbose=False)
        split = "test" if stage == "test" else "val"
        return SiteEvaluation(
            site=self.name,
            scalars=scalar_metrics(outputs[0] if outputs else {}),
            num_samples=self.metrics.samples(split),
            metrics=self.metrics.export(split),
            values=dict(self.metrics.results.get(split, {})),
            note=self.plan.algorithm.evaluation_note,
            hidden_labels=not self.plan.site.labelled,
        )

    def weights(self) -> Weights:
        """This site's current model state as arrays (what a sync would send): for audits, tests and ``compare``."""
        return state_to_numpy(self.module.state_dict())

    def close(self) -> bool:
        """Flush this site's loggers; ``True`` if one of them was a W&B run (the worker then stops W&B once)."""
        return finish_site_loggers(self.trainer.loggers)


def validation_values(evaluation: SiteEvaluation) -> dict[str, float]:
    """A validation's scalars without their ``val_`` prefix, and lightning-fed's metrics: what a deployment compares."""
    scalars = {k.removeprefix("val_"): v for k, v in evaluation.scalars.items()}
    return {**scalars, **{k: v for k, v in evaluation.values.items() if isinstance(v, float)}}


def _has_batches(datamodule: Any, hook: str) -> bool:
    try:
        loader = getattr(datamodule, hook)()
    except Exception:  # no such split (Lightning raises for a hook the datamodule does not define)
        return False
    try:
        return loader is not None and len(loader) > 0
    except TypeError:
        return loader is not None  # size unknown: trust it


def train_samples(loaders: Any) -> int:
    """Training samples behind a loader, or a list or dict of loaders (-1: unknown, e.g. an iterable dataset)."""
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        counts = [train_samples(loader) for loader in loaders]
        return -1 if any(c < 0 for c in counts) else sum(counts)
    try:
        return len(loaders.dataset) if hasattr(loaders, "dataset") else len(loaders)
    except TypeError:
        return -1  # size unknown: trust it


def describe_error(err: BaseException) -> str:
    """``Type: message (at file:line)``, the line being the innermost frame outside installed packages."""
    where = traceback.extract_tb(err.__traceback__)
    frame = next((f for f in reversed(where) if "site-packages" not in f.filename), where[-1] if where else None)
    at = f" (at {os.path.basename(frame.filename)}:{frame.lineno})" if frame else ""
    return f"{type(err).__name__}: {err}{at}"
