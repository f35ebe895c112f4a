"""One site: a Ray actor holding its own Trainer, LightningModule, data and algorithm state for the whole run.

The site's Trainer is built once and lives through every round, so optimizer and LR-scheduler state, epoch and
step counters, EarlyStopping patience, ModelCheckpoint top-k and any privacy accountant behave exactly as in a
normal ``fit``. Its data is set up inside the actor from the site's own datamodule: samples never leave it.
"""

from __future__ import annotations

import copy
import logging
import os
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import ray
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_fed.balance import ClassBalance
from lightning_fed.data.sites import Site
from lightning_fed.loggers import SiteLoggerSpec, finish_site_loggers
from lightning_fed.metrics import SiteMetrics
from lightning_fed.privacy import DPSGD, SiteDPSGD
from lightning_fed.strategies.base import GlobalModel
from lightning_fed.strategies.site import SiteAlgorithm, load_weights
from lightning_fed.sync import FederatedSync, RoundClose, scalar_metrics


class SiteStrategy(SingleDeviceStrategy):
    """A site is one device. Decisions that must be the same everywhere (stop, save) are agreed with the other
    sites through the coordinator; barriers and broadcasts are local because each site writes only its own files."""

    def __init__(self, site: str, coordinator: Any, device: torch.device) -> None:
        super().__init__(device=device)
        self.site = site
        self.coordinator = coordinator
        self._decisions = 0

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        if self.lightning_module is None or self.lightning_module.trainer.state.fn != "fit":
            return decision
        self._decisions += 1
        return ray.get(self.coordinator.agree.remote(self.site, ("decision", self._decisions), bool(decision), all))


@dataclass
class SitePlan:
    """Everything a site actor needs, built on the driver and shipped once."""

    site: Site
    index: int
    module_ref: Any  # ObjectRef of the driver's LightningModule (put once, shared by all sites)
    coordinator: Any
    algorithm: SiteAlgorithm
    trainer_settings: dict[str, Any]
    callbacks: list[Callback]
    loggers: list[SiteLoggerSpec]
    sync_every: int
    root_dir: str
    checkpoint_dir: Optional[str]
    checkpoint_every: int
    seed: int
    metric_thresholds: int = 1000
    privacy: Optional[DPSGD] = None
    class_balance: Optional[str] = None


def site_device() -> tuple[str, torch.device]:
    """The accelerator is resolved here, inside the site: a CPU-only driver can drive GPU sites."""
    if ray.get_gpu_ids() and torch.cuda.is_available():
        return "gpu", torch.device("cuda", 0)
    return "cpu", torch.device("cpu")


class SiteActor:
    """One site's long-lived training process (a Ray actor)."""

    def __init__(self, plan: SitePlan) -> None:
        self._start(plan)

    def reset(self, plan: SitePlan) -> None:
        """Start over with a new plan in this (warm) process: a new run of the same site layout skips the
        process start and the torch/Lightning imports. Everything run-specific is rebuilt from the plan."""
        self._start(plan)

    def _start(self, plan: SitePlan) -> None:
        self.plan = plan
        self.name = plan.site.name
        for logger_name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(logger_name).setLevel(logging.WARNING)
        # the driver already showed these once; N copies through Ray's log forwarding help nobody
        warnings.filterwarnings("ignore", message=".*treespec.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*Total length of .* across ranks is zero.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        if plan.site.num_cpus >= 1:
            torch.set_num_threads(int(plan.site.num_cpus))
        if 0 < plan.site.num_gpus < 1 and torch.cuda.is_available():
            # Ray's GPU fractions are bookkeeping only; this is what keeps sites sharing a GPU inside their share
            torch.cuda.set_per_process_memory_fraction(plan.site.num_gpus)
        seed_everything(plan.seed + plan.index, workers=True, verbose=False)
        self.module: LightningModule = ray.get(plan.module_ref)
        self.datamodule = plan.site.build_datamodule()
        self.metrics = SiteMetrics(self.name, plan.metric_thresholds)
        self.sync = FederatedSync(self.name, plan.coordinator, plan.algorithm, plan.sync_every, self.metrics)
        self.privacy = SiteDPSGD(self.name, plan.privacy) if plan.privacy is not None else None
        self.trainer = self._build_trainer()

    def _build_trainer(self) -> Trainer:
        accelerator, device = site_device()
        root = Path(self.plan.root_dir) / "sites" / self.name
        callbacks = [self.sync, self.metrics, self.plan.algorithm]
        if self.privacy is not None:
            callbacks.append(self.privacy)  # after the algorithm: FedFBN has frozen BatchNorm by the time DP checks
        if self.plan.class_balance is not None:
            callbacks.append(ClassBalance(self.plan.class_balance))
        for cb in copy.deepcopy(self.plan.callbacks):
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None:
                cb.dirpath = os.path.join(cb.dirpath, self.name)  # sites must not overwrite each other's files
            callbacks.append(cb)
        callbacks.append(RoundClose(self.name, self.plan.coordinator, self.sync, self.plan.checkpoint_dir, self.plan.checkpoint_every))
        loggers = [spec.build(self.name) for spec in self.plan.loggers]
        return Trainer(
            accelerator=accelerator,
            devices=1,
            strategy=SiteStrategy(self.name, self.plan.coordinator, device),
            callbacks=callbacks,
            logger=loggers or False,
            default_root_dir=str(root),
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=True,
            **self.plan.trainer_settings,
        )

    def ready(self, stage: str = "fit") -> dict[str, Any]:
        """Start-up check: the site's data is there (and, to fit, has training samples) before anything runs."""
        self.datamodule.prepare_data()
        self.datamodule.setup(stage)
        n = -1
        if stage == "fit":
            loader = self.datamodule.train_dataloader()
            try:
                n = len(loader.dataset) if hasattr(loader, "dataset") else len(loader)
            except TypeError:
                n = -1  # iterable dataset: size unknown, trust it
        return {"site": self.name, "train_samples": n, "device": str(site_device()[1]), "node": ray.get_runtime_context().get_node_id()}

    def fit(self, ckpt_path: Optional[str] = None) -> dict[str, Any]:
        self.plan.coordinator.report.remote(self.name, {"status": "training", "epoch": 0})
        try:
            self.trainer.fit(self.module, datamodule=self.datamodule, ckpt_path=ckpt_path)
        except BaseException as err:
            self.plan.coordinator.site_finished.remote(self.name, _describe(err))
            raise
        self.plan.coordinator.site_finished.remote(self.name)
        return self._result()

    def evaluate(self, stage: str, model: GlobalModel, exact: bool = False) -> dict[str, Any]:
        """Load the global model (through the algorithm, e.g. keeping local BN) and run ``test``/``validate`` here.

        ``exact``: load every tensor as given instead (to test another model, e.g. another site's local one, here).
        """
        if exact:
            load_weights(self.module, model.weights)
        else:
            self.plan.algorithm.receive_global(self.trainer, self.module, model)
        run = self.trainer.test if stage == "test" else self.trainer.validate
        outputs = run(self.module, datamodule=self.datamodule, verbose=False)
        split = "test" if stage == "test" else "val"
        return {
            "site": self.name,
            "scalars": scalar_metrics(outputs[0] if outputs else {}),
            "num_samples": self.metrics.samples(split),
            "metrics": self.metrics.export(split),
            "site_values": self.metrics.results.get(split, {}),
            "note": getattr(self.plan.algorithm, "evaluation_note", None),
        }

    def _result(self) -> dict[str, Any]:
        t = self.trainer
        return {
            "site": self.name,
            "epoch": t.current_epoch,
            "global_step": t.global_step,
            "fit_loop": t.fit_loop.state_dict(),
            "callback_metrics": {k: float(v) for k, v in t.callback_metrics.items() if isinstance(v, torch.Tensor) and v.numel() == 1},
            "best_model_path": getattr(t.checkpoint_callback, "best_model_path", None),
            "sync_seconds": list(self.sync.sync_seconds),
            "privacy": self.privacy.report() if self.privacy is not None else None,
        }

    def weights(self) -> dict[str, Any]:
        """This site's current model state as arrays (what a sync would send): for audits and tests."""
        from lightning_fed.strategies.site import state_to_numpy

        return state_to_numpy(self.module.state_dict())

    def close(self) -> None:
        finish_site_loggers(self.trainer.loggers)


def _describe(err: BaseException) -> str:
    where = traceback.extract_tb(err.__traceback__)
    frame = next((f for f in reversed(where) if "site-packages" not in f.filename), where[-1] if where else None)
    at = f" (at {os.path.basename(frame.filename)}:{frame.lineno})" if frame else ""
    return f"{type(err).__name__}: {err}{at}"


RemoteSiteActor = ray.remote(max_restarts=0, max_task_retries=0)(SiteActor)
