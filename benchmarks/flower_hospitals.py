"""Study B's federation on Flower's simulation engine: the Flower arm of ``benchmarks/hospitals.py``.

Runs in its own environment (Flower pins a Ray version that differs from lightning-fed's)::

    python -m venv .venv-flower && .venv-flower/bin/pip install torch==2.14.1 torchvision==0.29.1 "flwr[simulation]==1.41.0"

Same data (the hospitals' index split, written by ``hospitals.py``), the same model (study B's 2-conv + FC CNN,
written out in ``study_b_torch.py`` because lightning-fed is not installed in this environment), Adam, batch size
and epochs, FedAvg weighted by training samples, every client every round, 2 CPUs per client. Written as an expert
would: each client sets its torch threads to its CPUs, keeps its hospital's images as decoded tensors for the whole
run and draws batches by index (no DataLoader). Flower clients are stateless: each round builds a fresh model and
optimizer. Prints one JSON line: when the first round started, when each ended,
and the small hospitals' test metrics of the final model.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from flower_sim import simulate_fedavg  # beside this file (on the clients' PYTHONPATH too)
from study_b_torch import SmallCNN, local_epoch, metrics, site_data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--split-file", required=True)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpus-per-client", type=float, default=2.0)
    args = parser.parse_args()
    sites = [str(s) for s in np.load(args.split_file, allow_pickle=True)["sites"]]

    def train(state: dict, index: int) -> tuple[dict, int]:
        torch.set_num_threads(max(1, int(args.cpus_per_client)))  # the client's CPUs, as lightning-fed's sites do
        torch.set_flush_denormal(True)  # denormals slow a CPU step 10-40x (lightning-fed's sites flush them too)
        x, y = site_data(args.split_file, sites[index], "train")
        model = SmallCNN()
        model.load_state_dict(state)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # stateless client: a fresh optimizer each round
        local_epoch(model, optimizer, x, y, args.batch_size)
        return model.state_dict(), len(x)

    torch.manual_seed(args.seed)
    first_round_at, round_ends, final = simulate_fedavg(
        train, SmallCNN().state_dict(), len(sites), args.epochs, args.cpus_per_client
    )
    model = SmallCNN()
    model.load_state_dict(final)
    model.eval()
    small = {}
    for site in sites[1:]:
        x, y = site_data(args.split_file, site, "test")
        with torch.no_grad():
            p = model(x).softmax(-1)[:, 1]
        small[site] = metrics(p, y)
    print(json.dumps({"first_round_at": first_round_at, "round_ends": round_ends, "small": small}))


if __name__ == "__main__":
    main()
