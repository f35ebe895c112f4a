"""Pretrain a timm backbone on held-out FashionMNIST images and save it as a local checkpoint file.

Nothing can be downloaded on an air-gapped machine, ImageNet weights included. This makes the stand-in that the
partial-label recipe and benchmark use: supervised 10-class training on single 28×28 images from the pool that
:class:`~lightning_fed.data.mosaic.FashionMosaicSites` keeps away from every site, at a neutral "scanner".

    python -m lightning_fed.models.pretrain --backbone resnet10t --out runs/weights/resnet10t-fashion.pth

The file is a ``{"state_dict", "backbone", "in_chans", "source", ...}`` dict that
``ImageClassifier(pretrained="<file>")`` loads (the 10-class head is replaced by the task's head).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Optional

import torch
from torch.nn import functional as F

from lightning_fed.data.fashion_mnist import load_fashion_mnist
from lightning_fed.data.mosaic import pretraining_pool_indices, scanner
from lightning_fed.models.classifier import create_backbone


def pretrain_on_fashion(
    backbone: str,
    out: str | os.PathLike,
    data_dir: Optional[str] = None,
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    threads: Optional[int] = None,
) -> dict:
    """Train ``backbone`` (1 input channel, 10 classes) on the pretraining pool and write ``out`` atomically.

    Returns what was saved besides the weights (including the held-out accuracy on the official test split).
    """
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    images, labels = load_fashion_mnist(data_dir, "train")
    pool = pretraining_pool_indices(len(labels))
    x, y = scanner(images[pool], 1.0, 0.0), torch.from_numpy(labels[pool])
    model = create_backbone(backbone, 10, 1, pretrained=False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    start = time.monotonic()
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(batch_size):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    test_images, test_labels = load_fashion_mnist(data_dir, "test")
    model.eval()
    with torch.no_grad():
        xt = scanner(test_images, 1.0, 0.0)
        predictions = torch.cat([model(b).argmax(1) for b in xt.split(1000)])
    info = {
        "backbone": backbone,
        "in_chans": 1,
        "num_classes": 10,
        "source": f"FashionMNIST train images {int(pool[0])}..{int(pool[-1])} (kept from every site), 10 classes, 28x28",
        "epochs": epochs,
        "seed": seed,
        "test_accuracy": float((predictions.numpy() == test_labels).mean()),
        "seconds": round(time.monotonic() - start, 1),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save({"state_dict": model.state_dict(), **info}, tmp)
    os.replace(tmp, out)  # a half-written file never carries the real name
    return info


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--out", required=True, help="checkpoint file to write")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder with the FashionMNIST files (default: $LIGHTNING_FED_DATA/fashion_mnist)",
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    info = pretrain_on_fashion(args.backbone, args.out, args.data_dir, epochs=args.epochs, seed=args.seed)
    print(f"wrote {args.out}: {info['backbone']}, test accuracy {info['test_accuracy']:.4f}, {info['seconds']} s")


if __name__ == "__main__":
    main()
