"""Study B's federation on Flower's simulation engine: the Flower arm of ``benchmarks/hospitals.py``.

Runs in its own environment (Flower pins a Ray version that differs from lightning-fed's)::

    python -m venv .venv-flower && .venv-flower/bin/pip install torch==2.14.1 torchvision==0.29.1 "flwr[simulation]==1.41.0"

Same data (the hospitals' index split, written by ``hospitals.py``), the same model (study B's 2-conv + FC CNN,
written out here because lightning-fed is not installed in this environment), Adam, batch size and epochs, FedAvg
weighted by training samples, every client every round, 2 CPUs per client. Flower clients are stateless: each
round builds a fresh model and optimizer. Prints one JSON line: when the first round started, when each ended,
and the small hospitals' test metrics of the final model.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
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


def main() -> None:
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    parser = argparse.ArgumentParser()
    parser.add_argument("--split-file", required=True)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpus-per-client", type=float, default=2.0)
    args = parser.parse_args()
    sites = [str(s) for s in np.load(args.split_file, allow_pickle=True)["sites"]]
    events: dict = {"round_ends": []}

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        site = sites[int(context.node_config["partition-id"])]
        x, y = site_data(args.split_file, site, "train")
        model = SmallCNN()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # stateless client: a fresh optimizer each round
        model.train()
        order = torch.randperm(len(x))
        for start in range(0, len(x), args.batch_size):
            batch = order[start : start + args.batch_size]
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
        content = RecordDict(
            {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": len(x)})}
        )
        return Message(content=content, reply_to=msg)

    server = ServerApp()

    @server.main()
    def run(grid: Grid, context: Context) -> None:
        torch.manual_seed(args.seed)
        model = SmallCNN()
        strategy = FedAvg(
            fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=len(sites), min_available_nodes=len(sites)
        )

        def round_end(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            if server_round > 0:  # round 0 is the initial model
                events["round_ends"].append(time.time())
            events["final"] = arrays
            return MetricRecord({})

        events["first_round_at"] = time.time()
        strategy.start(
            grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=args.epochs, evaluate_fn=round_end
        )

    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=len(sites),
        backend_config={"client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": 0.0}},
    )
    model = SmallCNN()
    model.load_state_dict(events["final"].to_torch_state_dict())
    model.eval()
    small = {}
    for site in sites[1:]:
        x, y = site_data(args.split_file, site, "test")
        with torch.no_grad():
            p = model(x).softmax(-1)[:, 1]
        small[site] = _metrics(p, y)
    print(json.dumps({"first_round_at": events["first_round_at"], "round_ends": events["round_ends"], "small": small}))


def _metrics(p: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
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


if __name__ == "__main__":
    main()
