"""Partitioners: how a simulation splits one dataset across sites.

Each partitioner is a seeded, reproducible callable ``partitioner(labels, num_sites) -> list of index arrays``.
They never look at samples, only at labels (and only when the rule needs them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import numpy as np


class Partitioner(Protocol):
    def __call__(self, labels: np.ndarray, num_sites: int) -> list[np.ndarray]: ...


@dataclass
class IID:
    """Shuffle and deal out equal shares (sizes differ by at most one), or shares in the ratio ``shares``
    (e.g. ``(4, 6)``: study A's 4:6 split into two sites)."""

    seed: int = 0
    shares: Optional[Sequence[float]] = None

    def __call__(self, labels: np.ndarray, num_sites: int) -> list[np.ndarray]:
        _check_sites(num_sites, len(labels))
        order = np.random.default_rng(self.seed).permutation(len(labels))
        if self.shares is None:
            return [np.sort(part) for part in np.array_split(order, num_sites)]
        shares = np.asarray(self.shares, dtype=float)
        if len(shares) != num_sites or (shares <= 0).any():
            raise ValueError(f"IID shares need one positive number per site ({num_sites}), got {list(self.shares)}")
        cuts = np.round(np.cumsum(shares)[:-1] / shares.sum() * len(labels)).astype(int)
        return [np.sort(part) for part in np.split(order, cuts)]


@dataclass
class Dirichlet:
    """Label skew: for each class, site shares are drawn from Dir(alpha). Small alpha = very non-IID.

    Draws are repeated (deterministically from ``seed``) until every site has ``min_samples`` samples.
    """

    alpha: float
    seed: int = 0
    min_samples: int = 1
    max_tries: int = 100

    def __post_init__(self) -> None:
        if self.alpha <= 0:
            raise ValueError(f"Dirichlet alpha must be > 0, got {self.alpha}")

    def __call__(self, labels: np.ndarray, num_sites: int) -> list[np.ndarray]:
        _check_sites(num_sites, len(labels))
        labels = np.asarray(labels)
        rng = np.random.default_rng(self.seed)
        for _ in range(self.max_tries):
            parts: list[list[int]] = [[] for _ in range(num_sites)]
            for cls in np.unique(labels):
                members = rng.permutation(np.flatnonzero(labels == cls))
                shares = rng.dirichlet(np.full(num_sites, self.alpha))
                cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
                for site, chunk in enumerate(np.split(members, cuts)):
                    parts[site].extend(chunk.tolist())
            if min(len(p) for p in parts) >= self.min_samples:
                return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
        raise ValueError(
            f"Dirichlet(alpha={self.alpha}) left a site with fewer than {self.min_samples} samples in "
            f"{self.max_tries} draws: raise alpha or lower min_samples"
        )


@dataclass
class SizeAndRatio:
    """Explicit per-site size and share of positive labels, drawn without replacement from one pool.

    Study B's hospitals: ``SizeAndRatio(sizes=[30000, 3000, 3000, 3000, 3000],
    positive_ratios=[0.5, 0.1, 0.1, 0.1, 0.1])`` on binary labels.
    """

    sizes: Sequence[int]
    positive_ratios: Sequence[float]
    positive_label: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.positive_ratios):
            raise ValueError(f"sizes has {len(self.sizes)} entries but positive_ratios has {len(self.positive_ratios)}")
        if any(s <= 0 for s in self.sizes):
            raise ValueError(f"every site size must be > 0, got {list(self.sizes)}")
        if any(not 0.0 <= r <= 1.0 for r in self.positive_ratios):
            raise ValueError(f"positive_ratios must lie in [0, 1], got {list(self.positive_ratios)}")

    def __call__(self, labels: np.ndarray, num_sites: int | None = None) -> list[np.ndarray]:
        if num_sites is not None and num_sites != len(self.sizes):
            raise ValueError(f"SizeAndRatio describes {len(self.sizes)} sites but num_sites={num_sites}")
        labels = np.asarray(labels)
        rng = np.random.default_rng(self.seed)
        positives = rng.permutation(np.flatnonzero(labels == self.positive_label))
        negatives = rng.permutation(np.flatnonzero(labels != self.positive_label))
        n_pos = [int(round(s * r)) for s, r in zip(self.sizes, self.positive_ratios)]
        n_neg = [s - p for s, p in zip(self.sizes, n_pos)]
        if sum(n_pos) > len(positives) or sum(n_neg) > len(negatives):
            raise ValueError(
                f"SizeAndRatio needs {sum(n_pos)} positive and {sum(n_neg)} negative samples, the pool has "
                f"{len(positives)} and {len(negatives)}: lower the sizes or ratios"
            )
        parts, p0, n0 = [], 0, 0
        for p, n in zip(n_pos, n_neg):
            parts.append(np.sort(np.concatenate([positives[p0 : p0 + p], negatives[n0 : n0 + n]])))
            p0, n0 = p0 + p, n0 + n
        return parts


def train_val_test(test_fraction: float, val_fraction: float) -> list[float]:
    """``[train, val, test]`` shares of a site's data, checked: ``0 < test``, ``0 <= val``, ``test + val < 1``."""
    if not 0 < test_fraction < 1 or not 0 <= val_fraction < 1 or test_fraction + val_fraction >= 1:
        raise ValueError(
            f"need 0 < test_fraction, 0 <= val_fraction and test_fraction + val_fraction < 1, got {test_fraction}, {val_fraction}"
        )
    return [1.0 - test_fraction - val_fraction, val_fraction, test_fraction]


def split_fractions(indices: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Shuffle ``indices`` and cut them by ``fractions`` (e.g. ``[0.8, 0.2]`` for a site's train/test split)."""
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"split fractions must sum to 1, got {list(fractions)}")
    order = np.random.default_rng(seed).permutation(indices)
    cuts = np.round(np.cumsum(fractions)[:-1] * len(order)).astype(int)
    return [np.sort(part) for part in np.split(order, cuts)]


def _check_sites(num_sites: int, num_samples: int) -> None:
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    if num_samples < num_sites:
        raise ValueError(f"cannot split {num_samples} samples across {num_sites} sites: every site needs at least one")
