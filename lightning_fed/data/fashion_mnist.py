"""FashionMNIST from the four official idx files, and study B's hospitals built from it."""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lightning_fed.data.download import data_root, ensure_files
from lightning_fed.data.partition import SizeAndRatio, split_fractions, train_val_test
from lightning_fed.data.sites import Site, SiteSplits, per_site
from lightning_fed.data.tensors import TensorBatches, collate

FILES = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://ossci-datasets.s3.amazonaws.com/fashion-mnist/",
)
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
ABNORMAL_CLASSES = (7, 8, 9)  # study B: Sneaker, Bag, Ankle boot = "abnormal"
MEAN, STD = 0.2860, 0.3530


def _read_idx(path: Path) -> np.ndarray:
    """An idx file's array (read-only). Sites sharing a worker read the same files: decoded once per process."""
    stat = path.stat()
    return _decode_idx(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _decode_idx(path: str, mtime_ns: int, size: int) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_root(data_dir: Optional[str | os.PathLike] = None, download: bool = True) -> Path:
    return ensure_files(data_root(data_dir, "fashion_mnist"), FILES, MIRRORS, "FashionMNIST", download=download)


def load_fashion_mnist(
    data_dir: Optional[str | os.PathLike] = None, split: str = "train", labels_only: bool = False, download: bool = True
) -> tuple[Optional[np.ndarray], np.ndarray]:
    """``(images uint8 [N, 28, 28], labels int64 [N])`` of the ``"train"`` (60k) or ``"test"`` (10k) split."""
    prefix = {"train": "train", "test": "t10k"}[split]
    root = fashion_mnist_root(data_dir, download)
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    images = None if labels_only else _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    return images, labels


def take_pooled(parts: Sequence[np.ndarray], idx: np.ndarray) -> np.ndarray:
    """``np.concatenate(parts)[idx]`` without joining the parts: each row is gathered from the part that holds it.
    Joining the official train and test images (70,000 of them, 55 MB) for every hospital set up cost a copy and its
    page faults each time, several seconds over a sweep."""
    idx = np.asarray(idx)
    total = sum(len(part) for part in parts)
    if idx.size and (idx.min() < 0 or idx.max() >= total):
        raise IndexError(f"pooled index out of range: {int(idx.min())}..{int(idx.max())} for {total} rows")
    out = np.empty((len(idx), *parts[0].shape[1:]), dtype=parts[0].dtype)
    start = 0
    for part in parts:
        inside = (idx >= start) & (idx < start + len(part))
        out[inside] = part[idx[inside] - start]
        start += len(part)
    return out


def to_tensor_dataset(images: np.ndarray, labels: np.ndarray) -> TensorBatches:
    # the same float32 operations as numpy's (x / 255 - MEAN) / STD, bit for bit, but in place on the worker's
    # threads: 0.05 s instead of 0.5 s for study B's five hospitals in a fresh worker, on its way to round 1
    x = torch.from_numpy(images).to(torch.float32).div_(255.0).sub_(MEAN).div_(STD)
    return TensorBatches(x.unsqueeze(1), torch.from_numpy(labels))


class FashionMNISTDataModule(LightningDataModule):
    """Plain (non-federated) FashionMNIST: the official train split for training, test split for val and test.

    Use it to run an unmodified script through the simulation path, or as a centralised baseline.
    """

    def __init__(
        self, data_dir: Optional[str] = None, batch_size: int = 64, binary: bool = False, num_workers: int = 0
    ) -> None:
        super().__init__()
        self.data_dir, self.batch_size, self.binary, self.num_workers = data_dir, batch_size, binary, num_workers
        self.train_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None

    def prepare_data(self) -> None:
        fashion_mnist_root(self.data_dir)

    def setup(self, stage: str) -> None:
        for split in ("train", "test"):
            images, labels = load_fashion_mnist(self.data_dir, split)
            if self.binary:
                labels = np.isin(labels, ABNORMAL_CLASSES).astype(np.int64)
            setattr(self, f"{split}_set", to_tensor_dataset(images, labels))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers, collate_fn=collate
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256, num_workers=self.num_workers, collate_fn=collate)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256, num_workers=self.num_workers, collate_fn=collate)


class PooledIndexData(SiteSplits):
    """One hospital's data: its train/val/test indices into the pooled 70,000 FashionMNIST images.

    Built inside the hospital's actor: the images are read from the hospital's own copy of the files.
    """

    def __init__(
        self, data_dir: Optional[str], indices: dict[str, np.ndarray], batch_size: int, eval_batch_size: int = 512
    ) -> None:
        super().__init__(batch_size, eval_batch_size)
        self.data_dir, self.indices = data_dir, indices

    def prepare_data(self) -> None:
        fashion_mnist_root(self.data_dir)

    def setup(self, stage: str) -> None:
        if self.datasets:
            return
        train_x, train_y = load_fashion_mnist(self.data_dir, "train")
        test_x, test_y = load_fashion_mnist(self.data_dir, "test")
        labels = np.isin(np.concatenate([train_y, test_y]), ABNORMAL_CLASSES).astype(np.int64)
        for split, idx in self.indices.items():
            self.datasets[split] = to_tensor_dataset(take_pooled((train_x, test_x), idx), labels[idx])


class HospitalsDataModule(LightningDataModule):
    """Study B's five hospitals on FashionMNIST relabelled binary (Sneaker, Bag, Ankle boot = 1).

    The 70,000 official images form one pool; each hospital draws its own images without replacement
    (``sizes`` with ``positive_ratios`` abnormal) and splits them ``train/val/test``. Only labels are read on the
    driver to draw the split; each hospital's actor loads its own images. ``site_cpus`` (one number, or one per
    hospital) is what each hospital's actor reserves and the number of threads its training uses.
    """

    def __init__(
        self,
        data_dir: Optional[str] = None,
        site_names: Sequence[str] = ("large", "small_1", "small_2", "small_3", "small_4"),
        sizes: Sequence[int] = (30000, 3000, 3000, 3000, 3000),
        positive_ratios: Sequence[float] = (0.5, 0.1, 0.1, 0.1, 0.1),
        test_fraction: float = 0.2,
        val_fraction: float = 0.0,
        batch_size: int = 64,
        seed: int = 0,
        site_cpus: Union[float, Sequence[float]] = 1.0,
    ) -> None:
        super().__init__()
        if not (len(site_names) == len(sizes) == len(positive_ratios)):
            raise ValueError(
                f"site_names, sizes and positive_ratios must have the same length, got {len(site_names)}, {len(sizes)}, {len(positive_ratios)}"
            )
        train_val_test(test_fraction, val_fraction)
        self.data_dir, self.site_names = data_dir, list(site_names)
        self.partitioner = SizeAndRatio(sizes=list(sizes), positive_ratios=list(positive_ratios), seed=seed)
        self.test_fraction, self.val_fraction = test_fraction, val_fraction
        self.batch_size, self.seed, self.site_cpus = batch_size, seed, per_site(site_cpus, len(site_names))

    def prepare_data(self) -> None:
        fashion_mnist_root(self.data_dir)

    def site_indices(self) -> dict[str, dict[str, np.ndarray]]:
        """Each hospital's ``train``/``val``/``test`` indices into the pooled 70,000 images (reproducible)."""
        _, train_y = load_fashion_mnist(self.data_dir, "train", labels_only=True)
        _, test_y = load_fashion_mnist(self.data_dir, "test", labels_only=True)
        binary = np.isin(np.concatenate([train_y, test_y]), ABNORMAL_CLASSES).astype(np.int64)
        out = {}
        fractions = train_val_test(self.test_fraction, self.val_fraction)
        for k, (name, idx) in enumerate(zip(self.site_names, self.partitioner(binary))):
            train, val, test = split_fractions(idx, fractions, seed=self.seed + 1 + k)
            out[name] = {"train": train, "val": val, "test": test}
        return out

    def federated_sites(self) -> list[Site]:
        return [
            Site(
                name, PooledIndexData(self.data_dir, idx, self.batch_size), num_cpus=cpus, train_size=len(idx["train"])
            )
            for (name, idx), cpus in zip(self.site_indices().items(), self.site_cpus)
        ]
