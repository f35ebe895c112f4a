"""Study B in plain PyTorch: the data, network and metrics every peer arm of ``benchmarks/hospitals.py`` shares.

Only torch and numpy (the Flower arm's environment has no lightning-fed, and the plain loop should import no more
than an expert's script would): the hospitals' images decoded once per process and kept as normalised tensors,
study B's 2-conv + FC network written out, recall/precision/exact AUROC, and FedAvg over state dicts.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ABNORMAL = (7, 8, 9)
MEAN, STD = 0.2860, 0.3530


class SmallCNN(nn.Module):
    """lightning_fed.models.SmallCNN's network (2 x conv 3x3 + ReLU + max-pool, then a linear layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(32 * 7 * 7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _read_idx(path: Path) -> np.ndarray:
    data = gzip.open(path, "rb").read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


_CACHE: dict = {}


def site_data(split_file: str, site: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One hospital's images and binary labels (cached per process, as a long-lived client would keep them)."""
    key = (site, split)
    if key not in _CACHE:
        split_data = np.load(split_file, allow_pickle=True)
        root = Path(str(split_data["data_dir"]))
        if "pool" not in _CACHE:
            images = np.concatenate(
                [_read_idx(root / "train-images-idx3-ubyte.gz"), _read_idx(root / "t10k-images-idx3-ubyte.gz")]
            )
            labels = np.concatenate(
                [_read_idx(root / "train-labels-idx1-ubyte.gz"), _read_idx(root / "t10k-labels-idx1-ubyte.gz")]
            )
            _CACHE["pool"] = (images, np.isin(labels, ABNORMAL).astype(np.int64))
        images, labels = _CACHE["pool"]
        idx = split_data[f"{site}/{split}"]
        x = (torch.from_numpy(images[idx].astype(np.float32) / 255.0) - MEAN) / STD
        _CACHE[key] = (x.unsqueeze(1), torch.from_numpy(labels[idx]))
    return _CACHE[key]


def metrics(p: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Recall, precision and (exact) AUROC of binary scores, without torchmetrics (not in this environment)."""
    pred = (p >= 0.5).long()
    tp, fp, fn = (
        int(((pred == 1) & (y == 1)).sum()),
        int(((pred == 1) & (y == 0)).sum()),
        int(((pred == 0) & (y == 1)).sum()),
    )
    order = torch.argsort(p)
    ranks = torch.empty_like(p)
    ranks[order] = torch.arange(1, len(p) + 1, dtype=p.dtype)
    pos = int(y.sum())
    neg = len(y) - pos
    auroc = float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg)) if pos and neg else float("nan")
    return {
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "auroc": auroc,
    }


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    """The sample-weighted mean of ``states`` (FedAvg's update rule), tensor by tensor."""
    total = float(sum(weights))
    return {key: sum(s[key] * (w / total) for s, w in zip(states, weights)) for key in states[0]}


def local_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> None:
    """One epoch on a hospital's tensors, batches drawn by index from a fresh permutation (no DataLoader)."""
    model.train()
    order = torch.randperm(len(x))
    for start in range(0, len(x), batch_size):
        batch = order[start : start + batch_size]
        optimizer.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
