"""Study D's setting on real images: multi-label FashionMNIST mosaics at non-IID sites that annotate different labels.

Each sample is a 2×2 mosaic (56×56) of four FashionMNIST images; its labels say which of the 10 garment classes
appear in it. Sites differ three ways, as hospitals do:

- prevalence: site ``k`` draws tile classes from its own class mix ``p_k ~ Dir(alpha)``;
- annotation: site ``k`` labels only ``annotated_labels[k]``; the rest are ``-1`` (unknown, not negative);
- acquisition: each site's "scanner" changes contrast and brightness.

Sites never share an image: the tile pool is split across sites class by class. The last
``PRETRAIN_POOL_SIZE`` images of the official train split are kept out of every site, for pretraining a backbone
(``lightning_fed.models.pretrain``), the stand-in here for ImageNet weights.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from lightning.pytorch import LightningDataModule

from lightning_fed.data.fashion_mnist import CLASSES, MEAN, STD, fashion_mnist_root, load_fashion_mnist
from lightning_fed.data.partial_labels import check_label_sets, mask_labels, rotating_label_sets
from lightning_fed.data.partition import split_fractions
from lightning_fed.data.sites import Site, SiteSplits, per_site
from lightning_fed.data.tensors import TensorBatches

PRETRAIN_POOL_SIZE = 10_000
TILES = 4
DEFAULT_CONTRAST = (1.0, 0.7, 1.3, 0.85, 1.15, 0.6, 1.0, 0.9)
DEFAULT_BRIGHTNESS = (0.0, 0.15, -0.1, 0.25, 0.05, 0.1, -0.2, 0.0)


def site_pool_indices(num_train: int = 60_000) -> np.ndarray:
    """Indices of the official train split that sites may use (everything but the pretraining pool)."""
    return np.arange(num_train - PRETRAIN_POOL_SIZE)


def pretraining_pool_indices(num_train: int = 60_000) -> np.ndarray:
    return np.arange(num_train - PRETRAIN_POOL_SIZE, num_train)


def compose_mosaics(images: np.ndarray, tiles: np.ndarray) -> np.ndarray:
    """``images [N, 28, 28]`` and ``tiles [M, 4]`` indices → ``[M, 56, 56]`` mosaics (row-major 2×2)."""
    t = images[tiles]  # [M, 4, 28, 28]
    top = np.concatenate([t[:, 0], t[:, 1]], axis=2)
    bottom = np.concatenate([t[:, 2], t[:, 3]], axis=2)
    return np.concatenate([top, bottom], axis=1)


def mosaic_labels(classes: np.ndarray, num_classes: int = len(CLASSES)) -> np.ndarray:
    """``classes [M, 4]`` → multi-hot ``[M, num_classes]``."""
    out = np.zeros((len(classes), num_classes), dtype=np.int64)
    np.put_along_axis(out, classes, 1, axis=1)
    return out


def scanner(images: np.ndarray, contrast: float, brightness: float) -> torch.Tensor:
    """uint8 images → normalised float tensor as one site's scanner sees them."""
    x = images.astype(np.float32) / 255.0
    x = np.clip((x - 0.5) * contrast + 0.5 + brightness, 0.0, 1.0)
    return (torch.from_numpy(x).unsqueeze(1) - MEAN) / STD


class MosaicSiteData(SiteSplits):
    """One site's mosaics, built inside the site's actor from its own copy of the FashionMNIST files."""

    def __init__(
        self,
        data_dir: Optional[str],
        plan: dict[str, dict[str, np.ndarray]],
        contrast: float,
        brightness: float,
        batch_size: int,
        eval_batch_size: int = 256,
    ) -> None:
        super().__init__(batch_size, eval_batch_size)
        self.data_dir, self.plan = data_dir, plan
        self.contrast, self.brightness = contrast, brightness

    def prepare_data(self) -> None:
        fashion_mnist_root(self.data_dir)

    def setup(self, stage: str) -> None:
        if self.datasets:
            return
        pools = {
            "train": load_fashion_mnist(self.data_dir, "train")[0],
            "test": load_fashion_mnist(self.data_dir, "test")[0],
        }
        for split, part in self.plan.items():
            x = scanner(compose_mosaics(pools[part["pool"]], part["tiles"]), self.contrast, self.brightness)
            self.datasets[split] = TensorBatches(
                x, torch.from_numpy(np.array(part["targets"]))
            )  # Ray hands over read-only arrays


class FashionMosaicSites(LightningDataModule):
    """Partial-label, non-IID sites of 2×2 FashionMNIST mosaics (10 labels: one per garment class present).

    Args:
        site_names: one name per site.
        train_sizes: training mosaics per site (sites differ in size).
        test_size: test mosaics per site, drawn from the official test split with the site's own class mix and scanner.
        val_fraction: share of each site's training mosaics held out for validation (0: no validation).
        alpha: Dirichlet concentration of each site's class mix (small = very different prevalence per site).
        annotated_labels: the labels each site annotates (one list per site); default: ``labels_per_site``
            consecutive labels per site, rotating, so neighbouring sites overlap.
        test_fully_annotated: label every test entry (so each label's AUROC has support at every site), or mask
            test labels like training labels (what a site could really evaluate).
        contrast, brightness: per-site scanner settings; ``None`` uses built-in, different values per site;
            ``scanner_shift=False`` makes every scanner identical.
        site_cpus: CPUs each site's actor reserves (one number or one per site).
    """

    def __init__(
        self,
        data_dir: Optional[str] = None,
        site_names: Sequence[str] = ("site_a", "site_b", "site_c", "site_d"),
        train_sizes: Sequence[int] = (1200, 800, 600, 400),
        test_size: int = 400,
        val_fraction: float = 0.0,
        alpha: float = 0.5,
        annotated_labels: Optional[Sequence[Sequence[int]]] = None,
        labels_per_site: int = 6,
        test_fully_annotated: bool = True,
        scanner_shift: bool = True,
        contrast: Optional[Sequence[float]] = None,
        brightness: Optional[Sequence[float]] = None,
        batch_size: int = 32,
        seed: int = 0,
        site_cpus: Union[float, Sequence[float]] = 1.0,
    ) -> None:
        super().__init__()
        n = len(site_names)
        if len(train_sizes) != n:
            raise ValueError(f"train_sizes has {len(train_sizes)} entries for {n} sites: give one size per site")
        if min(train_sizes) < 1 or test_size < 0:
            raise ValueError(
                f"every site needs train_sizes >= 1 and test_size >= 0, got {list(train_sizes)}, {test_size}"
            )
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        num_labels = len(CLASSES)
        labels = (
            annotated_labels if annotated_labels is not None else rotating_label_sets(n, num_labels, labels_per_site)
        )
        self.annotated_labels = check_label_sets(labels, n, num_labels)
        if scanner_shift:
            contrast = (
                list(contrast)
                if contrast is not None
                else [DEFAULT_CONTRAST[k % len(DEFAULT_CONTRAST)] for k in range(n)]
            )
            brightness = (
                list(brightness)
                if brightness is not None
                else [DEFAULT_BRIGHTNESS[k % len(DEFAULT_BRIGHTNESS)] for k in range(n)]
            )
        else:
            contrast, brightness = [1.0] * n, [0.0] * n
        if len(contrast) != n or len(brightness) != n:
            raise ValueError(
                f"contrast and brightness need one value per site ({n}), got {len(contrast)} and {len(brightness)}"
            )
        self.data_dir, self.site_names = data_dir, list(site_names)
        self.train_sizes, self.test_size, self.val_fraction, self.alpha = (
            list(train_sizes),
            test_size,
            val_fraction,
            alpha,
        )
        self.test_fully_annotated, self.contrast, self.brightness = test_fully_annotated, contrast, brightness
        self.batch_size, self.seed, self.site_cpus = batch_size, seed, per_site(site_cpus, n)
        self.label_names = list(CLASSES)

    def prepare_data(self) -> None:
        fashion_mnist_root(self.data_dir)

    def class_mix(self) -> np.ndarray:
        """``[sites, 10]``: each site's tile-class probabilities (reproducible from ``seed``)."""
        rng = np.random.default_rng([self.seed, 1])
        return rng.dirichlet(np.full(len(CLASSES), self.alpha), size=len(self.site_names))

    def site_plans(self) -> dict[str, dict[str, dict[str, np.ndarray]]]:
        """Per site and split: the tile indices of every mosaic, which pool they index, and the (masked) targets."""
        _, train_y = load_fashion_mnist(self.data_dir, "train", labels_only=True)
        _, test_y = load_fashion_mnist(self.data_dir, "test", labels_only=True)
        mix = self.class_mix()
        rng = np.random.default_rng([self.seed, 2])
        train_pool = site_pool_indices(len(train_y))
        shares = {
            "train": _split_by_class(train_pool, train_y[train_pool], len(self.site_names), rng),
            "test": _split_by_class(np.arange(len(test_y)), test_y, len(self.site_names), rng),
        }
        plans = {}
        for k, name in enumerate(self.site_names):
            train_tiles, train_cls = _draw_mosaics(shares["train"][k], mix[k], self.train_sizes[k], rng)
            test_tiles, test_cls = _draw_mosaics(shares["test"][k], mix[k], self.test_size, rng)
            train_targets = mask_labels(mosaic_labels(train_cls), self.annotated_labels[k])
            test_targets = mask_labels(
                mosaic_labels(test_cls), None if self.test_fully_annotated else self.annotated_labels[k]
            )
            keep, val = split_fractions(
                np.arange(len(train_tiles)), [1 - self.val_fraction, self.val_fraction], seed=self.seed + 1 + k
            )
            plans[name] = {
                "train": {"pool": "train", "tiles": train_tiles[keep], "targets": train_targets[keep]},
                "val": {"pool": "train", "tiles": train_tiles[val], "targets": train_targets[val]},
                "test": {"pool": "test", "tiles": test_tiles, "targets": test_targets},
            }
        return plans

    def federated_sites(self) -> list[Site]:
        return [
            Site(
                name,
                MosaicSiteData(self.data_dir, plan, self.contrast[k], self.brightness[k], self.batch_size),
                num_cpus=self.site_cpus[k],
                train_size=len(plan["train"]["tiles"]),
            )
            for k, (name, plan) in enumerate(self.site_plans().items())
        ]


def _split_by_class(
    indices: np.ndarray, labels: np.ndarray, num_sites: int, rng: np.random.Generator
) -> list[dict[int, np.ndarray]]:
    # every class's images dealt out evenly: sites never share an image, whatever their class mix
    out: list[dict[int, np.ndarray]] = [{} for _ in range(num_sites)]
    for cls in np.unique(labels):
        members = rng.permutation(indices[labels == cls])
        for k, part in enumerate(np.array_split(members, num_sites)):
            out[k][int(cls)] = part
    return out


def _draw_mosaics(
    share: dict[int, np.ndarray], mix: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    classes = rng.choice(len(mix), size=(count, TILES), p=mix)
    tiles = np.empty_like(classes)
    for cls in np.unique(classes):
        where = classes == cls
        pool = share[int(cls)]
        # without replacement while the site's images of that class last
        tiles[where] = rng.choice(pool, size=int(where.sum()), replace=int(where.sum()) > len(pool))
    return tiles.astype(np.int64), classes.astype(np.int64)
