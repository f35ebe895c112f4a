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
import time

import numpy as np
import torch
from study_b_torch import SmallCNN, local_epoch, metrics, site_data  # beside this file (on the clients' PYTHONPATH too)


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
        torch.set_num_threads(max(1, int(args.cpus_per_client)))  # the client's CPUs, as lightning-fed's sites do
        torch.set_flush_denormal(True)  # denormals slow a CPU step 10-40x (lightning-fed's sites flush them too)
        site = sites[int(context.node_config["partition-id"])]
        x, y = site_data(args.split_file, site, "train")
        model = SmallCNN()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # stateless client: a fresh optimizer each round
        local_epoch(model, optimizer, x, y, args.batch_size)
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
        small[site] = metrics(p, y)
    print(json.dumps({"first_round_at": events["first_round_at"], "round_ends": events["round_ends"], "small": small}))


if __name__ == "__main__":
    main()
