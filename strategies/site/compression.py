"""Update compression's site half: the inner half's update, encoded as a difference from the last global model."""

from __future__ import annotations

from typing import Any

import numpy as np
from lightning.pytorch import LightningModule, Trainer

from lightning_fed.screening import non_finite_key
from lightning_fed.strategies.base import GlobalModel, SiteUpdate, Weights, is_averageable
from lightning_fed.strategies.compression import Codec, encode_update
from lightning_fed.strategies.site import SiteAlgorithm, WrappedSiteAlgorithm, state_to_numpy


class CompressedSite(WrappedSiteAlgorithm):
    """Sends what the inner site half would send, encoded with ``codec``; with error feedback, what decoding loses
    (``residual``) is added to the next round's update. Anchor and residual are in the site's checkpoints."""

    def __init__(self, inner: SiteAlgorithm, codec: Codec) -> None:
        super().__init__(inner)
        self.codec = codec
        self.anchor: Weights = {}  # w_t, the global model this round started from
        self.residual: Weights = {}  # e_k: what earlier rounds' encodings left out

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.inner.on_fit_start(trainer, pl_module)
        if not self.anchor:  # round 1: every site starts from the same model; on resume the anchor is restored
            self.anchor = {k: v.copy() for k, v in state_to_numpy(pl_module.state_dict()).items()}

    def local_update(self, trainer: Trainer, pl_module: LightningModule, num_samples: int) -> SiteUpdate:
        update = self.inner.local_update(trainer, pl_module, num_samples)
        is_difference = bool(update.extras.get("delta"))  # DP-FedAvg already sends w − w_t
        values = {}
        for key, array in update.weights.items():
            if not is_averageable(array):
                continue
            x = array.astype(np.float64) if is_difference else array.astype(np.float64) - self.anchor[key]
            if self.codec.error_feedback and key in self.residual:
                x = x + self.residual[key]
            values[key] = x
        broken = non_finite_key(values)
        if broken is not None:  # encoded, it could no longer be told from a sound update
            raise FloatingPointError(f"site {self.context.site if self.context else '?'!r}: training diverged, its update holds "
                                     f"NaN or Inf (in {broken!r}): lower the learning rate, clip gradients or check its data")
        encoded, decoded = encode_update(self.codec, values, update.extras.get("norm_bound"))
        if self.codec.error_feedback:
            self.residual = {k: values[k] - decoded[k] for k in values}
        counters = {k: v for k, v in update.weights.items() if not is_averageable(v)}
        return SiteUpdate(site="", weights=counters, num_samples=num_samples,
                          extras={**update.extras, "compressed": encoded, "compressed_difference": is_difference})

    def receive_global(self, trainer: Trainer, pl_module: LightningModule, model: GlobalModel) -> None:
        self.inner.receive_global(trainer, pl_module, model)
        self.anchor.update({k: np.array(v, copy=True) for k, v in model.weights.items()})

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "anchor": self.anchor, "residual": self.residual}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.anchor = dict(state_dict.get("anchor", {}))
        self.residual = dict(state_dict.get("residual", {}))
