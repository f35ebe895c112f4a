"""Secure aggregation's site half: every round, signed key agreement and shares, then the masked update."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from lightning.pytorch import LightningModule, Trainer

from lightning_fed.strategies.base import GlobalModel, SiteUpdate, is_averageable
from lightning_fed.strategies.masking import (
    FRACTIONAL_BITS,
    SecAggError,
    advertise,
    bounded_ring_bits,
    derive,
    load_identity,
    load_identity_public,
    mask_update,
    private_bytes,
    private_key,
    seal,
    share_to_bytes,
    split_secret,
    unseal,
    verify,
)
from lightning_fed.strategies.secagg import majority
from lightning_fed.strategies.site import SiteAlgorithm, WrappedSiteAlgorithm


class SecAggSite(WrappedSiteAlgorithm):
    """Masks what the inner site half would send. Before every round's update it agrees fresh keys with the round's
    sites (signed with its identity key, checked against theirs) and hands each a sealed share of its mask key."""

    def __init__(
        self,
        inner: SiteAlgorithm,
        weighting: str,
        bits: int = FRACTIONAL_BITS,
        threshold: Optional[int] = None,
        identity_dir: str = "",
    ) -> None:
        super().__init__(inner)
        self.weighting, self.bits, self.threshold, self.identity_dir = weighting, bits, threshold, identity_dir
        self.round = 0  # the last global model's round: the next update is round + 1 (kept in checkpoints)
        # never saved: keys and shares are fresh every round
        self._identity: Any = None
        self._peers: dict[str, Any] = {}
        self._held: dict[str, bytes] = {}  # shares of the other sites' mask keys for self._held_round
        self._held_round = 0
        self._share_sites: list[str] = []
        self._threshold = 0
        self._mask_keys: dict[str, bytes] = {}

    def bind(self, context: Any) -> None:
        super().bind(context)
        self._identity = load_identity(self.identity_dir, context.site)  # fails at start-up, naming the site

    def _identities(self, sites: list[str]) -> dict[str, Any]:
        for site in sites:
            if site not in self._peers:
                self._peers[site] = load_identity_public(self.identity_dir, site)
        return {s: self._peers[s] for s in sites}

    def _agree(self, round_: int) -> dict[str, bytes]:
        """Steps 1 and 2 of the round: signed keys, sealed shares. Returns the pairwise mask keys, by peer."""
        me = self.context.site
        share_key, mask_key = private_key(), private_key()
        advertised = self.context.all_gather(
            f"secagg/{round_}/keys", advertise(self._identity, me, round_, share_key, mask_key)
        )
        verify(advertised, self._identities(sorted(advertised)), round_)
        holders = sorted(advertised)
        threshold = self.threshold or majority(len(holders))
        if len(holders) < threshold:
            raise SecAggError(
                f"site {me!r}: only {len(holders)} site(s) are in round {round_}, fewer than the secure "
                f"aggregation threshold {threshold}"
            )
        shares = split_secret(private_bytes(mask_key), len(holders), threshold)
        sealed = {}
        for holder, share in zip(holders, shares):
            if holder != me:
                key = derive(share_key, advertised[holder]["share"], round_, b"share", (me, holder))
                sealed[holder] = seal(key, share_to_bytes(share), f"{round_}|{me}|{holder}".encode())
        received = self.context.all_gather(f"secagg/{round_}/shares", sealed)
        self._held, self._held_round = {}, round_
        for sender, boxes in received.items():
            if sender != me:
                key = derive(share_key, advertised[sender]["share"], round_, b"share", (sender, me))
                self._held[sender] = unseal(key, boxes[me], f"{round_}|{sender}|{me}".encode())
        self._share_sites = sorted(received)  # mask only with the sites whose key can be rebuilt if they drop
        self._threshold, self._mask_keys = threshold, {s: advertised[s]["mask"] for s in self._share_sites}
        return {
            peer: derive(mask_key, advertised[peer]["mask"], round_, b"mask", (me, peer))
            for peer in self._share_sites
            if peer != me
        }

    def local_update(self, trainer: Trainer, pl_module: LightningModule, num_samples: int) -> SiteUpdate:
        round_ = self.round + 1
        pair_keys = self._agree(round_)
        update = self.inner.local_update(trainer, pl_module, num_samples)
        floating = {k: v for k, v in update.weights.items() if is_averageable(v)}
        broken = next((k for k, v in floating.items() if not np.all(np.isfinite(v))), None)
        if broken is not None:  # masked, it could no longer be told from a sound update
            raise FloatingPointError(
                f"site {self.context.site!r}: training diverged in round {round_}, its update holds "
                f"NaN or Inf (in {broken!r}): lower the learning rate, clip gradients or check its data"
            )
        weight = float(num_samples) if self.weighting == "samples" else 1.0
        ring, bits = 64, self.bits
        bound = update.extras.get("norm_bound")
        if bound is not None and self.weighting == "uniform":  # |each value| ≤ S: the sum of K fits 32 bits
            narrow = bounded_ring_bits(len(self._share_sites), float(bound))
            ring, bits = (32, narrow) if narrow is not None else (64, self.bits)
        masked = mask_update(floating, weight, self.context.site, pair_keys, bits, ring)
        counters = {k: v for k, v in update.weights.items() if not is_averageable(v)}
        protocol = {
            "round": round_,
            "sites": self._share_sites,
            "threshold": self._threshold,
            "mask_keys": self._mask_keys,
            "dtypes": {k: str(v.dtype) for k, v in floating.items()},
            "ring": ring,
            "bits": bits,
        }
        return SiteUpdate(
            site="",
            weights={**masked, **counters},
            num_samples=num_samples,
            extras={**update.extras, "secagg": protocol},
        )

    def answer_follow_up(self, trainer: Trainer, pl_module: LightningModule, question: Any) -> dict[str, bytes]:
        """Shares of the mask keys of the sites that dropped this round, and of no other site."""
        me = self.context.site
        if not isinstance(question, dict) or question.get("round") != self._held_round:
            raise SecAggError(
                f"site {me!r}: asked for shares of round {question.get('round') if isinstance(question, dict) else '?'}, "
                f"but it holds those of round {self._held_round}"
            )
        present = set(question.get("present", []))
        if me not in present:
            raise SecAggError(f"site {me!r}: asked for shares by a coordinator that counts it as dropped")
        # a site whose update arrived keeps its key secret: its shares would unmask its update
        return {d: self._held[d] for d in question.get("dropped", []) if d in self._held and d not in present}

    def receive_global(self, trainer: Trainer, pl_module: LightningModule, model: GlobalModel) -> None:
        self.inner.receive_global(trainer, pl_module, model)
        self.round = model.round

    def state_dict(self) -> dict:
        return {**super().state_dict(), "round": self.round}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.round = int(state_dict.get("round", 0))
