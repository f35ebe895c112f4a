"""Site-side callbacks that hand weights over every k epochs and close each round.

``FederatedSync`` runs first among the site's callbacks: after the last optimizer step of every k-th epoch (and
so *before* validation, so validation, EarlyStopping and ModelCheckpoint all see the global model) it sends the
site's update to the coordinator and loads the global model it gets back. After validation it publishes the
federated metrics as ``fl/...`` keys that any callback can monitor.

``RoundClose`` runs last at every epoch end: it agrees the stop decision across sites (so one site's
EarlyStopping, Timer or ``trainer.should_stop`` stops them all together) and writes this site's part of the
round checkpoint.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint

from lightning_fed.checkpoint import site_checkpoint_path
from lightning_fed.context import SiteContext
from lightning_fed.metrics import federated_metrics
from lightning_fed.rounds import RoundSchedule
from lightning_fed.scheduler import random_state, set_random_state
from lightning_fed.screening import non_finite_key
from lightning_fed.site_metrics import SiteMetrics, targets_of
from lightning_fed.strategies.base import FollowUp, GlobalModel
from lightning_fed.strategies.site import SiteAlgorithm


def global_model_loaded(pl_module: LightningModule, round: int) -> None:
    """Tell a module that offers ``on_global_model_loaded(round)`` that it now holds the global model of ``round``."""
    hook = getattr(pl_module, "on_global_model_loaded", None)
    if callable(hook):
        hook(round)


def batch_size_of(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return len(batch)
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size_of(batch[0])
    if isinstance(batch, dict) and batch:
        return batch_size_of(next(iter(batch.values())))
    return 1


def sampler_generators(loader: Any) -> list[torch.Generator]:
    """The random generators a training loader's samplers draw from when the user gave them one (``DataLoader(...,
    generator=g)``); without one they draw from torch's process-wide generator, which the site's state carries."""
    found = []
    for holder in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        generator = getattr(holder, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The user's own scalar metrics (not the ``fl/`` and ``site/`` keys lightning-fed adds)."""
    out = {}
    for key, value in metrics.items():
        if key.startswith(("fl/", "site/")):
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[key] = float(value)
        elif isinstance(value, (int, float)):
            out[key] = float(value)
    return out


def refuse_non_finite(weights: Any, site: str, round_: int, last_loss: Optional[torch.Tensor]) -> None:
    """A site whose training diverged says so in one line instead of sending NaN or Inf to be averaged."""
    key = non_finite_key(weights)
    if key is None:
        return
    seen = f"last training loss {float(last_loss):.4g}" if last_loss is not None else "no training loss seen"
    raise FloatingPointError(
        f"site {site!r}: training diverged in round {round_}, its update holds NaN or Inf (in {key!r}; "
        f"{seen}): lower the learning rate, clip gradients (Trainer(gradient_clip_val=...)) or check its data"
    )


class EpochCount:
    """The how-manieth call within the current epoch: with the epoch, a barrier key every site (a rejoining one
    too) computes alike, e.g. ``("val", epoch, 2)`` for an epoch's second validation."""

    def __init__(self) -> None:
        self.epoch, self.count = -1, 0

    def key(self, kind: str, epoch: int) -> tuple[str, int, int]:
        self.count = self.count + 1 if epoch == self.epoch else 1
        self.epoch = epoch
        return (kind, epoch, self.count)


def carriers(trainer: Trainer) -> dict[str, Any]:
    """The site's callbacks whose state must survive a restart exactly as of the site's last hand-over (a privacy
    accountant: every released update counts), by class name. They implement ``state_dict``/``load_state_dict``
    and set ``carried_by_coordinator = True``."""
    return {type(cb).__name__: cb for cb in trainer.callbacks if getattr(cb, "carried_by_coordinator", False)}


def carried_state(trainer: Trainer) -> Optional[dict[str, Any]]:
    """What the site's carriers hand over with an update (``None`` when it has none)."""
    return {name: cb.state_dict() for name, cb in carriers(trainer).items()} or None


def restore_carried(trainer: Trainer, carry: Optional[dict[str, Any]]) -> None:
    """Put back what the site's carriers handed over with its last update (see :func:`carriers`)."""
    for name, cb in carriers(trainer).items():
        if carry and name in carry:
            cb.load_state_dict(carry[name])


class FederatedSync(Callback):
    """Hands this site's update to the coordinator at every round's end (every ``sync_every`` epochs, or every
    ``sync_every_steps`` optimizer steps: :mod:`lightning_fed.rounds`) and loads the global model."""

    def __init__(
        self,
        context: SiteContext,
        algorithm: SiteAlgorithm,
        rounds: RoundSchedule,
        metrics: SiteMetrics,
        labelled: bool = True,
    ) -> None:
        self.context = context
        self.labelled = labelled
        self.algorithm = algorithm
        self.rounds = rounds
        self._synced_at_step = -1  # the global step of the last hand-over (step rounds: once per optimizer step)
        # the site's training samples (set at start-up): with step rounds every site processes the same number of
        # samples a round, so an update weighs by the site's data instead (FedAvg's n_k, as FLamby weighs it)
        self.train_size: Optional[int] = None
        self.metrics = metrics
        self.round = 0  # rounds completed; restored from the site checkpoint on resume
        self.synced_this_epoch = False
        self._samples_since_sync = 0
        self._train_samples_last_epoch = 0
        self._epoch_samples = 0
        self._validations = EpochCount()
        self._pending_generators: Optional[list[torch.Tensor]] = None  # restored with the loader a resumed fit builds
        self.trainer: Optional[Trainer] = None
        self.join: Any = None  # a RejoinPoint: where this site comes back in after it was left out
        self._last_loss: Optional[torch.Tensor] = None  # kept as a tensor: read only when a round's update is broken
        self.sync_seconds: list[float] = []  # time inside each hand-over, waiting for slower sites included

    # -- the hand-over ---------------------------------------------------------------------------
    def sync(self, trainer: Trainer, pl_module: LightningModule) -> None:
        t0 = time.perf_counter()
        weight = self.train_size if self.rounds.in_steps and self.train_size else self._samples_since_sync
        update = self.algorithm.local_update(trainer, pl_module, weight)
        refuse_non_finite(update.weights, self.context.site, self.round + 1, self._last_loss)
        answer = self.context.ask("sync", self.round + 1, update, carried_state(trainer))
        if isinstance(answer, FollowUp):  # the aggregator needs one more thing from this round's sites
            reply = self.algorithm.answer_follow_up(trainer, pl_module, answer.question)
            answer = self.context.ask("follow_up", answer.round, reply)
        [ref] = answer
        model: GlobalModel = self.context.fetch(ref)
        self.algorithm.receive_global(trainer, pl_module, model)
        self.round = model.round
        global_model_loaded(pl_module, self.round)
        self._samples_since_sync = 0
        self.synced_this_epoch = True
        self.sync_seconds.append(time.perf_counter() - t0)

    def _due(self, trainer: Trainer) -> bool:
        """Whether this epoch's end ends a round (epoch rounds only)."""
        return not self.rounds.in_steps and (trainer.current_epoch + 1) % self.rounds.every == 0

    def rejoin(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Come back in at the start of round ``join.round``: its global model (through the algorithm, e.g. keeping
        the site's own BatchNorm), the state carried at the last hand-over, and the round's first epoch. The rest
        (optimizer, LR scheduler, callbacks) is as of the site's last committed round checkpoint, or fresh."""
        join, self.join = self.join, None
        if join.model:
            self.algorithm.receive_global(trainer, pl_module, self.context.fetch(join.model[0]))
        restore_carried(trainer, join.carry)
        self.round, self._samples_since_sync = join.round - 1, 0
        global_model_loaded(pl_module, self.round)
        epoch = max(0, (join.round - 1) * self.rounds.every)
        progress = trainer.fit_loop.epoch_progress
        if progress.current.completed < epoch:  # the rounds it missed: the loop starts at the round's first epoch
            for counter in (progress.current, progress.total):
                counter.ready = counter.started = counter.processed = counter.completed = epoch

    # -- hooks -----------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.join is not None:
            self.rejoin(trainer, pl_module)
        else:  # every site starts from the same initial model (or, resumed, from its last global one)
            global_model_loaded(pl_module, self.round)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.labelled and targets_of(batch) is not None:
            raise ValueError(
                f"site {self.context.site!r} is declared labelled=False but its training batches carry "
                "targets: leave them out of its training split (its hidden labels may serve evaluation only)"
            )

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.synced_this_epoch = False
        self._epoch_samples = 0

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self._last_loss = loss.detach() if isinstance(loss, torch.Tensor) else self._last_loss
        n = batch_size_of(batch)
        self._samples_since_sync += n
        self._epoch_samples += n
        if self.rounds.in_steps:
            # with gradient accumulation several batches end on the same optimizer step: hand over once
            if self.rounds.due_after_step(trainer.global_step) and trainer.global_step != self._synced_at_step:
                self._synced_at_step = trainer.global_step
                self.sync(trainer, pl_module)
            return
        last_batch = math.isfinite(trainer.num_training_batches) and batch_idx + 1 >= trainer.num_training_batches
        if last_batch and self._due(trainer):
            self.sync(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._train_samples_last_epoch = self._epoch_samples
        # loaders of unknown length: the last batch was only known now (after validation)
        if not self.synced_this_epoch and self._due(trainer) and self._samples_since_sync > 0:
            self.sync(trainer, pl_module)
        self.context.tell(
            "report",
            {
                "status": "training",
                "epoch": trainer.current_epoch + 1,
                "global_step": trainer.global_step,
                "round": self.round,
                "metrics": scalar_metrics(trainer.callback_metrics),
            },
        )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # max_epochs not a multiple of sync_every, or max_steps mid-epoch: one last round so every site ends global
        if self._samples_since_sync > 0:
            self.sync(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        payload = {
            "scalars": scalar_metrics(trainer.callback_metrics),
            "num_samples": self.metrics.samples("val"),
            "train_samples": self._train_samples_last_epoch or self._epoch_samples,
            "metrics": self.metrics.export("val"),
            "site_values": {
                **{f"site/{self.context.site}/{k}": v for k, v in scalar_metrics(trainer.callback_metrics).items()},
                **{
                    f"site/{self.context.site}/val_{k}": v
                    for k, v in self.metrics.results.get("val", {}).items()
                    if isinstance(v, float)
                },
            },
        }
        # keyed by epoch (and the validation's number in it): a site that rejoins later meets the others there;
        # with step rounds epochs differ between sites, and the validation is the round's (at its last step)
        if self.rounds.in_steps:
            key, at = self._validations.key("val", self.round), trainer.global_step - 1
        else:
            key, at = self._validations.key("val", trainer.current_epoch), trainer.current_epoch
        merged = self.context.ask("merge_metrics", key, payload, at)
        for key, value in federated_metrics(merged, "val").items():
            if isinstance(value, float):
                # new keys persist in callback_metrics (existing ones are re-read from live results)
                trainer.callback_metrics[key] = torch.tensor(value)

    def state_dict(self) -> dict[str, Any]:
        # saved at the end of a round, while this site computes: the process's random generators are this site's, so
        # a resumed site draws the numbers (shuffles, dropout, DP noise) the uninterrupted one would have drawn
        trainer = self.trainer
        loader = trainer.train_dataloader if trainer is not None else None
        return {
            "round": self.round,
            "samples_since_sync": self._samples_since_sync,
            "random_state": random_state(),
            "sampler_generators": [g.get_state() for g in sampler_generators(loader)],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.round = int(state_dict["round"])
        self._samples_since_sync = int(state_dict.get("samples_since_sync", 0))
        if state_dict.get("random_state") is not None:
            set_random_state(state_dict["random_state"])
        self._pending_generators = state_dict.get("sampler_generators") or None

    def restore_sampler_generators(self, loader: Any) -> None:
        """Called with the training loader a resumed fit builds: its samplers continue where the checkpoint left them."""
        if self._pending_generators is None:
            return
        generators = sampler_generators(loader)
        if len(generators) == len(self._pending_generators):
            for generator, state in zip(generators, self._pending_generators):
                generator.set_state(state)
        self._pending_generators = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.trainer = trainer


class RoundClose(Checkpoint):
    """Last callback of every epoch: agrees ``should_stop`` across sites, then saves this site's round checkpoint.

    It is a :class:`~lightning.pytorch.callbacks.Checkpoint` so that Lightning runs it after every monitoring
    callback (EarlyStopping, ModelCheckpoint), whose decisions it must see.
    """

    def __init__(
        self, context: SiteContext, sync: FederatedSync, checkpoint_dir: Optional[str], checkpoint_every: int
    ) -> None:
        self.context = context
        self.fed_sync = sync
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.fed_sync.rounds.in_steps:
            return  # sites end their epochs at different steps: nothing is agreed or committed there
        stop = bool(self.context.ask("agree", ("epoch_end", trainer.current_epoch), bool(trainer.should_stop), False))
        trainer.should_stop = stop
        round_ = self.fed_sync.round
        if self.checkpoint_dir and self.fed_sync.synced_this_epoch and (round_ % self.checkpoint_every == 0 or stop):
            path = site_checkpoint_path(self.checkpoint_dir, round_, self.context.site)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            trainer.save_checkpoint(tmp)
            os.replace(tmp, path)
            # waited for, so that no site enters the next round before this one's save is on record: a site failing
            # later can then never leave a round half-committed
            self.context.ask("checkpoint_saved", round_)
