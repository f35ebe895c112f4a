"""Secure aggregation (after Bonawitz et al., 2017): the coordinator sees only masked updates whose sum is the true sum.

    setup:   every pair of sites (i, j) agrees on a secret s_ij by Diffie-Hellman (RFC 3526 group 14); only public
             keys pass through the coordinator
    site i:  x_i = round(2^f · c_i · w_i) mod 2^64                        fixed point, c_i = n_i (or 1 for uniform rules)
             y_i = x_i + Σ_{j>i} PRG(s_ij, t) − Σ_{j<i} PRG(s_ij, t)   mod 2^64, fresh masks every round t
    server:  Σ_i y_i = Σ_i x_i  (the masks cancel)  →  Σ_i c_i w_i = Σ_i x_i / 2^f  →  the inner rule's mean

PRG is SHAKE-256. Site half: :class:`~lightning_fed.strategies.site.secagg.SecAggSite`. Threat model, and what it does not cover, in the README ("Secure aggregation").
"""

from __future__ import annotations

import hashlib
import secrets
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_fed.strategies.base import Aggregator, GlobalModel, SiteUpdate, Weights

if TYPE_CHECKING:
    from lightning_fed.strategies.site.secagg import SecAggSite

# RFC 3526, 2048-bit MODP group 14, generator 2
DH_PRIME = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DD"
    "EF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F"
    "83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6955817183995497CEA956AE515D2261898FA0510"
    "15728E5A8AACAA68FFFFFFFFFFFFFFFF", 16)
DH_GENERATOR = 2
FRACTIONAL_BITS = 24


def key_pair() -> tuple[int, int]:
    private = secrets.randbelow(DH_PRIME - 3) + 2
    return private, pow(DH_GENERATOR, private, DH_PRIME)


def shared_secret(private: int, peer_public: int) -> bytes:
    if not 1 < peer_public < DH_PRIME - 1:
        raise ValueError("secagg: a peer's public key is out of range")
    return hashlib.sha256(pow(peer_public, private, DH_PRIME).to_bytes(256, "big")).digest()


def mask(secret: bytes, round_: int, key: str, size: int) -> np.ndarray:
    """A fresh pseudo-random uint64 mask for one tensor of one round (SHAKE-256 as the PRG)."""
    stream = hashlib.shake_256(secret + round_.to_bytes(8, "big") + key.encode()).digest(8 * size)
    return np.frombuffer(stream, dtype=np.uint64)


def to_fixed(values: np.ndarray, bits: int = FRACTIONAL_BITS) -> np.ndarray:
    scaled = np.rint(values.astype(np.float64) * (1 << bits))
    if np.abs(scaled).max(initial=0.0) >= 2.0 ** 62:
        raise ValueError(f"secagg: a value too large for {bits}-bit fixed point (|x| ~ {np.abs(values).max():.3g}): lower fractional_bits")
    return scaled.astype(np.int64).view(np.uint64)


def from_fixed(total: np.ndarray, bits: int = FRACTIONAL_BITS) -> np.ndarray:
    return total.view(np.int64).astype(np.float64) / (1 << bits)


def mask_update(values: Weights, weight: float, me: str, secrets_by_peer: dict[str, bytes], round_: int,
                bits: int = FRACTIONAL_BITS) -> Weights:
    """``weight · values`` in fixed point plus pairwise masks that cancel in the sum over all sites."""
    out: Weights = {}
    for key, value in values.items():
        y = to_fixed(value.astype(np.float64) * weight, bits).reshape(-1)
        for peer, secret in secrets_by_peer.items():
            m = mask(secret, round_, key, y.size)
            y = y + m if me < peer else y - m  # uint64 arithmetic wraps: everything is mod 2^64
        out[key] = y.reshape(value.shape)
    return out


def unmask_sum(masked: list[Weights], bits: int = FRACTIONAL_BITS) -> dict[str, np.ndarray]:
    """The true ``Σ weight_i · values_i`` (float64) from every site's masked update."""
    return {key: from_fixed(sum((m[key] for m in masked[1:]), masked[0][key].copy()), bits) for key in masked[0]}


class SecureAggregation(Aggregator):
    """Wraps an averaging rule: unmasks the sum of the sites' masked updates and hands the inner rule one combined
    update (the weighted mean, standing for all sites), so the inner rule never sees a single site's update."""

    def __init__(self, inner: Aggregator, fractional_bits: int = FRACTIONAL_BITS) -> None:
        if inner.secure_weighting is None:
            raise ValueError(f"{inner.name or type(inner).__name__} needs every site's own update, so it cannot run under "
                             "secure aggregation: use an averaging rule (fedavg, fedprox, fedbn, fedfbn, fedadam, dp_fedavg)")
        self.inner, self.fractional_bits = inner, fractional_bits
        self.name = f"{inner.name or type(inner).__name__}+secagg"

    hides_site_updates = True

    def check_model(self, model: Any) -> None:
        self.inner.check_model(model)

    def check_partial_rounds(self) -> None:
        raise ValueError("secure aggregation cannot yet recover the masks of a site that drops after masking (the "
                         "others' sum would stay masked): use on_site_failure='abort' with secagg")

    def site_algorithm(self) -> "SecAggSite":
        from lightning_fed.strategies.site.secagg import SecAggSite

        return SecAggSite(self.inner.site_algorithm(), self.inner.secure_weighting, self.fractional_bits)

    def aggregate(self, round: int, updates: list[SiteUpdate], current: Weights | None) -> GlobalModel:
        dtypes = updates[0].extras["secagg"]
        total = unmask_sum([{k: u.weights[k] for k in dtypes} for u in updates], self.fractional_bits)
        samples = sum(u.num_samples for u in updates)
        divisor = samples if self.inner.secure_weighting == "samples" else len(updates)
        largest = max(updates, key=lambda u: u.num_samples)
        weights = {k: (total[k] / divisor).astype(dtypes[k]) if k in dtypes else np.array(v, copy=True) for k, v in largest.weights.items()}
        extras = {"sites": len(updates)}
        for key in {k for u in updates for k in u.extras} - {"secagg"}:
            values = [u.extras.get(key) for u in updates]
            if all(isinstance(v, (bool, int, float)) for v in values):
                extras[key] = sum(values)  # numeric extras travel in the clear and are summed
        return self.inner.aggregate(round, [SiteUpdate("secure-sum", weights, samples, extras)], current)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
