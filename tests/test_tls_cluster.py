"""Encrypted, authenticated Ray links: a two-node Ray cluster on loopback with mutual TLS (a certificate per node from
the federation's own CA) and token authentication, a federation submitted to it with ``ray job submit`` whose two
hospitals run on different nodes, and a submission without the token refused."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from lightning_fed.tls import ray_tls_env, write_certificates

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))

DRIVER = '''
import json, sys
import lightning as L, torch
from torch.utils.data import DataLoader
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from lightning_fed import FederatedStrategy
from lightning_fed.data import Site

class Random(L.LightningDataModule):
    def __init__(self, seed):
        super().__init__()
        self.seed = seed
    def setup(self, stage):
        torch.manual_seed(self.seed)
        self.data = RandomDataset(32, 64)
    def train_dataloader(self):
        return DataLoader(self.data, batch_size=8)

class TwoHospitals(L.LightningDataModule):
    def federated_sites(self):
        return [Site("hospital_a", Random(1), resources={"site:hospital_a": 1}),
                Site("hospital_b", Random(2), resources={"site:hospital_b": 1})]

strategy = FederatedStrategy(aggregator="fedavg", secagg=True, progress=False, checkpoint_every=0)
trainer = L.Trainer(strategy=strategy, max_epochs=2, logger=False, enable_checkpointing=False, limit_val_batches=0)
trainer.fit(BoringModel(), datamodule=TwoHospitals())
fit = strategy.last_fit
print("RESULT " + json.dumps({"nodes": strategy.federation.site_nodes, "rounds": len(fit.round_seconds),
                              "sent": fit.traffic.total_sent}))
strategy.shutdown()
'''


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _node_ip():
    from ray.util import get_node_ip_address

    return get_node_ip_address()


def _start_node(args, env, log):
    # --block keeps `ray start` in the foreground; its own session holds every process of the node, ended by PID group
    return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever the node left behind in its session
    except ProcessLookupError:
        pass


def test_a_federation_runs_across_a_two_node_cluster_with_tls_and_token_auth(tmp_path):
    ip = _node_ip()
    certs = write_certificates(tmp_path / "certs", {"head": [ip], "hospital_b": [ip]})
    token_file = tmp_path / "token"
    token_file.write_text(os.urandom(16).hex())
    gcs, dashboard, client, *agent_ports = _free_ports(9)
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file), "RAY_USAGE_STATS_ENABLED": "0",
                 "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"})
    head_env = {**base, **ray_tls_env(certs, "head")}
    node_env = {**base, **ray_tls_env(certs, "hospital_b")}
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("head", "hospital_b")}
    ray_dir = tempfile.mkdtemp(prefix="lf-tls-")  # short: Ray's socket paths must fit in 107 bytes
    ports = lambda i: ["--dashboard-agent-listen-port", str(agent_ports[3 * i]), "--dashboard-agent-grpc-port",  # noqa: E731
                       str(agent_ports[3 * i + 1]), "--metrics-export-port", str(agent_ports[3 * i + 2])]
    head = _start_node(["--head", "--node-ip-address", ip, "--port", str(gcs), "--num-cpus", "2",
                        "--resources", '{"site:hospital_a": 1}', "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                        "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
                        "--temp-dir", ray_dir, *ports(0)], head_env, logs["head"])
    nodes = [head]
    try:
        job = [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--", sys.executable, "-c", DRIVER]
        deadline = time.monotonic() + 90
        while subprocess.run([RAY, "job", "list", "--address", f"http://127.0.0.1:{dashboard}"], env=head_env,
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline and head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(1)
        nodes.append(_start_node(["--address", f"{ip}:{gcs}", "--node-ip-address", ip, "--num-cpus", "2",
                                  "--resources", '{"site:hospital_b": 1}', *ports(1)], node_env, logs["hospital_b"]))
        # without the token the job server refuses the submission
        refused = subprocess.run(job, env={**base, "RAY_AUTH_TOKEN_PATH": "", "HOME": str(tmp_path)}, capture_output=True,
                                 text=True, timeout=120)
        assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower(), refused.stdout[-2000:] + refused.stderr[-2000:]
        done = subprocess.run(job, env=head_env, capture_output=True, text=True, timeout=400)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-4000:] + (tmp_path / "hospital_b.log").read_text()[-2000:]
        result = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT ")).removeprefix("RESULT "))
        assert result["rounds"] == 2 and result["sent"] > 0
        assert len(set(result["nodes"].values())) == 2  # each hospital on its own node: the links between them are TLS
    finally:
        for proc in reversed(nodes):
            _stop(proc)
        for log in logs.values():
            log.close()
        shutil.rmtree(ray_dir, ignore_errors=True)
