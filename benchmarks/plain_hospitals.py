"""Study B's federation as an expert writes it in plain PyTorch: the floor of ``benchmarks/hospitals.py``.

One process that imports torch and numpy only; torch's threads set to the machine's CPUs (what lightning-fed's one
packed worker gets here); each hospital's images decoded once and kept as normalised tensors; batches drawn by
index from a fresh permutation each epoch (no DataLoader, no collate); one model and one Adam optimizer per hospital
kept across rounds (lightning-fed's sites are stateful too); FedAvg by hand after every epoch, weighted by training
samples. Same data (the hospitals' index split written by ``hospitals.py``), network, optimizer, batch size and
epochs as every other arm. Prints one JSON line: when the first round started, when each ended, and the small
hospitals' test metrics of the final model.

    python benchmarks/plain_hospitals.py --split-file split.npz --epochs 10
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from study_b_torch import SmallCNN, fedavg, local_epoch, metrics, site_data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--split-file", required=True)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormals slow a CPU step 10-40x (lightning-fed's sites flush them too)
    torch.manual_seed(args.seed)
    sites = [str(s) for s in np.load(args.split_file, allow_pickle=True)["sites"]]
    train = {s: site_data(args.split_file, s, "train") for s in sites}
    global_model = SmallCNN()
    models = {s: SmallCNN() for s in sites}
    for model in models.values():
        model.load_state_dict(global_model.state_dict())
    optimizers = {s: torch.optim.Adam(m.parameters(), lr=1e-3) for s, m in models.items()}
    first_round_at, round_ends = time.time(), []
    for _ in range(args.epochs):
        for site in sites:
            local_epoch(models[site], optimizers[site], *train[site], args.batch_size)
        averaged = fedavg([models[s].state_dict() for s in sites], [len(train[s][0]) for s in sites])
        for model in models.values():
            model.load_state_dict(averaged)
        round_ends.append(time.time())
    global_model.load_state_dict(averaged)
    global_model.eval()
    small = {}
    for site in sites[1:]:
        x, y = site_data(args.split_file, site, "test")
        with torch.no_grad():
            small[site] = metrics(global_model(x).softmax(-1)[:, 1], y)
    print(json.dumps({"first_round_at": first_round_at, "round_ends": round_ends, "small": small}))


if __name__ == "__main__":
    main()
