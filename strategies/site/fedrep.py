"""FedRep's site half: FedPer's head kept at the site, and within every round the head trained first (body frozen),
then the body (head frozen)."""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch import LightningModule, Trainer

from lightning_fed.strategies.base import GlobalModel, SiteUpdate
from lightning_fed.strategies.site.partial import HeadSite


class FedRepSite(HeadSite):
    """Counts the epochs of the current round and freezes the body or the head accordingly (``requires_grad``: the
    optimizer skips a tensor without a gradient). Tensors the module froze itself stay frozen."""

    evaluation_note = "each site evaluated with its own head (FedRep)"  # type: ignore[assignment]

    def __init__(self, head: Optional[list[str]], head_epochs: int) -> None:
        super().__init__(head)
        self.head_epochs = head_epochs
        self.epochs_in_round = 0
        self.body_batches = 0  # batches the body trained on this round
        self._trainable: Optional[set[str]] = None

    def phase(self) -> str:
        """``"head"`` or ``"body"``: what the epoch about to start trains."""
        return "head" if self.epochs_in_round < self.head_epochs else "body"

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._trainable is None:
            self._trainable = {n for n, p in pl_module.named_parameters() if p.requires_grad}
        head = self.personal_names(pl_module)
        train_head = self.phase() == "head"
        for name, parameter in pl_module.named_parameters():
            parameter.requires_grad_(name in self._trainable and (name in head) == train_head)
        self.epochs_in_round += 1

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.epochs_in_round > self.head_epochs:  # this epoch trains the body
            self.body_batches += 1

    def local_update(self, trainer: Trainer, pl_module: LightningModule, num_samples: int) -> SiteUpdate:
        if self.body_batches == 0:
            raise ValueError(
                f"fedrep at site {self.context.site if self.context else '?'!r}: the round ended before the body "
                f"trained (head_epochs={self.head_epochs} takes the first epochs of every round): give sync_every "
                "more epochs than head_epochs"
            )
        return super().local_update(trainer, pl_module, num_samples)

    def receive_global(self, trainer: Trainer, pl_module: LightningModule, model: GlobalModel) -> None:
        super().receive_global(trainer, pl_module, model)
        if model.round >= 0:  # a new round starts with its head epochs
            self.epochs_in_round, self.body_batches = 0, 0

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for name, parameter in pl_module.named_parameters():  # the module as the user made it, for what follows
            parameter.requires_grad_(self._trainable is None or name in self._trainable)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epochs_in_round": self.epochs_in_round, "body_batches": self.body_batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.epochs_in_round = int(state_dict.get("epochs_in_round", 0))
        self.body_batches = int(state_dict.get("body_batches", 0))
