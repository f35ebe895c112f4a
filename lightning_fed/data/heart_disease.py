"""UCI Heart Disease: four real hospitals, a natural federated split (as FLamby's Fed-Heart-Disease).

Each hospital's file is read inside its own actor: Cleveland Clinic (303 patients), Hungarian Institute of
Cardiology (294), University Hospital Zurich/Basel (123), V.A. Long Beach (200). 13 clinical attributes; the
target is heart disease present (``num > 0``). Missing values (``?``) are filled with the hospital's own
training means and features standardised with the hospital's own training statistics: nothing is pooled.
Cite Janosi, Steinbrunn, Pfisterer and Detrano (UCI, 1988; CC BY 4.0).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from lightning.pytorch import LightningDataModule

from lightning_fed.data.download import data_root, ensure_files
from lightning_fed.data.partition import split_fractions, train_val_test
from lightning_fed.data.sites import Site, SiteSplits, chosen_sites, per_site
from lightning_fed.data.tensors import TensorBatches

HOSPITALS = {
    "cleveland": ("processed.cleveland.data", "2d91a8ff69cfd9616aa47b59d6f843db"),
    "hungary": ("processed.hungarian.data", "22e96bee155b5973568101c93b3705f6"),
    "switzerland": ("processed.switzerland.data", "9a87f7577310b3917730d06ba9349e20"),
    "va": ("processed.va.data", "4249d03ca7711e84f4444768c9426170"),
}
MIRRORS = ("https://archive.ics.uci.edu/ml/machine-learning-databases/heart-disease/",)
FEATURES = (
    "age",
    "sex",
    "cp",
    "trestbps",
    "chol",
    "fbs",
    "restecg",
    "thalach",
    "exang",
    "oldpeak",
    "slope",
    "ca",
    "thal",
)


def load_heart_disease(
    hospital: str, data_dir: Optional[str] = None, download: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """``(features float64 [N, 13] with NaN for missing, target int64 [N] in {0, 1})`` of one hospital, MD5-checked."""
    if hospital not in HOSPITALS:
        raise ValueError(f"unknown hospital {hospital!r}: pick from {sorted(HOSPITALS)}")
    name, md5 = HOSPITALS[hospital]
    root = ensure_files(
        data_root(data_dir, "heart_disease"), {name: md5}, MIRRORS, f"UCI heart disease ({hospital})", download=download
    )
    rows = [line.split(",") for line in (root / name).read_text().splitlines() if line.strip()]
    values = np.array([[np.nan if v.strip() == "?" else float(v) for v in row] for row in rows], dtype=np.float64)
    return values[:, :13], (values[:, 13] > 0).astype(np.int64)


class HeartDiseaseSiteData(SiteSplits):
    """One hospital's patients, read from its own file; imputation and scaling from its own training split."""

    def __init__(self, hospital: str, data_dir: Optional[str], indices: dict[str, np.ndarray], batch_size: int) -> None:
        super().__init__(batch_size, eval_batch_size=1024)
        self.hospital, self.data_dir, self.indices = hospital, data_dir, indices

    def prepare_data(self) -> None:
        load_heart_disease(self.hospital, self.data_dir)

    def setup(self, stage: str) -> None:
        if self.datasets:
            return
        x, y = load_heart_disease(self.hospital, self.data_dir)
        train = x[self.indices["train"]]
        mean = np.nanmean(train, axis=0)
        mean = np.where(np.isnan(mean), 0.0, mean)  # a feature this hospital never records (Zurich: cholesterol 0)
        filled = np.where(np.isnan(x), mean, x)
        std = filled[self.indices["train"]].std(axis=0)
        scaled = (filled - filled[self.indices["train"]].mean(axis=0)) / np.where(std > 0, std, 1.0)
        for split, idx in self.indices.items():
            self.datasets[split] = TensorBatches(
                torch.from_numpy(scaled[idx].astype(np.float32)), torch.from_numpy(y[idx])
            )


class HeartDiseaseSites(LightningDataModule):
    """The four UCI heart-disease hospitals as federated sites, each split train/val/test with its own seed."""

    def __init__(
        self,
        data_dir: Optional[str] = None,
        hospitals: Sequence[str] = ("cleveland", "hungary", "switzerland", "va"),
        test_fraction: float = 0.3,
        val_fraction: float = 0.0,
        batch_size: int = 32,
        seed: int = 0,
        site_cpus: Union[float, Sequence[float]] = 1.0,
    ) -> None:
        super().__init__()
        hospitals = chosen_sites(hospitals, list(HOSPITALS))
        train_val_test(test_fraction, val_fraction)
        self.data_dir, self.hospitals = data_dir, list(hospitals)
        self.test_fraction, self.val_fraction, self.batch_size, self.seed = (
            test_fraction,
            val_fraction,
            batch_size,
            seed,
        )
        self.site_cpus = per_site(site_cpus, len(self.hospitals))

    def prepare_data(self) -> None:
        for hospital in self.hospitals:
            load_heart_disease(hospital, self.data_dir)

    def site_indices(self) -> dict[str, dict[str, np.ndarray]]:
        out = {}
        fractions = train_val_test(self.test_fraction, self.val_fraction)
        for k, hospital in enumerate(self.hospitals):
            _, y = load_heart_disease(hospital, self.data_dir)
            train, val, test = split_fractions(np.arange(len(y)), fractions, seed=self.seed + 1 + k)
            out[hospital] = {"train": train, "val": val, "test": test}
        return out

    def federated_sites(self) -> list[Site]:
        return [
            Site(
                h,
                HeartDiseaseSiteData(h, self.data_dir, idx, self.batch_size),
                num_cpus=c,
                train_size=len(idx["train"]),
            )
            for (h, idx), c in zip(self.site_indices().items(), self.site_cpus)
        ]
