"""Ditto's site half: a personal model trained beside the shared one, one step per training batch, pulled towards the
round's global model."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule, Trainer

from lightning_fed.strategies.base import GlobalModel
from lightning_fed.strategies.site import SiteAlgorithm, detached_copy, load_weights


def first_optimizer(configured: Any) -> torch.optim.Optimizer:
    """The first optimizer in whatever ``configure_optimizers`` returned (an optimizer, a list or tuple of them, a
    ``([optimizers], [schedulers])`` pair, or a dict with ``"optimizer"``)."""
    while not isinstance(configured, torch.optim.Optimizer):
        if isinstance(configured, dict) and "optimizer" in configured:
            configured = configured["optimizer"]
        elif isinstance(configured, (list, tuple)) and configured:
            configured = configured[0]
        else:
            raise ValueError(f"ditto: configure_optimizers() returned no optimizer ({type(configured).__name__})")
    return configured


class DittoSite(SiteAlgorithm):
    """Keeps ``personal`` (v_k), its optimizer and ``anchor`` (the round's global parameters, w_t)."""

    def __init__(self, lam: float) -> None:
        self.lam = lam
        self.personal: Optional[LightningModule] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.anchor: dict[str, torch.Tensor] = {}
        self._restored: Optional[dict[str, Any]] = None  # a checkpoint's state, applied once the model exists

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.personal is not None:
            return
        self.personal = detached_copy(pl_module).to(pl_module.device)
        try:
            self.optimizer = first_optimizer(self.personal.configure_optimizers())
        except Exception as err:
            raise ValueError(
                f"ditto: the personal model's optimizer comes from configure_optimizers() called without a Trainer, "
                f"which failed ({type(err).__name__}: {err}): make configure_optimizers work without self.trainer"
            ) from None
        self.anchor = self._parameters(pl_module)
        if self._restored is not None:
            self.personal.load_state_dict(self._restored["personal"])
            self.optimizer.load_state_dict(self._restored["optimizer"])
            self.anchor = {k: v.to(pl_module.device) for k, v in self._restored["anchor"].items()}
            self._restored = None

    @staticmethod
    def _parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # before the shared model's step on this batch: a hand-over at the previous batch's end (step rounds) has
        # already set this round's w_t
        assert self.personal is not None and self.optimizer is not None
        self.personal.train()
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its self.log calls: the personal model has no Trainer to log to
            out = self.personal.training_step(batch, batch_idx)
            loss = out["loss"] if isinstance(out, dict) else out
            if loss is None:
                return  # the module skipped this batch
            proximal = sum(
                ((p - self.anchor[n]) ** 2).sum() for n, p in self.personal.named_parameters() if n in self.anchor
            )
            self.optimizer.zero_grad(set_to_none=True)
            (loss + self.lam / 2 * proximal).backward()
            self.optimizer.step()

    def receive_global(self, trainer: Trainer, pl_module: LightningModule, model: GlobalModel) -> None:
        load_weights(pl_module, model.weights)
        if model.round >= 0:  # a round's global model (an evaluation hands over round -1): the new w_t
            self.anchor = self._parameters(pl_module)

    def personal_models(self) -> dict[str, LightningModule]:
        return {"personal": self.personal} if self.personal is not None else {}

    def state_dict(self) -> dict[str, Any]:
        if self.personal is None or self.optimizer is None:
            return {}
        return {
            "personal": self.personal.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "anchor": {k: v.cpu() for k, v in self.anchor.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict) if state_dict else None
