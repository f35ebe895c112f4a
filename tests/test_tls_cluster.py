"""Encrypted, authenticated Ray links on fixed ports: a two-node Ray cluster on loopback with mutual TLS (a certificate
per node from the federation's own CA) and token authentication, a federation submitted to it with ``ray job submit``
whose two hospitals run each on its own node (the one carrying its ``site:<name>`` resource), and a submission without
the token refused.

Every port of both nodes is pinned with the ``ray start`` flags of docs/deploy.md (distinct ports per node, one small
block found free at the start), and the test checks that the cluster uses exactly those: the ports Ray reports for
each node, and every TCP port a process of either node listens on while the federation runs (worker processes, the
driver included, only inside their node's worker range)."""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from lightning_fed.tls import ray_tls_env, write_certificates

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))

DRIVER = """
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

import os, ray, psutil  # psutil: the copy Ray ships, importable once ray is imported

def session(pid):
    try:
        return os.getsid(pid)
    except OSError:
        return None

def name(pid):
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return "?"

# while the sites' workers are still up: what Ray reports for each node, and every TCP port listened on (by session)
keys = ("NodeManagerPort", "ObjectManagerPort", "MetricsExportPort", "MetricsAgentPort", "DashboardAgentListenPort",
        "RuntimeEnvAgentPort")
nodes = [{**{k: n[k] for k in keys}, "site": sorted(r for r in n["Resources"] if r.startswith("site:"))}
         for n in ray.nodes() if n["Alive"]]
listening = [[c.laddr.port, c.pid, session(c.pid), name(c.pid)] for c in psutil.net_connections("tcp")
             if c.status == psutil.CONN_LISTEN and c.pid]
holders = {r.removeprefix("site:"): n["NodeID"] for n in ray.nodes() if n["Alive"] for r in n["Resources"]
           if r.startswith("site:")}  # the node that carries each hospital's resource
print("RESULT " + json.dumps({"nodes": strategy.federation.site_nodes, "holders": holders,
                              "step": trainer.global_step, "rounds": len(fit.round_seconds),
                              "sent": fit.traffic.total_sent, "ray_nodes": nodes, "listening": listening,
                              "driver_pid": os.getpid()}))
strategy.shutdown()
"""


# Every port of the cluster, as offsets into one contiguous block: the head's own, then per node (head, hospital_b)
# six single ports and a worker range. The flag names are the ones docs/deploy.md tells a hospital to use.
HEAD_PORTS = ("gcs", "dashboard", "client", "dashboard_metrics", "autoscaler_metrics")
NODE_PORTS = (
    "node_manager",
    "object_manager",
    "runtime_env_agent",
    "dashboard_agent_grpc",
    "dashboard_agent_listen",
    "metrics_export",
)
WORKER_PORTS = 16  # per node: the job's driver, its supervisor, the coordinator, site workers and Ray's idle workers
BLOCK = len(HEAD_PORTS) + 2 * (len(NODE_PORTS) + WORKER_PORTS)


def _port_free(port):
    """Nothing holds ``port`` on any address: bound on 0.0.0.0 (a dual-stack ``::`` listener blocks that too) and,
    where the machine has IPv6, on ``::`` alone."""
    families = [(socket.AF_INET, "0.0.0.0")] + ([(socket.AF_INET6, "::")] if socket.has_ipv6 else [])
    for family, address in families:
        try:
            with socket.socket(family) as s:
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((address, port))
        except OSError:
            return False
    return True


def _free_block(count, low=24100, high=32700):
    """``count`` consecutive free ports, below the ephemeral range (32768-) where other Ray processes on this machine
    pick their random ports, from a random start so that two runs of this test do not pick the same block."""
    starts = list(range(low, high - count))
    random.shuffle(starts)
    for start in starts[:200]:
        if all(_port_free(port) for port in range(start, start + count)):
            return list(range(start, start + count))
    raise RuntimeError(f"no {count} consecutive free ports between {low} and {high}")


def _layout(block):
    """Which port of the block is which: ``{"gcs": ..., "nodes": [{"node_manager": ..., "workers": (lo, hi)}]}``."""
    ports = iter(block)
    layout = {name: next(ports) for name in HEAD_PORTS}
    layout["nodes"] = [{name: next(ports) for name in NODE_PORTS} for _ in range(2)]
    for node in layout["nodes"]:
        workers = [next(ports) for _ in range(WORKER_PORTS)]
        node["workers"] = (workers[0], workers[-1])
    return layout


def _node_flags(node):
    """The ``ray start`` flags that pin one node's ports (every node: head and hospitals)."""
    return [
        "--node-manager-port",
        str(node["node_manager"]),
        "--object-manager-port",
        str(node["object_manager"]),
        "--runtime-env-agent-port",
        str(node["runtime_env_agent"]),
        "--dashboard-agent-grpc-port",
        str(node["dashboard_agent_grpc"]),
        "--dashboard-agent-listen-port",
        str(node["dashboard_agent_listen"]),
        "--metrics-export-port",
        str(node["metrics_export"]),
        "--min-worker-port",
        str(node["workers"][0]),
        "--max-worker-port",
        str(node["workers"][1]),
    ]


def _allowed(layout, index):
    """Every port a process of node ``index`` may listen on."""
    node = layout["nodes"][index]
    own = {node[name] for name in NODE_PORTS} | set(range(node["workers"][0], node["workers"][1] + 1))
    return own | ({layout[name] for name in HEAD_PORTS} if index == 0 else set())


def _check_ports(result, layout, sessions):
    """The cluster used the pinned ports and nothing else: Ray's own report of each node, then every listening socket
    of the two nodes' processes (grouped by the session each ``ray start`` opened; the job's driver runs in a session
    of its own, started on the head)."""
    reported = {tuple(node["site"]): node for node in result["ray_nodes"]}
    assert set(reported) == {("site:hospital_a",), ("site:hospital_b",)}, result["ray_nodes"]
    for index, site in enumerate(("site:hospital_a", "site:hospital_b")):
        node, pinned = reported[(site,)], layout["nodes"][index]
        assert (
            node["NodeManagerPort"],
            node["ObjectManagerPort"],
            node["MetricsExportPort"],
            node["MetricsAgentPort"],
            node["DashboardAgentListenPort"],
            node["RuntimeEnvAgentPort"],
        ) == (
            pinned["node_manager"],
            pinned["object_manager"],
            pinned["metrics_export"],
            pinned["dashboard_agent_grpc"],
            pinned["dashboard_agent_listen"],
            pinned["runtime_env_agent"],
        ), (site, node, pinned)
    for index, sid in enumerate(sessions):
        mine = [
            entry
            for entry in result["listening"]
            if entry[2] == sid or (index == 0 and entry[1] == result["driver_pid"])
        ]
        ports = {port for port, *_ in mine}
        outside = [entry for entry in mine if entry[0] not in _allowed(layout, index)]
        assert not outside, f"node {index} listens outside its pinned ports: {outside}"
        singles = {layout["nodes"][index][name] for name in NODE_PORTS}
        if index == 0:
            singles |= {layout[name] for name in HEAD_PORTS}
        assert singles <= ports, f"node {index}: pinned ports nobody listens on: {sorted(singles - ports)} ({mine})"
        low, high = layout["nodes"][index]["workers"]
        workers = [entry for entry in mine if low <= entry[0] <= high]
        assert all(name.startswith(("ray::", "python")) for _, _, _, name in workers), workers
        # head: the driver, the coordinator and hospital_a's worker; hospital_b's node: its worker
        assert len(workers) >= (3 if index == 0 else 1), f"node {index}: worker ports in use {workers} of {low}-{high}"
        if index == 0:  # the driver (a job's entrypoint) takes its port from the head's worker range too
            assert any(entry[1] == result["driver_pid"] for entry in workers), (result["driver_pid"], workers)


def _node_ip():
    from ray.util import get_node_ip_address

    return get_node_ip_address()


def _start_node(args, env, log):
    # --block keeps `ray start` in the foreground; its own session holds every process of the node, ended by PID group
    return subprocess.Popen(
        [RAY, "start", "--block", "--disable-usage-stats", *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(procs, grace=1.0):
    """End every node: SIGTERM to each node's session at once, up to ``grace`` seconds in all for them to go (a
    ``ray start --block`` outlives 5 s waits as often as not, with nothing left to save), then SIGKILL to whatever each
    session still holds."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the node left behind in its session
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.mark.integration  # starts a two-node cluster
def test_a_federation_runs_across_a_two_node_cluster_with_tls_and_token_auth(tmp_path):
    ip = _node_ip()
    certs = write_certificates(tmp_path / "certs", {"head": [ip], "hospital_b": [ip]})
    token_file = tmp_path / "token"
    token_file.write_text(os.urandom(16).hex())
    layout = _layout(_free_block(BLOCK))
    gcs, dashboard = layout["gcs"], layout["dashboard"]
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_file),
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": str(REPO),
            "WANDB_MODE": "offline",
        }
    )
    # the head's two Prometheus endpoints (dashboard, autoscaler) have no ray start flag, only these variables
    head_env = {
        **base,
        **ray_tls_env(certs, "head"),
        "DASHBOARD_METRIC_PORT": str(layout["dashboard_metrics"]),
        "AUTOSCALER_METRIC_PORT": str(layout["autoscaler_metrics"]),
    }
    node_env = {**base, **ray_tls_env(certs, "hospital_b")}
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("head", "hospital_b")}
    ray_dir = tempfile.mkdtemp(prefix="lf-tls-")  # short: Ray's socket paths must fit in 107 bytes
    head = _start_node(
        [
            "--head",
            "--node-ip-address",
            ip,
            "--port",
            str(gcs),
            "--num-cpus",
            "2",
            "--resources",
            '{"site:hospital_a": 1}',
            "--include-dashboard",
            "true",
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard),
            "--ray-client-server-port",
            str(layout["client"]),
            "--temp-dir",
            ray_dir,
            *_node_flags(layout["nodes"][0]),
        ],
        head_env,
        logs["head"],
    )
    nodes = [head]
    try:
        job = [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--", sys.executable, "-c", DRIVER]
        deadline = time.monotonic() + 90
        while (
            subprocess.run(
                [RAY, "job", "list", "--address", f"http://127.0.0.1:{dashboard}"], env=head_env, capture_output=True
            ).returncode
            != 0
        ):
            assert time.monotonic() < deadline and head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(1)
        nodes.append(
            _start_node(
                [
                    "--address",
                    f"{ip}:{gcs}",
                    "--node-ip-address",
                    ip,
                    "--num-cpus",
                    "2",
                    "--resources",
                    '{"site:hospital_b": 1}',
                    *_node_flags(layout["nodes"][1]),
                ],
                node_env,
                logs["hospital_b"],
            )
        )
        # without the token the job server refuses the submission
        refused = subprocess.run(
            job,
            env={**base, "RAY_AUTH_TOKEN_PATH": "", "HOME": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower(), (
            refused.stdout[-2000:] + refused.stderr[-2000:]
        )
        done = subprocess.run(job, env=head_env, capture_output=True, text=True, timeout=400)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-4000:] + (tmp_path / "hospital_b.log").read_text()[-2000:]
        result = json.loads(
            next(line for line in output.splitlines() if line.startswith("RESULT ")).removeprefix("RESULT ")
        )
        assert result["rounds"] == 2 and result["sent"] > 0 and result["step"] == 16  # 64 samples / 8, 2 epochs
        # each hospital's site runs on the node that carries its site:<name> resource (its own node), so the links
        # between them are TLS
        assert result["nodes"] == result["holders"] and len(set(result["nodes"].values())) == 2, result
        _check_ports(result, layout, [proc.pid for proc in nodes])  # `ray start` leads its node's session
    finally:
        _stop(nodes)
        for log in logs.values():
            log.close()
        shutil.rmtree(ray_dir, ignore_errors=True)
