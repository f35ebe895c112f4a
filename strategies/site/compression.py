"""Update compression's site half: the inner half's update, encoded as a difference from the last global model."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from lightning.pytorch import LightningModule, Trainer

from lightning_fed.screening import non_finite_key
from lightning_fed.strategies.base import SiteUpdate, Weights, is_averageable
from lightning_fed.strategies.compression import Codec, encode_update, l2_norm
from lightning_fed.strategies.site import AnchoredSiteAlgorithm, SiteAlgorithm


class CompressedSite(AnchoredSiteAlgorithm):
    """Sends what the inner site half would send, its parameters' update encoded with ``codec`` (buffers such as
    BatchNorm statistics and counters as they are); with error feedback, what decoding loses (``residual``) is added
    to the next round's update. Anchor and residual are in the site's checkpoints."""

    def __init__(self, inner: SiteAlgorithm, codec: Codec) -> None:
        super().__init__(inner)
        self.codec = codec
        self.residual: Weights = {}  # e_k: what earlier rounds' encodings left out

    def local_update(self, trainer: Trainer, pl_module: LightningModule, num_samples: int) -> SiteUpdate:
        update = self.inner.local_update(trainer, pl_module, num_samples)
        is_difference = bool(update.extras.get("delta"))  # DP-FedAvg already sends w − w_t
        parameters = {name for name, _ in pl_module.named_parameters()}
        values, as_is = {}, {}
        for key, array in update.weights.items():
            if not is_averageable(array) or key not in parameters:
                # counters, and statistics such as BatchNorm's running variance: small, and a top-k residual added
                # to them could make a variance negative; they travel as they are
                as_is[key] = array
                continue
            x = array.astype(np.float64) if is_difference else array.astype(np.float64) - self.anchor[key]
            if self.codec.error_feedback and key in self.residual:
                x = x + self.residual[key]
            values[key] = x
        broken = non_finite_key({**values, **as_is})
        if broken is not None:  # encoded, it could no longer be told from a sound update
            raise FloatingPointError(
                f"site {self.context.site if self.context else '?'!r}: training diverged, its update holds "
                f"NaN or Inf (in {broken!r}): lower the learning rate, clip gradients or check its data"
            )
        bound = update.extras.get("norm_bound")
        if bound is not None:  # what the statistics sent as they are leave of the clip norm, for the parameters
            bound = math.sqrt(
                max(float(bound) ** 2 - l2_norm(v for v in as_is.values() if is_averageable(v)) ** 2, 0.0)
            )
        encoded, decoded = encode_update(self.codec, values, bound)
        if self.codec.error_feedback:
            self.residual = {k: values[k] - decoded[k] for k in values}
        return SiteUpdate(
            site="",
            weights=as_is,
            num_samples=num_samples,
            extras={**update.extras, "compressed": encoded, "compressed_difference": is_difference},
        )

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "residual": self.residual}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.residual = dict(state_dict.get("residual", {}))
