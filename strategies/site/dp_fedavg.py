"""DP-FedAvg's site half: the inner rule's update, sent as a clipped difference from the last global model."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer

from lightning_fed.strategies.base import GlobalModel, SiteUpdate, is_averageable
from lightning_fed.strategies.dp_fedavg import clip
from lightning_fed.strategies.site import AnchoredSiteAlgorithm, SiteAlgorithm


class DPFedAvgSite(AnchoredSiteAlgorithm):
    """Sends the inner site half's update as a clipped difference from the last global model (``anchor``)."""

    def __init__(self, inner: SiteAlgorithm, clip_norm: float) -> None:
        super().__init__(inner)
        self.clip_norm = clip_norm

    def local_update(self, trainer: Trainer, pl_module: LightningModule, num_samples: int) -> SiteUpdate:
        update = self.inner.local_update(trainer, pl_module, num_samples)
        floating = {k: w - self.anchor[k] for k, w in update.weights.items() if is_averageable(w)}
        clipped, norm = clip(floating, self.clip_norm)
        counters = {k: w for k, w in update.weights.items() if not is_averageable(w)}
        return SiteUpdate(
            site="",
            weights={**clipped, **counters},
            num_samples=num_samples,
            extras={
                **update.extras,
                "unclipped": bool(norm <= self.clip_norm),
                "delta": True,
                "norm_bound": self.clip_norm,
            },
        )

    def receive_global(self, trainer: Trainer, pl_module: LightningModule, model: GlobalModel) -> None:
        super().receive_global(trainer, pl_module, model)
        self.clip_norm = float(model.extras.get("clip_norm", self.clip_norm))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "clip_norm": self.clip_norm}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.clip_norm = float(state_dict.get("clip_norm", self.clip_norm))
