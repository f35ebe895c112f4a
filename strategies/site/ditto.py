"""Ditto's site half: a personal model trained beside the shared one (which the wrapped rule's site half trains and
hands over), one step per training batch, pulled towards the round's global model."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule, Trainer

from lightning_fed.strategies.base import GlobalModel
from lightning_fed.strategies.site import SiteAlgorithm, WrappedSiteAlgorithm, detached_copy


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


class DittoSite(WrappedSiteAlgorithm):
    """Keeps ``personal`` (v_k), its optimizer and ``anchor`` (the round's global parameters, w_t); the wrapped rule's
    site half trains and hands over the shared model as it would alone."""

    def __init__(self, inner: SiteAlgorithm, lam: float) -> None:
        super().__init__(inner)
        self.lam = lam
        self.personal: Optional[LightningModule] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.anchor: dict[str, torch.Tensor] = {}
        self._restored: Optional[dict[str, Any]] = None  # a checkpoint's state, applied once the model exists

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.inner.on_fit_start(trainer, pl_module)  # first: the personal copy is of the module as the rule set it up
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
        self.inner.on_train_batch_start(trainer, pl_module, batch, batch_idx)
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
        self.inner.receive_global(trainer, pl_module, model)
        if model.round >= 0:  # a round's global model (an evaluation hands over round -1): the new w_t
            self.anchor = self._parameters(pl_module)

    def personal_models(self) -> dict[str, LightningModule]:
        own = {"personal": self.personal} if self.personal is not None else {}
        return {**self.inner.personal_models(), **own}

    def state_dict(self) -> dict[str, Any]:
        if self.personal is None or self.optimizer is None:
            return super().state_dict()
        return {
            **super().state_dict(),
            "personal": self.personal.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "anchor": {k: v.cpu() for k, v in self.anchor.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._restored = dict(state_dict) if state_dict.get("personal") is not None else None
