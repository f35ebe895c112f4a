"""MedMNIST v2 (28×28) from the official ``.npz`` files, split into federated sites.

Files are read from ``data_dir`` / ``$LIGHTNING_FED_DATA/medmnist`` / ``~/.cache/lightning_fed/medmnist`` and
downloaded from the official Zenodo record when missing, always checked against the MD5 of MedMNIST's ``info.py``
(v2.1.0). Cite MedMNIST v2 (Yang et al., Scientific Data 2023) and each source dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.nn import functional as F

from lightning_fed.data.download import data_root, ensure_files
from lightning_fed.data.partial_labels import check_label_sets, mask_labels, rotating_label_sets
from lightning_fed.data.partition import IID, Dirichlet
from lightning_fed.data.sites import Site, SiteSplits, per_site
from lightning_fed.data.tensors import TensorBatches

MIRRORS = ("https://zenodo.org/record/6496656/files/",)
CHEST_LABELS = (
    "atelectasis",
    "cardiomegaly",
    "effusion",
    "infiltration",
    "mass",
    "nodule",
    "pneumonia",
    "pneumothorax",
    "consolidation",
    "edema",
    "emphysema",
    "fibrosis",
    "pleural",
    "hernia",
)


@dataclass(frozen=True)
class MedMNISTInfo:
    md5: str
    task: str  # "binary" | "multiclass" | "multilabel" (ordinal regression is treated as multiclass)
    channels: int
    num_classes: int
    label_names: Optional[tuple[str, ...]] = None


INFO = {
    "pathmnist": MedMNISTInfo("a8b06965200029087d5bd730944a56c1", "multiclass", 3, 9),
    "chestmnist": MedMNISTInfo("02c8a6516a18b556561a56cbdd36c4a8", "multilabel", 1, 14, CHEST_LABELS),
    "dermamnist": MedMNISTInfo("0744692d530f8e62ec473284d019b0c7", "multiclass", 3, 7),
    "octmnist": MedMNISTInfo("c68d92d5b585d8d81f7112f81e2d0842", "multiclass", 1, 4),
    "pneumoniamnist": MedMNISTInfo("28209eda62fecd6e6a2d98b1501bb15f", "binary", 1, 2, ("normal", "pneumonia")),
    "retinamnist": MedMNISTInfo("bd4c0672f1bba3e3a89f0e4e876791e4", "multiclass", 3, 5, ("0", "1", "2", "3", "4")),
    "breastmnist": MedMNISTInfo("750601b1f35ba3300ea97c75c52ff8f6", "binary", 1, 2, ("malignant", "normal, benign")),
    "bloodmnist": MedMNISTInfo("7053d0359d879ad8a5505303e11de1dc", "multiclass", 3, 8),
    "tissuemnist": MedMNISTInfo("ebe78ee8b05294063de985d821c1c34b", "multiclass", 1, 8),
    "organamnist": MedMNISTInfo("866b832ed4eeba67bfb9edee1d5544e6", "multiclass", 1, 11),
    "organcmnist": MedMNISTInfo("0afa5834fb105f7705a7d93372119a21", "multiclass", 1, 11),
    "organsmnist": MedMNISTInfo("e5c39f1af030238290b9557d9503af9d", "multiclass", 1, 11),
}


def medmnist_info(name: str) -> MedMNISTInfo:
    if name not in INFO:
        raise ValueError(f"unknown MedMNIST dataset {name!r}: pick one of {sorted(INFO)}")
    return INFO[name]


def load_medmnist(name: str, data_dir: Optional[str] = None, download: bool = True) -> dict[str, np.ndarray]:
    """``{"train_images", "train_labels", "val_images", ...}`` of one MedMNIST file, MD5-checked."""
    info = medmnist_info(name)
    root = ensure_files(data_root(data_dir, "medmnist"), {f"{name}.npz": info.md5}, MIRRORS, name, download=download)
    with np.load(root / f"{name}.npz", allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def to_tensors(images: np.ndarray, labels: np.ndarray, task: str, image_size: int = 28) -> TensorBatches:
    """uint8 ``[N, H, W(, C)]`` → float ``[N, C, image_size, image_size]`` in [-1, 1]; labels as the task needs."""
    x = torch.from_numpy(images).to(torch.float32).div_(127.5).sub_(1.0)  # numpy's float32 x / 127.5 - 1, in place
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    y = torch.from_numpy(labels.astype(np.int64))
    return TensorBatches(x, y if task == "multilabel" else y.reshape(-1))


def remap_labels(labels: np.ndarray, label_map: Sequence[Optional[int]]) -> np.ndarray:
    """Class ``c`` becomes ``label_map[c]``; samples of classes mapped to ``None`` must have been dropped already."""
    table = np.array([-1 if v is None else int(v) for v in label_map], dtype=np.int64)
    out = table[labels.reshape(-1).astype(np.int64)]
    if (out < 0).any():
        raise ValueError("labels mapped to None reached a site: drop those samples when splitting")
    return out.reshape(labels.shape)


class MedMNISTSiteData(SiteSplits):
    """One site's share of a MedMNIST file, read inside the site's actor."""

    def __init__(
        self,
        dataset: str,
        data_dir: Optional[str],
        indices: dict[str, np.ndarray],
        annotated: Optional[list[int]],
        batch_size: int,
        image_size: int = 28,
        eval_batch_size: int = 512,
        label_map: Optional[Sequence[Optional[int]]] = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size)
        self.dataset, self.data_dir, self.indices, self.annotated, self.image_size = (
            dataset,
            data_dir,
            indices,
            annotated,
            image_size,
        )
        self.label_map = label_map

    def prepare_data(self) -> None:
        load_medmnist(self.dataset, self.data_dir)

    def setup(self, stage: str) -> None:
        if self.datasets:
            return
        info, arrays = medmnist_info(self.dataset), load_medmnist(self.dataset, self.data_dir)
        for split, idx in self.indices.items():
            labels = arrays[f"{split}_labels"][idx]
            if self.label_map is not None:
                labels = remap_labels(labels, self.label_map)
            if info.task == "multilabel" and split == "train":
                labels = mask_labels(labels, self.annotated)  # this site annotates only its own findings
            self.datasets[split] = to_tensors(arrays[f"{split}_images"][idx], labels, info.task, self.image_size)


class MedMNISTSites(LightningDataModule):
    """A MedMNIST dataset split across federated sites; each site reads its share inside its own actor.

    The official train, val and test splits are each dealt out to the sites with the same rule: IID (``alpha``
    ``None``) or Dirichlet(``alpha``) label skew (for multi-label data, skew on the first finding, "no finding"
    counting as a class). ``train_fraction`` keeps only part of each site's training share (smaller sites).

    ``label_map`` regroups a single-label dataset's classes: class ``c`` becomes ``label_map[c]``; ``None`` drops its
    samples (study A on RetinaMNIST: ``[0, null, null, 1, 1]`` = "No DR" vs "Severe + Proliferative DR"; give
    ``label_names`` for the new classes). ``site_shares`` deals IID shares in a ratio (``[4, 6]``) instead of equal.

    Partial labels (multi-label datasets): site ``k`` annotates ``annotated_labels[k]`` (default: ``labels_per_site``
    consecutive findings, rotating; ``None`` for all); other training entries become ``-1``. Validation and test
    labels stay complete, so every finding's AUROC can be measured at every site.
    """

    def __init__(
        self,
        dataset: str = "chestmnist",
        data_dir: Optional[str] = None,
        site_names: Sequence[str] = ("site_a", "site_b", "site_c", "site_d"),
        alpha: Optional[float] = None,
        train_fraction: Union[float, Sequence[float]] = 1.0,
        annotated_labels: Optional[Sequence[Sequence[int]]] = None,
        labels_per_site: Optional[int] = None,
        image_size: int = 28,
        batch_size: int = 64,
        seed: int = 0,
        site_cpus: Union[float, Sequence[float]] = 1.0,
        label_map: Optional[Sequence[Optional[int]]] = None,
        label_names: Optional[Sequence[str]] = None,
        site_shares: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__()
        self.info = medmnist_info(dataset)
        n = len(site_names)
        if label_map is not None:
            if self.info.task == "multilabel":
                raise ValueError(f"{dataset} is multi-label: label_map regroups the classes of a single-label dataset")
            if len(label_map) != self.info.num_classes:
                raise ValueError(
                    f"label_map needs one entry per {dataset} class ({self.info.num_classes}), got {len(label_map)}"
                )
            kept = sorted({int(v) for v in label_map if v is not None})
            if kept != list(range(len(kept))) or len(kept) < 2:
                raise ValueError(f"label_map must map classes onto 0..K-1 (K >= 2) or null, got {list(label_map)}")
        if site_shares is not None and alpha is not None:
            raise ValueError(
                "site_shares (IID shares in a ratio) and alpha (Dirichlet label skew) exclude each other: give one"
            )
        self.label_map = list(label_map) if label_map is not None else None
        self.site_shares = list(site_shares) if site_shares is not None else None
        fractions = (
            [float(train_fraction)] * n
            if isinstance(train_fraction, (int, float))
            else [float(f) for f in train_fraction]
        )
        if len(fractions) != n or not all(0 < f <= 1 for f in fractions):
            raise ValueError(f"train_fraction needs one value in (0, 1] (or one per site), got {train_fraction}")
        if self.info.task == "multilabel" and (annotated_labels is not None or labels_per_site is not None):
            sets = (
                annotated_labels
                if annotated_labels is not None
                else rotating_label_sets(n, self.info.num_classes, labels_per_site)
            )
            self.annotated_labels: list[Optional[list[int]]] = list(check_label_sets(sets, n, self.info.num_classes))
        elif annotated_labels is not None or labels_per_site is not None:
            raise ValueError(
                f"{dataset} is a {self.info.task} dataset: partial labels (annotated_labels, labels_per_site) need a multi-label one"
            )
        else:
            self.annotated_labels = [None] * n
        self.dataset, self.data_dir, self.site_names, self.alpha = dataset, data_dir, list(site_names), alpha
        self.fractions, self.image_size, self.batch_size, self.seed = fractions, image_size, batch_size, seed
        self.site_cpus = per_site(site_cpus, n)
        classes = len({v for v in label_map if v is not None}) if label_map is not None else self.info.num_classes
        if label_names is not None:
            if len(label_names) != classes:
                raise ValueError(f"label_names has {len(label_names)} names for {classes} classes")
            self.label_names = list(label_names)
        elif label_map is None and self.info.label_names:
            self.label_names = list(self.info.label_names)
        else:
            self.label_names = [str(i) for i in range(classes)]

    def prepare_data(self) -> None:
        load_medmnist(self.dataset, self.data_dir)

    def _skew_key(self, labels: np.ndarray) -> np.ndarray:
        if self.info.task != "multilabel":
            return labels.reshape(-1)
        return np.where(labels.any(1), labels.argmax(1), labels.shape[1])

    def site_indices(self) -> dict[str, dict[str, np.ndarray]]:
        arrays = load_medmnist(self.dataset, self.data_dir)
        n = len(self.site_names)
        out: dict[str, dict[str, np.ndarray]] = {name: {} for name in self.site_names}
        for s, split in enumerate(("train", "val", "test")):
            key = self._skew_key(arrays[f"{split}_labels"])
            kept = np.arange(len(key))
            if self.label_map is not None:  # samples of dropped classes never reach a site
                kept = kept[np.array([self.label_map[c] is not None for c in key], dtype=bool)]
            rule = (
                IID(seed=self.seed + s, shares=self.site_shares)
                if self.alpha is None
                else Dirichlet(self.alpha, seed=self.seed + s)
            )
            for k, (name, part) in enumerate(zip(self.site_names, rule(key[kept], n))):
                idx = kept[part]
                if split == "train" and self.fractions[k] < 1:
                    keep = max(1, int(round(len(idx) * self.fractions[k])))
                    idx = np.sort(np.random.default_rng([self.seed, k]).permutation(idx)[:keep])
                out[name][split] = idx
        return out

    def federated_sites(self) -> list[Site]:
        return [
            Site(
                name,
                MedMNISTSiteData(
                    self.dataset,
                    self.data_dir,
                    idx,
                    self.annotated_labels[k],
                    self.batch_size,
                    self.image_size,
                    label_map=self.label_map,
                ),
                num_cpus=self.site_cpus[k],
                train_size=len(idx["train"]),
            )
            for k, (name, idx) in enumerate(self.site_indices().items())
        ]
