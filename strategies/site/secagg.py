"""Secure aggregation's site half: agree pairwise secrets at fit start, mask what the inner site half sends."""

from __future__ import annotations

import numpy as np
from lightning.pytorch import LightningModule, Trainer

from lightning_fed.strategies.base import SiteUpdate, is_averageable
from lightning_fed.strategies.secagg import FRACTIONAL_BITS, key_pair, mask_update, shared_secret
from lightning_fed.strategies.site import SiteAlgorithm, WrappedSiteAlgorithm


class SecAggSite(WrappedSiteAlgorithm):
    """Masks what the inner site half would send; agrees pairwise secrets with the other sites at fit start."""

    def __init__(self, inner: SiteAlgorithm, weighting: str, bits: int = FRACTIONAL_BITS) -> None:
        super().__init__(inner)
        self.weighting, self.bits = weighting, bits
        self._secrets: dict[str, bytes] = {}  # never saved: every fit start agrees fresh ones
        self._round = 0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.inner.on_fit_start(trainer, pl_module)
        assert self.context is not None, "a site half is bound to its site before the Trainer starts"
        me = self.context.site
        private, public = key_pair()
        publics = self.context.all_gather("secagg-public-keys", format(public, "x"))
        self._secrets = {peer: shared_secret(private, int(key, 16)) for peer, key in publics.items() if peer != me}
        self._round = 0

    def local_update(self, trainer: Trainer, pl_module: LightningModule, num_samples: int) -> SiteUpdate:
        update = self.inner.local_update(trainer, pl_module, num_samples)
        self._round += 1
        floating = {k: v for k, v in update.weights.items() if is_averageable(v)}
        broken = next((k for k, v in floating.items() if not np.all(np.isfinite(v))), None)
        if broken is not None:  # masked, it could no longer be told from a sound update
            raise FloatingPointError(f"site {self.context.site!r}: training diverged in round {self._round}, its update holds "
                                     f"NaN or Inf (in {broken!r}): lower the learning rate, clip gradients or check its data")
        weight = float(num_samples) if self.weighting == "samples" else 1.0
        masked = mask_update(floating, weight, self.context.site, self._secrets, self._round, self.bits)
        counters = {k: v for k, v in update.weights.items() if not is_averageable(v)}
        return SiteUpdate(site="", weights={**masked, **counters}, num_samples=num_samples,
                          extras={**update.extras, "secagg": {k: str(v.dtype) for k, v in floating.items()}})
