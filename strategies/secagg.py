"""Secure aggregation (Bonawitz et al., 2017; dropout recovery as in SecAgg+, Bell et al., 2020): the coordinator sees
only masked updates, and their true sum, even when a site drops after the masks were agreed.

    every round t, every site i (primitives in :mod:`lightning_fed.strategies.masking`):
      1. keys:    fresh X25519 pairs (c_i for shares, s_i for masks); the public halves signed with i's Ed25519
                  identity key and exchanged through the coordinator; a site refuses any key its owner did not sign
      2. shares:  s_i's private key split t-of-n (Shamir), each share sealed for its holder (ChaCha20-Poly1305 under
                  HKDF(X25519(c_i, c_j))); U = the sites that sent shares
      3. masking: x_i = round(2^f · c_i · w_i) mod 2^64,  c_i = n_i (or 1 for uniform rules); in the ring 2^32
                  instead when c_i = 1 and ||w_i|| ≤ S (DP-FedAvg's clipped Δ): f chosen so K·2^f·S < 2^31
                  y_i = x_i + Σ_{j∈U, j>i} m_ij − Σ_{j∈U, j<i} m_ij,   m_ij = ChaCha20(HKDF(X25519(s_i, s_j), t))
    server:  P = the sites whose y_i arrived.  D = U \\ P empty: Σ_P y_i = Σ_P x_i (the masks cancel).
             Otherwise it asks P for their shares of each s_d (d ∈ D), rebuilds s_d from t of them, removes the
             masks m_id of every i ∈ P and hands the inner rule Σ_P x_i / 2^f as one combined update.

Site half: :class:`~lightning_fed.strategies.site.secagg.SecAggSite`. Threat model: the docs' privacy page ("Threat model").
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from lightning_fed.strategies.base import Aggregator, GlobalModel, SiteUpdate, Weights
from lightning_fed.strategies.masking import (
    FRACTIONAL_BITS,
    SecAggError,
    combine_shares,
    derive,
    from_fixed,
    load_identity_public,
    pair_masks,
    private_from_bytes,
    public_of,
    share_from_bytes,
    write_identities,
)

if TYPE_CHECKING:
    from lightning_fed.strategies.site.secagg import SecAggSite


def majority(sites: int) -> int:
    """The default threshold: more than half of the round's sites must reveal shares to rebuild a key."""
    return sites // 2 + 1


def unmask_sum(masked: list[Weights]) -> dict[str, np.ndarray]:
    """``Σ y_i`` in the ring (uint64 wraps): the true sum when every masked site is present."""
    return {key: sum((m[key] for m in masked[1:]), masked[0][key].copy()) for key in masked[0]}


class SecureAggregation(Aggregator):
    """Wraps an averaging rule: unmasks the sum of the sites' masked updates (rebuilding the masks of sites that
    dropped) and hands the inner rule one combined update (the weighted mean, standing for all sites), so the inner
    rule never sees a single site's update.

    Args:
        inner: the averaging rule (``fedavg``, ``fedprox``, ``fedbn``, ``fedfbn``, server optimizers, ``dp_fedavg``).
        threshold: shares needed to rebuild a dropped site's mask key (default: a majority of the round's sites);
            a round survives dropouts as long as this many of its sites are left.
        identity_dir: a folder of per-site Ed25519 identity keys (``lightning-fed keys``): each site reads its own
            ``<site>.key`` and every ``<site>.pub``; across machines, each hospital keeps only its own ``.key``.
            Default: fresh keys for the run in a private temporary folder (simulation on one machine).
        fractional_bits: fixed-point precision f of the masked sum.
    """

    hides_site_updates = True

    def __init__(
        self,
        inner: Aggregator,
        threshold: Optional[int] = None,
        identity_dir: Optional[str] = None,
        fractional_bits: int = FRACTIONAL_BITS,
    ) -> None:
        if inner.secure_weighting is None:
            raise ValueError(
                f"{inner.name or type(inner).__name__} needs every site's own update, so it cannot run under "
                "secure aggregation: use an averaging rule (fedavg, fedprox, fedbn, fedfbn, fedadam, dp_fedavg)"
            )
        if inner.decodes_updates:  # a rule that decodes what travels (compression)
            raise ValueError(
                "compression cannot go with secure aggregation: every value is masked with a uniform 64-bit "
                "mask, so an encoded update would be as large as a full one, and a sum of differently scaled "
                "codes cannot be decoded: use one or the other"
            )
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 2):
            raise ValueError(
                f"secagg threshold must be an integer >= 2 (shares needed to rebuild a key), got {threshold!r}"
            )
        self.inner, self.threshold, self.identity_dir, self.fractional_bits = (
            inner,
            threshold,
            identity_dir,
            fractional_bits,
        )
        self.name = f"{inner.name or type(inner).__name__}+secagg"
        self._identities: Optional[str] = identity_dir
        self._answers: dict[str, Any] = {}

    @property
    def trains_personal_models(self) -> bool:  # type: ignore[override]
        return self.inner.trains_personal_models

    def check_model(self, model: Any) -> None:
        self.inner.check_model(model)

    def check_partial_rounds(self) -> None:
        self.inner.check_partial_rounds()  # a site that drops after masking has its masks rebuilt from shares

    def prepare(self, sites: list[str]) -> None:
        if self.threshold is not None and self.threshold > len(sites):
            raise ValueError(f"secagg threshold={self.threshold} is more than the federation's {len(sites)} sites")
        if self.identity_dir is None:  # simulation: every site on this machine, keys made for the run
            folder = tempfile.mkdtemp(prefix="lightning-fed-identities-")
            atexit.register(shutil.rmtree, folder, True)  # private keys never outlive the driver
            self._identities = str(write_identities(sites, folder))
            return
        try:
            for site in sites:
                load_identity_public(self.identity_dir, site)
        except SecAggError as err:
            raise ValueError(str(err)) from None

    def site_algorithm(self) -> "SecAggSite":
        from lightning_fed.strategies.site.secagg import SecAggSite

        if self._identities is None:
            raise ValueError("secure aggregation's identity keys are set up when the federation starts (prepare)")
        return SecAggSite(
            self.inner.site_algorithm(),
            self.inner.secure_weighting,
            self.fractional_bits,
            self.threshold,
            self._identities,
        )

    # -- a round ------------------------------------------------------------------------------------
    @staticmethod
    def _protocol(updates: list[SiteUpdate], round: int) -> dict[str, Any]:
        info = updates[0].extras["secagg"]
        for u in updates:
            mine = u.extras.get("secagg") or {}
            if [mine.get(k) for k in ("round", "sites", "ring", "bits")] != [
                round,
                *(info[k] for k in ("sites", "ring", "bits")),
            ]:
                raise ValueError(
                    f"site {u.site!r} masked for round {mine.get('round')} with sites {mine.get('sites')} in the "
                    f"{mine.get('ring')}-bit ring, the others for round {round} with {info['sites']} in the {info['ring']}-bit ring"
                )
        return info

    def follow_up(self, round: int, updates: list[SiteUpdate]) -> Any:
        info = self._protocol(updates, round)
        present = {u.site for u in updates}
        dropped = sorted(set(info["sites"]) - present)
        self._answers = {}
        if not dropped:
            return None
        return {"round": round, "dropped": dropped, "present": sorted(present)}

    def receive_answers(self, round: int, answers: dict[str, Any]) -> None:
        self._answers = dict(answers)

    def aggregate(self, round: int, updates: list[SiteUpdate], current: Weights | None) -> GlobalModel:
        info = self._protocol(updates, round)
        dtypes = info["dtypes"]
        total = unmask_sum([{k: u.weights[k] for k in dtypes} for u in updates])
        present = sorted(u.site for u in updates)
        for dropped in sorted(set(info["sites"]) - set(present)):
            self._remove_masks_of(dropped, present, info, total, round)
        self._answers = {}
        samples = sum(u.num_samples for u in updates)
        divisor = samples if self.inner.secure_weighting == "samples" else len(updates)
        largest = max(updates, key=lambda u: u.num_samples)
        weights = {
            k: (from_fixed(total[k], info["bits"]) / divisor).astype(dtypes[k])
            if k in dtypes
            else np.array(v, copy=True)
            for k, v in largest.weights.items()
        }
        extras = {"sites": len(updates)}
        for key in {k for u in updates for k in u.extras} - {"secagg"}:
            values = [u.extras.get(key) for u in updates]
            if all(isinstance(v, (bool, int, float)) for v in values):
                extras[key] = sum(values)  # numeric extras travel in the clear and are summed
        return self.inner.aggregate(round, [SiteUpdate("secure-sum", weights, samples, extras)], current)

    def _remove_masks_of(
        self, dropped: str, present: list[str], info: dict[str, Any], total: dict[str, np.ndarray], round: int
    ) -> None:
        """Rebuild ``dropped``'s mask key from the present sites' shares and take its masks out of ``total``."""
        shares = [share_from_bytes(a[dropped]) for a in self._answers.values() if isinstance(a, dict) and dropped in a]
        threshold = info["threshold"]
        if len(shares) < threshold:
            raise ValueError(
                f"site {dropped!r} dropped after masking and only {len(shares)} site(s) revealed shares of its mask "
                f"key, fewer than threshold={threshold}: the sum stays masked (run with more sites, or a lower threshold)"
            )
        try:
            key = private_from_bytes(combine_shares(shares[:threshold]))
        except ValueError:
            key = None
        if key is None or public_of(key) != info["mask_keys"][dropped]:
            raise ValueError(
                f"the shares of site {dropped!r}'s mask key do not rebuild the key it signed: a share is wrong"
            )
        shapes = {k: total[k].shape for k in info["dtypes"]}
        for site in present:
            pair_key = derive(key, info["mask_keys"][site], round, b"mask", (dropped, site))
            for name, m in pair_masks(pair_key, site, dropped, shapes, info["ring"]).items():
                total[name] = total[name] - m.reshape(
                    shapes[name]
                )  # what ``site`` added for ``dropped``: nothing cancels it

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
