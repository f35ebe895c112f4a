"""Partial sharing's site half: the inner half's update without the personal tensors; the global model loaded around
them."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any, Callable

import numpy as np
from lightning.pytorch import LightningModule, Trainer

from lightning_fed.strategies.base import GlobalModel, SiteUpdate
from lightning_fed.strategies.site import SiteAlgorithm, WrappedSiteAlgorithm


def without(names: set[str], value: Any) -> Any:
    """``value`` with the entries named in ``names`` dropped from every dict of arrays keyed by tensor names in it
    (an update's weights, SCAFFOLD's control-variate update), other values as they are."""
    if isinstance(value, dict):
        if value and all(isinstance(v, np.ndarray) for v in value.values()):
            return {k: v for k, v in value.items() if k not in names}
        return {k: without(names, v) for k, v in value.items()}
    return value


class PartialSharingSite(WrappedSiteAlgorithm):
    """Sends what the inner half would send, less every personal tensor (in the weights and in any per-tensor
    extras); passes the inner half the global model less the personal tensors, so they keep this site's values."""

    def __init__(self, inner: SiteAlgorithm, personal: Callable[[str], bool]) -> None:
        super().__init__(inner)
        self.personal = personal

    def personal_names(self, pl_module: LightningModule) -> set[str]:
        return {name for name in pl_module.state_dict() if self.personal(name)}

    def local_update(self, trainer: Trainer, pl_module: LightningModule, num_samples: int) -> SiteUpdate:
        update = self.inner.local_update(trainer, pl_module, num_samples)
        names = self.personal_names(pl_module)
        return SiteUpdate(
            update.site, without(names, update.weights), update.num_samples, without(names, update.extras)
        )

    def receive_global(self, trainer: Trainer, pl_module: LightningModule, model: GlobalModel) -> None:
        names = self.personal_names(pl_module)
        shared = GlobalModel({k: v for k, v in model.weights.items() if k not in names}, model.round, model.extras)
        self.inner.receive_global(trainer, pl_module, shared)

    @property
    def evaluation_note(self) -> str | None:  # type: ignore[override]
        inner = self.inner.evaluation_note
        own = "each site evaluated with its own personal tensors (partial sharing)"
        return f"{inner}; {own}" if inner else own


def head_names(module: Any, patterns: list[str] | None) -> set[str]:
    """The state-dict names of ``module``'s head: those matching ``patterns``, or (``None``) the tensors of the last
    layer, in registration order, that holds parameters of its own."""
    names = list(module.state_dict())
    if patterns is not None:
        return {n for n in names if any(fnmatchcase(n, p) for p in patterns)}
    last = ""
    for prefix, layer in module.named_modules():
        if any(True for _ in layer.parameters(recurse=False)):
            last = prefix
    return {n for n in names if n.rsplit(".", 1)[0] == last} if last else set()


class HeadSite(PartialSharingSite):
    """FedPer's site half: partial sharing whose personal tensors are the head's."""

    evaluation_note = "each site evaluated with its own head (FedPer)"  # type: ignore[assignment]

    def __init__(self, head: list[str] | None) -> None:
        super().__init__(SiteAlgorithm(), personal=by_structure)
        self.head = head

    def personal_names(self, pl_module: LightningModule) -> set[str]:
        return head_names(pl_module, self.head)


def by_structure(name: str) -> bool:
    """The name predicate of a site half whose personal names come from the module's structure (its
    ``personal_names``: FedBN's layer types, FedPer's last layer), not from the names alone."""
    return False
