"""What the benchmarks' Flower arms share: sample-weighted FedAvg over every client, every round, on Flower's
simulation engine (``flower_hospitals.py``, ``ct_peers.py --arm flower``).

Runs in the Flower environment, which has no lightning-fed; this folder must be on the clients' ``PYTHONPATH`` (the
benchmarks that launch the arms put it there).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

State = dict[str, torch.Tensor]
# a client's round: the global state and the client's index in, its trained state and training examples out
ClientTrain = Callable[[State, int], tuple[State, int]]


def simulate_fedavg(
    train: ClientTrain, initial: State, clients: int, rounds: int, cpus_per_client: float
) -> tuple[float, list[float], State]:
    """Run ``rounds`` rounds of FedAvg from ``initial`` with every one of ``clients`` clients training each round
    (``train``), each client given ``cpus_per_client`` CPUs. Returns when the first round started, when each round
    ended (both ``time.time()``) and the final global state."""
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    events: dict = {"round_ends": []}
    client = ClientApp()

    @client.train()
    def client_round(msg: Message, context: Context) -> Message:
        state, examples = train(msg.content["arrays"].to_torch_state_dict(), int(context.node_config["partition-id"]))
        content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": examples})})
        return Message(content=content, reply_to=msg)

    server = ServerApp()

    @server.main()
    def run(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients, min_available_nodes=clients
        )

        def round_end(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            if server_round > 0:  # round 0 is the initial model
                events["round_ends"].append(time.time())
            events["final"] = arrays
            return MetricRecord({})

        events["first_round_at"] = time.time()
        strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=rounds, evaluate_fn=round_end)

    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=clients,
        backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}},
    )
    return events["first_round_at"], events["round_ends"], events["final"].to_torch_state_dict()
