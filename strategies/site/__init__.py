"""Site halves: the part of each algorithm that runs inside a site's Trainer, as a Lightning callback.

Every server half (:mod:`lightning_fed.strategies.fedprox`, ...) is numpy only; its site half lives in this package
(:mod:`lightning_fed.strategies.site.fedprox`, ...) and is imported only where a site runs, so the coordinator's
process never loads torch or Lightning.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_fed.strategies.base import GlobalModel, SiteContext, SiteUpdate, Weights


def state_to_numpy(state: dict[str, torch.Tensor]) -> Weights:
    """Detach a state dict to CPU numpy arrays; dtypes numpy lacks (bfloat16) are upcast to float32."""
    out: Weights = {}
    for key, tensor in state.items():
        t = tensor.detach().cpu()
        try:
            out[key] = t.numpy()
        except TypeError:
            out[key] = t.float().numpy()
    return out


def detached_copy(module: LightningModule) -> LightningModule:
    """A deep copy of ``module`` without its Trainer (frozen layers, hooks, buffers and attributes as they are)."""
    trainer = module._trainer
    module._trainer = None
    try:
        return copy.deepcopy(module)
    finally:
        module._trainer = trainer


class SiteAlgorithm(Callback):
    """The site half of an algorithm: a Lightning callback in the site's Trainer, plus the two hand-over hooks.

    The default sends every tensor of the module's state and loads every tensor it gets back, which is what
    FedAvg-style algorithms need. Subclasses override the hooks named after the moment they run, e.g.
    ``on_before_optimizer_step`` for a proximal term, ``setup`` to freeze layers. Its ``state_dict`` is saved in
    the site's Lightning checkpoint, so state that must survive rounds and restarts lives here.
    """

    evaluation_note: str | None = None
    """Said with ``trainer.test``/``validate`` results when the algorithm changes what is evaluated (e.g. local BN)."""

    context: SiteContext | None = None
    """The site this half runs at (its name, exchanges with the other sites); set before the site's Trainer starts."""

    def bind(self, context: SiteContext) -> None:
        """Called once, before the site's Trainer is built: the only door from an algorithm to the federation."""
        self.context = context

    def local_update(self, trainer: Trainer, pl_module: LightningModule, num_samples: int) -> SiteUpdate:
        """Called at the end of every k-th epoch: what this site sends to the coordinator."""
        weights = state_to_numpy(pl_module.state_dict())
        return SiteUpdate(site="", weights=weights, num_samples=num_samples)

    def receive_global(self, trainer: Trainer, pl_module: LightningModule, model: GlobalModel) -> None:
        """Called right after aggregation, before validation: load the global model into this site's module."""
        load_weights(pl_module, model.weights)

    def personal_models(self) -> dict[str, LightningModule]:
        """This site's own models beside the shared one, by name (Ditto's ``"personal"``): after the global model,
        ``trainer.test``/``validate`` test each at this site and report it under ``<name>/...``. They never leave."""
        return {}

    def answer_follow_up(self, trainer: Trainer, pl_module: LightningModule, question: Any) -> Any:
        """Called when the server half asks one more thing before it aggregates the round (its ``follow_up``)."""
        raise NotImplementedError(
            f"{type(self).__name__} got a follow-up question from the coordinator it cannot answer"
        )


def load_weights(module: torch.nn.Module, weights: Weights, skip: set[str] | None = None) -> None:
    """Copy ``weights`` into ``module`` in place (keeping dtype and device), except the keys in ``skip``."""
    state = module.state_dict()
    unknown = set(weights) - set(state)
    if unknown:
        raise KeyError(f"global model has keys this site's module lacks: {sorted(unknown)[:5]}")
    with torch.no_grad():
        for key, array in weights.items():
            if skip and key in skip:
                continue
            target = state[key]
            # np arrays from the object store are read-only: copy before handing them to torch.
            target.copy_(torch.from_numpy(np.array(array, copy=True)).to(dtype=target.dtype))


class WrappedSiteAlgorithm(SiteAlgorithm):
    """A site half that wraps another one: every Lightning hook and both hand-over hooks go to ``inner`` unless
    the wrapper overrides them (e.g. DP-FedAvg clips what ``inner`` would send)."""

    def __init__(self, inner: SiteAlgorithm) -> None:
        self.inner = inner

    def bind(self, context: SiteContext) -> None:
        super().bind(context)
        self.inner.bind(context)

    @property
    def evaluation_note(self) -> str | None:  # type: ignore[override]
        return self.inner.evaluation_note

    def local_update(self, trainer: Trainer, pl_module: LightningModule, num_samples: int) -> SiteUpdate:
        return self.inner.local_update(trainer, pl_module, num_samples)

    def receive_global(self, trainer: Trainer, pl_module: LightningModule, model: GlobalModel) -> None:
        self.inner.receive_global(trainer, pl_module, model)

    def answer_follow_up(self, trainer: Trainer, pl_module: LightningModule, question: Any) -> Any:
        return self.inner.answer_follow_up(trainer, pl_module, question)

    def personal_models(self) -> dict[str, LightningModule]:
        return self.inner.personal_models()

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.inner.load_state_dict(state_dict.get("inner", {}))


class AnchoredSiteAlgorithm(WrappedSiteAlgorithm):
    """A wrapper whose update is a difference from ``anchor``, the global model this round started from (a copy,
    in the site's checkpoints): DP-FedAvg's clipped difference, compression's encoded one."""

    def __init__(self, inner: SiteAlgorithm) -> None:
        super().__init__(inner)
        self.anchor: Weights = {}

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.inner.on_fit_start(trainer, pl_module)
        if not self.anchor:  # round 1: every site starts from the same model; on resume the anchor is restored
            # copies: the arrays of state_to_numpy share the live parameters' memory and would follow the training
            self.anchor = {k: v.copy() for k, v in state_to_numpy(pl_module.state_dict()).items()}

    def receive_global(self, trainer: Trainer, pl_module: LightningModule, model: GlobalModel) -> None:
        self.inner.receive_global(trainer, pl_module, model)
        self.anchor.update({k: np.array(v, copy=True) for k, v in model.weights.items()})

    def state_dict(self) -> dict:
        return {**super().state_dict(), "anchor": self.anchor}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.anchor = dict(state_dict.get("anchor", {}))


def _forward(hook: str):
    def forward(self, *args, **kwargs):
        return getattr(self.inner, hook)(*args, **kwargs)

    forward.__name__ = hook
    return forward


for _hook in [n for n in vars(Callback) if n.startswith("on_") or n in ("setup", "teardown")]:
    setattr(WrappedSiteAlgorithm, _hook, _forward(_hook))
