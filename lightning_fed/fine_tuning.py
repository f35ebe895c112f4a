"""Local fine-tuning after the federated run (FLamby's FedAvg + fine-tuning), inside one site.

When the last round ends, a site's module holds the model it ended the run with: the last global model, with whatever
its algorithm keeps local (FedBN's normalisation layers, FedFBN's frozen BatchNorm). With
:class:`~lightning_fed.config.FineTuning` set, the site then trains a copy of that module on its own training data for
the asked optimizer steps or epochs. It does so in a Trainer of its own that carries on the site's optimizer and
LR-scheduler state (a FLamby client, too, keeps one optimizer from the first round to the end of fine-tuning), and
without hand-overs, validation or the user's callbacks: those watch the federated run. The copy is the site's
fine-tuned model: kept in the site for ``trainer.test`` and written to ``<run>/sites/<name>/fine_tuned.ckpt``. Only
its metrics ever leave the site.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer

from lightning_fed.config import FineTuning
from lightning_fed.results import SiteFineTuning
from lightning_fed.strategies.site import detached_copy

# the driver's loop settings that shape a training step; the rest (epochs, validation, logging) are the run's
_STEP_SETTINGS = (
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "precision",
    "deterministic",
    "limit_train_batches",
)


class CarryOptimizerState(Callback):
    """Loads the federated run's optimizer and LR-scheduler states into the fine-tuning Trainer's, as soon as the
    module's ``configure_optimizers`` has made them (``on_fit_start``)."""

    def __init__(self, optimizers: list[dict[str, Any]], schedulers: list[dict[str, Any]]) -> None:
        self.optimizers = optimizers
        self.schedulers = schedulers

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        if len(trainer.optimizers) != len(self.optimizers) or len(schedulers) != len(self.schedulers):
            raise ValueError(
                f"fine-tuning: configure_optimizers gave {len(trainer.optimizers)} optimizer(s) and {len(schedulers)} "
                f"scheduler(s), the federated run had {len(self.optimizers)} and {len(self.schedulers)}: return the "
                "same ones every time it is called"
            )
        for optimizer, state in zip(trainer.optimizers, self.optimizers):
            optimizer.load_state_dict(state)
        for scheduler, state in zip(schedulers, self.schedulers):
            scheduler.load_state_dict(state)


def fine_tune(
    site: str,
    settings: FineTuning,
    run_trainer: Trainer,
    module: LightningModule,
    datamodule: LightningDataModule,
    trainer_settings: dict[str, Any],
    site_root: str,
    accelerator: str,
    callbacks: list[Callback],
    carry: bool = True,
    name: str = "fine_tuned",
) -> tuple[LightningModule, SiteFineTuning]:
    """Fine-tune a copy of ``module`` at this site and return it with what the fine-tuning did.

    Args:
        site: the site's name (for messages).
        settings: how long to fine-tune.
        run_trainer: the site's Trainer of the federated run, finished: its optimizer and scheduler states carry on.
        module: the site's module as the run left it (not changed).
        datamodule: the site's own data, set up.
        trainer_settings: the loop settings every site replays (only those that shape a step are kept).
        site_root: the site's folder; the fine-tuned model is written there.
        accelerator: where the site computes (``"cpu"``/``"gpu"``).
        callbacks: the site's own callbacks that change how it trains (class balancing).
        carry: carry the run's optimizer and scheduler states on (``False``: fresh ones from ``configure_optimizers``,
            as for the local-only model a :class:`~lightning_fed.config.Deployment` trains from the initial weights).
        name: the checkpoint's name in ``site_root``.
    """
    started = time.monotonic()
    tuned = detached_copy(module)
    carried = (
        [
            CarryOptimizerState(
                [optimizer.state_dict() for optimizer in run_trainer.optimizers],
                [config.scheduler.state_dict() for config in run_trainer.lr_scheduler_configs],
            )
        ]
        if carry
        else []
    )
    trainer = Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=settings.steps if settings.steps is not None else -1,
        max_epochs=settings.epochs if settings.epochs is not None else -1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[*carried, *callbacks],
        logger=False,
        default_root_dir=site_root,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **{k: v for k, v in trainer_settings.items() if k in _STEP_SETTINGS},
    )
    trainer.fit(tuned, datamodule=datamodule)
    if settings.steps is not None and trainer.global_step != settings.steps:
        raise RuntimeError(
            f"site {site!r}: {name.replace('_', '-')} training stopped after {trainer.global_step} of {settings.steps} steps (the module or "
            "a callback stopped it early)"
        )
    path = Path(site_root) / f"{name}.ckpt"
    trainer.save_checkpoint(str(path))
    return tuned, SiteFineTuning(
        steps=trainer.global_step,
        epochs=trainer.current_epoch,
        seconds=time.monotonic() - started,
        checkpoint=str(path),
        train_metrics={
            k: float(v) for k, v in trainer.callback_metrics.items() if isinstance(v, torch.Tensor) and v.numel() == 1
        },
    )
