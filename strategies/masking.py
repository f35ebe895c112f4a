"""The cryptography of secure aggregation, on the ``cryptography`` library (OpenSSL): nothing hand-rolled.

- identity keys: one Ed25519 key pair per site, made once (``lightning-fed keys``); each site holds its private key,
  every site holds every site's public key, and the coordinator never needs either;
- key agreement: X25519, fresh pairs every round, each round's public keys signed with the site's identity key;
- key derivation: HKDF-SHA256 of the X25519 secret, bound to the round and the pair of sites;
- masks: the ChaCha20 keystream under the derived key (a stream cipher as the pseudo-random generator), over the
  ring Z_2^64, or Z_2^32 when every update's norm is bounded (DP-FedAvg's clip norm) so that the sum cannot wrap;
- secret sharing: Shamir's scheme over the prime field GF(2⁵²¹ − 1) (room for a 256-bit key), each
  share encrypted for its holder with ChaCha20-Poly1305 (authenticated: a share altered on the way is refused).
"""

from __future__ import annotations

import math
import os
import secrets
from pathlib import Path
from typing import Iterable

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PROTOCOL = b"lightning-fed secagg v2"
FIELD_PRIME = 2**521 - 1  # a Mersenne prime: Shamir shares of 256-bit keys live in GF(p)
RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


class SecAggError(RuntimeError):
    """Secure aggregation cannot go on safely (a forged key, too few sites); the message names the site."""


# -- identities ------------------------------------------------------------------------------------
def write_identities(sites: Iterable[str], folder: str | os.PathLike) -> Path:
    """One Ed25519 key pair per site: ``<site>.key`` (private, mode 0600: that site alone keeps it) and ``<site>.pub``
    (public: every site gets every ``.pub``). Existing files are never overwritten."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for site in sites:
        private_path, public_path = folder / f"{site}.key", folder / f"{site}.pub"
        if private_path.exists() or public_path.exists():
            raise FileExistsError(
                f"{private_path} or {public_path} exists already: keep that identity or remove both files"
            )
        key = Ed25519PrivateKey.generate()
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
        public_path.write_bytes(
            key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
    return folder


def load_identity(folder: str | os.PathLike, site: str) -> Ed25519PrivateKey:
    path = Path(folder) / f"{site}.key"
    if not path.is_file():
        raise SecAggError(
            f"site {site!r}: no identity key at {path}: give each site its own key "
            "(lightning-fed keys --sites ... --out FOLDER) in secagg_kwargs={'identity_dir': FOLDER}"
        )
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SecAggError(f"site {site!r}: {path} is not an Ed25519 private key")
    return key


def load_identity_public(folder: str | os.PathLike, site: str) -> Ed25519PublicKey:
    path = Path(folder) / f"{site}.pub"
    if not path.is_file():
        raise SecAggError(
            f"no public identity key for site {site!r} at {path}: every site needs every site's .pub file"
        )
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise SecAggError(f"{path} is not an Ed25519 public key")
    return key


def _signed_part(site: str, round_: int, share_key: bytes, mask_key: bytes) -> bytes:
    return b"|".join([PROTOCOL, site.encode(), round_.to_bytes(8, "big"), share_key, mask_key])


def advertise(
    identity: Ed25519PrivateKey, site: str, round_: int, share_key: X25519PrivateKey, mask_key: X25519PrivateKey
) -> dict[str, bytes]:
    """This round's two public keys, signed with the site's identity key."""
    share_pub = share_key.public_key().public_bytes(*RAW)
    mask_pub = mask_key.public_key().public_bytes(*RAW)
    return {
        "share": share_pub,
        "mask": mask_pub,
        "signature": identity.sign(_signed_part(site, round_, share_pub, mask_pub)),
    }


def verify(advertised: dict[str, dict[str, bytes]], identities: dict[str, Ed25519PublicKey], round_: int) -> None:
    """Every site's keys for ``round_`` carry its own identity's signature, or :class:`SecAggError` names the site."""
    for site, keys in advertised.items():
        identity = identities.get(site)
        if identity is None:
            raise SecAggError(f"site {site!r} takes part in secure aggregation but has no public identity key here")
        try:
            identity.verify(keys["signature"], _signed_part(site, round_, keys["share"], keys["mask"]))
        except (InvalidSignature, KeyError, TypeError):
            raise SecAggError(
                f"the public keys of site {site!r} for round {round_} are not signed by its identity key: "
                "the coordinator or the link altered them, so this site stops instead of masking for them"
            ) from None


# -- key agreement and masks -----------------------------------------------------------------------
def derive(private: X25519PrivateKey, peer_public: bytes, round_: int, purpose: bytes, pair: tuple[str, str]) -> bytes:
    """A 32-byte key both ends of ``pair`` derive alike (X25519, then HKDF-SHA256 bound to round, purpose and pair)."""
    secret = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    low, high = sorted(pair)
    info = b"|".join([PROTOCOL, purpose, round_.to_bytes(8, "big"), low.encode(), high.encode()])
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def mask_stream(key: bytes, tensor: int, size: int, dtype: type = np.uint64) -> np.ndarray:
    """``size`` pseudo-random ring elements for one tensor: the ChaCha20 keystream under ``key`` (nonce: the tensor)."""
    itemsize = np.dtype(dtype).itemsize
    nonce = tensor.to_bytes(16, "little")  # counter 0, then the tensor's number: a fresh stream per tensor
    encryptor = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(itemsize * size)), dtype=dtype)


def seal(key: bytes, plaintext: bytes, context: bytes) -> bytes:
    """Authenticated encryption (ChaCha20-Poly1305) of one share for its holder; ``context`` is bound to it."""
    nonce = secrets.token_bytes(12)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, context)


def unseal(key: bytes, sealed: bytes, context: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:12], sealed[12:], context)
    except InvalidTag:
        raise SecAggError("a secret share failed authentication: it was altered on the way") from None


# -- Shamir's secret sharing -------------------------------------------------------------------------
def split_secret(secret: bytes, holders: int, threshold: int) -> list[tuple[int, int]]:
    """``holders`` shares ``(x, y)`` (x = 1..holders) of which any ``threshold`` rebuild ``secret``, fewer tell nothing."""
    if not 1 <= threshold <= holders:
        raise ValueError(f"threshold must be between 1 and the number of holders ({holders}), got {threshold}")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(FIELD_PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, holders + 1):
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % FIELD_PRIME
        shares.append((x, y))
    return shares


def combine_shares(shares: list[tuple[int, int]], length: int = 32) -> bytes:
    """The secret from ``threshold`` or more shares (Lagrange interpolation at 0)."""
    secret = 0
    for i, (xi, yi) in enumerate(shares):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(shares):
            if i != j:
                numerator = numerator * -xj % FIELD_PRIME
                denominator = denominator * (xi - xj) % FIELD_PRIME
        secret = (secret + yi * numerator * pow(denominator, -1, FIELD_PRIME)) % FIELD_PRIME
    if secret >= 1 << (8 * length):
        raise ValueError("the shares do not rebuild a key: too few of them, or a wrong one")
    return secret.to_bytes(length, "big")


def share_to_bytes(share: tuple[int, int]) -> bytes:
    return share[0].to_bytes(4, "big") + share[1].to_bytes(66, "big")


def share_from_bytes(data: bytes) -> tuple[int, int]:
    return int.from_bytes(data[:4], "big"), int.from_bytes(data[4:], "big")


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def private_from_bytes(data: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(data)


# -- fixed point in the ring Z_2^64 (or Z_2^32) ------------------------------------------------------
FRACTIONAL_BITS = 24
RINGS = {64: (np.uint64, np.int64), 32: (np.uint32, np.int32)}


def to_fixed(values: np.ndarray, bits: int = FRACTIONAL_BITS, ring: int = 64) -> np.ndarray:
    unsigned, signed = RINGS[ring]
    scaled = np.rint(values.astype(np.float64) * 2.0**bits)
    if np.abs(scaled).max(initial=0.0) >= 2.0 ** (ring - 2):
        raise ValueError(
            f"secagg: a value too large for {bits}-bit fixed point in the {ring}-bit ring "
            f"(|x| ~ {np.abs(values).max():.3g}): lower fractional_bits"
        )
    return scaled.astype(signed).view(unsigned)


def from_fixed(total: np.ndarray, bits: int = FRACTIONAL_BITS) -> np.ndarray:
    """The signed value of a ring sum (its dtype says the ring), over 2^bits."""
    signed = {np.dtype(u): s for u, s in RINGS.values()}[total.dtype]
    return total.view(signed).astype(np.float64) / 2.0**bits


def bounded_ring_bits(sites: int, norm_bound: float) -> int | None:
    """Fractional bits for the 32-bit ring when every update's L2 norm is at most ``norm_bound`` (so is each value):
    the most with which the sum of ``sites`` such updates cannot wrap, or ``None`` if fewer than 8 would fit."""
    room = (2.0**31 / max(sites, 1) - 1) / norm_bound
    bits = math.floor(math.log2(room)) if room > 1 else -1
    return min(bits, 30) if bits >= 8 else None


def pair_masks(
    key: bytes, me: str, peer: str, tensors: dict[str, tuple[int, ...]], ring: int = 64
) -> dict[str, np.ndarray]:
    """The masks ``me`` adds for ``peer`` (``+`` when ``me < peer``, ``−`` otherwise), flat, in tensor order; the two
    ends' masks cancel in the sum."""
    unsigned = RINGS[ring][0]
    out = {}
    for index, (name, shape) in enumerate(tensors.items()):
        m = mask_stream(key, index, int(np.prod(shape, dtype=np.int64)), unsigned)
        out[name] = m if me < peer else (unsigned(0) - m)
    return out


def mask_update(
    values: dict[str, np.ndarray],
    weight: float,
    me: str,
    pair_keys: dict[str, bytes],
    bits: int = FRACTIONAL_BITS,
    ring: int = 64,
) -> dict[str, np.ndarray]:
    """``weight · values`` in fixed point plus, for every peer, the pairwise mask that its own update cancels."""
    shapes = {k: v.shape for k, v in values.items()}
    out = {k: to_fixed(v.astype(np.float64) * weight, bits, ring).reshape(-1) for k, v in values.items()}
    for peer, key in pair_keys.items():
        for name, m in pair_masks(key, me, peer, shapes, ring).items():
            out[name] = out[name] + m  # unsigned arithmetic wraps: everything is mod 2^ring
    return {k: v.reshape(shapes[k]) for k, v in out.items()}


def private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_of(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(*RAW)
