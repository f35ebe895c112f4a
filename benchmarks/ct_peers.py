"""Study C's U-Net federation as an expert writes it without lightning-fed: the peers of ``benchmarks/ct_unet.py``.

Two arms, each a whole process that prints one JSON line (when the first round started, when each ended, and the
mean foreground Dice of the final model over the hospitals' test slices):

- ``--arm plain``: one process, torch and MONAI only, torch's threads set to the machine's CPUs, every hospital's
  slices kept as tensors and batches drawn by index from a fresh permutation each epoch (no DataLoader); one U-Net
  and one AdamW per hospital kept across rounds (lightning-fed's sites are stateful too); FedAvg by hand after every
  epoch, weighted by training slices, BatchNorm statistics included.
- ``--arm flower``: Flower's simulation engine (run it with the Flower environment's Python, with MONAI installed
  there: ``.venv-flower/bin/pip install monai==1.6.1``), ``--cpus-per-client`` CPUs per client and the client's
  torch threads set to them, data as tensors, batches by index; Flower clients are stateless, so each round builds
  a fresh U-Net and AdamW.

Both read the hospitals' slices from the ``.npz`` that ``ct_unet.py`` writes from lightning-fed's
``SimulatedCTHospitals`` (the same tensors the recipe's sites draw); the network, loss (cross-entropy + soft Dice),
optimizer, batch size and epochs are the recipe's (``recipes/ct_vendors.yaml``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# the recipe's model (recipes/ct_vendors.yaml, lightning_fed.models.SegmentationModel's defaults)
CLASSES, CHANNELS, STRIDES, DROPOUT, LR, WEIGHT_DECAY = 4, (16, 32, 64), (2, 2), 0.1, 3e-3, 1e-5


def unet() -> nn.Module:
    """SegmentationModel's network: a 2-D MONAI U-Net with BatchNorm, one residual unit per block and dropout."""
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=CLASSES,
        channels=CHANNELS,
        strides=STRIDES,
        num_res_units=1,
        dropout=DROPOUT,
        norm="batch",
    )


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)


def soft_dice_loss(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """SegmentationModel's Dice term: ``1 - mean_c (2 sum p y + eps) / (sum p + sum y + eps)`` over the classes
    present in the batch."""
    onehot = F.one_hot(labels, probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = (0, *range(2, probs.dim()))
    intersection = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    present = onehot.sum(dims) > 0
    return 1 - ((2 * intersection + eps) / (denominator + eps))[present].mean()


def hospitals(data_file: str) -> tuple[list[str], dict[str, dict[str, torch.Tensor]]]:
    """The hospitals' names and, per hospital, ``train_x`` ``[N, 1, H, W]``, ``train_y`` ``[N, H, W]``, ``test_x``,
    ``test_y`` as tensors (read once per process, as a long-lived client keeps them)."""
    data = np.load(data_file)
    names = [str(s) for s in data["hospitals"]]
    return names, {
        h: {part: torch.from_numpy(data[f"{h}/{part}"]) for part in ("train_x", "train_y", "test_x", "test_y")}
        for h in names
    }


def local_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, batch: int) -> None:
    """One epoch on a hospital's slices, batches drawn by index from a fresh permutation."""
    model.train()
    order = torch.randperm(len(x))
    for start in range(0, len(x), batch):
        idx = order[start : start + batch]
        opt.zero_grad()
        logits = model(x[idx])
        (F.cross_entropy(logits, y[idx]) + soft_dice_loss(logits.softmax(1), y[idx])).backward()
        opt.step()


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    """The sample-weighted mean of ``states``, tensor by tensor (integer counters come back in their own dtype)."""
    total = float(sum(weights))
    return {
        key: sum(s[key].double() * (w / total) for s, w in zip(states, weights)).to(states[0][key].dtype)
        for key in states[0]
    }


def mean_dice(model: nn.Module, data: dict[str, dict[str, torch.Tensor]]) -> float:
    """Mean over hospitals of the foreground Dice (mean over classes 1..C-1 of ``2|P∩Y| / (|P| + |Y|)``, counted over
    a hospital's whole test split), the recipe's ``dice``."""
    model.eval()
    scores = []
    with torch.no_grad():
        for part in data.values():
            pred = torch.cat([model(x).argmax(1) for x in part["test_x"].split(64)])
            truth = part["test_y"]
            per_class = []
            for c in range(1, CLASSES):
                p, t = pred == c, truth == c
                if int(t.sum()) or int(p.sum()):
                    per_class.append(2 * float((p & t).sum()) / float(p.sum() + t.sum()))
            scores.append(float(np.mean(per_class)))
    return float(np.mean(scores))


def plain(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as lightning-fed's sites do
    torch.manual_seed(args.seed)
    names, data = hospitals(args.data_file)
    global_model = unet()
    models = {h: unet() for h in names}
    for model in models.values():
        model.load_state_dict(global_model.state_dict())
    opts = {h: optimizer(m) for h, m in models.items()}
    sizes = [len(data[h]["train_x"]) for h in names]
    first_round_at, round_ends = time.time(), []
    for _ in range(args.epochs):
        for h in names:
            local_epoch(models[h], opts[h], data[h]["train_x"], data[h]["train_y"], args.batch_size)
        averaged = fedavg([models[h].state_dict() for h in names], sizes)
        for model in models.values():
            model.load_state_dict(averaged)
        round_ends.append(time.time())
    global_model.load_state_dict(averaged)
    return {"first_round_at": first_round_at, "round_ends": round_ends, "dice": mean_dice(global_model, data)}


def flower(args: argparse.Namespace) -> dict:
    from flower_sim import simulate_fedavg  # beside this file (on the clients' PYTHONPATH too)

    names = [str(s) for s in np.load(args.data_file)["hospitals"]]

    def train(state: dict, index: int) -> tuple[dict, int]:
        torch.set_num_threads(max(1, int(args.cpus_per_client)))  # the client's CPUs
        torch.set_flush_denormal(True)
        part = hospitals(args.data_file)[1][names[index]]
        model = unet()
        model.load_state_dict(state)
        local_epoch(model, optimizer(model), part["train_x"], part["train_y"], args.batch_size)  # stateless client
        return model.state_dict(), len(part["train_x"])

    torch.manual_seed(args.seed)
    first_round_at, round_ends, final = simulate_fedavg(
        train, unet().state_dict(), len(names), args.epochs, args.cpus_per_client
    )
    model = unet()
    model.load_state_dict(final)
    return {
        "first_round_at": first_round_at,
        "round_ends": round_ends,
        "dice": mean_dice(model, hospitals(args.data_file)[1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", choices=("plain", "flower"), required=True)
    parser.add_argument("--data-file", required=True)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="plain: torch threads")
    parser.add_argument("--cpus-per-client", type=float, default=1.0, help="flower: CPUs (and threads) per client")
    args = parser.parse_args()
    print(json.dumps(plain(args) if args.arm == "plain" else flower(args)))


if __name__ == "__main__":
    main()
