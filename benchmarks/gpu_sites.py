"""Sites sharing one GPU: 1 site alone vs 4 sites packed onto it, against plain PyTorch on the same GPU.

Each site trains a ResNet-18 (torchvision, 3 x 64 x 64 inputs, 2 classes; random tensors kept on the site, since
only throughput is measured here) for ``--steps`` optimizer steps a round, ``--rounds`` rounds, batch 64, Adam,
FedAvg after every round. Arms, each in a fresh process, taking turns:

- ``plain_1``: one model, plain PyTorch loop on the GPU (data already on the GPU, batches by index): the floor;
- ``lightning_fed_1``: ``FederatedStrategy(num_sites=1, site_gpus=1.0)``;
- ``plain_4``: four models trained one after another per round in one process, FedAvg by hand;
- ``lightning_fed_4``: ``FederatedStrategy(num_sites=4, site_gpus=0.25)``: the four sites packed onto one worker
  holding the GPU, taking turns (one compute thread per worker).

For each arm: wall, median round and the GPU's mean SM utilisation while the arm ran (``nvidia-smi dmon``),
printed as a table with the card's name::

    python benchmarks/gpu_sites.py --steps 100 --rounds 3 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ARMS = ("plain_1", "lightning_fed_1", "plain_4", "lightning_fed_4")


def random_images(n: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 64, 64, generator=g), torch.randint(0, 2, (n,), generator=g)


def resnet18():
    import torchvision

    return torchvision.models.resnet18(num_classes=2)


def plain_arm(sites: int, args: argparse.Namespace) -> dict:
    import torch
    from torch.nn import functional as F

    torch.manual_seed(0)
    device = torch.device(args.device)
    data = [tuple(t.to(device) for t in random_images(args.steps * args.batch_size, s)) for s in range(sites)]
    models = [resnet18().to(device) for _ in range(sites)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    optims = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in models]
    first, ends = time.time(), []
    for _ in range(args.rounds):
        for (x, y), model, opt in zip(data, models, optims):
            model.train()
            order = torch.randperm(len(x), device=device)
            for start in range(0, len(x), args.batch_size):
                batch = order[start : start + args.batch_size]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x[batch]), y[batch]).backward()
                opt.step()
        with torch.no_grad():  # FedAvg: equal sizes, a plain mean
            states = [m.state_dict() for m in models]
            mean = {k: sum(s[k].float() for s in states).div(sites).to(states[0][k].dtype) for k in states[0]}
            for m in models:
                m.load_state_dict(mean)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ends.append(time.time())
    return {"first_round_at": first, "round_ends": ends}


def lightning_fed_arm(sites: int, args: argparse.Namespace) -> dict:
    import lightning as L
    import torch
    from torch.nn import functional as F
    from torch.utils.data import DataLoader

    from lightning_fed import FederatedStrategy
    from lightning_fed.data import TensorBatches, collate

    class ResNetModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = resnet18()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    class RandomImages(L.LightningDataModule):
        def train_dataloader(self):
            x, y = random_images(sites * args.steps * args.batch_size, 0)
            return DataLoader(TensorBatches(x, y), batch_size=args.batch_size, shuffle=True, collate_fn=collate)

    torch.manual_seed(0)
    gpus = 1.0 / sites if args.device == "cuda" else 0.0
    strategy = FederatedStrategy(num_sites=sites, site_gpus=gpus, progress=False, checkpoint_every=0)
    trainer = L.Trainer(
        strategy=strategy, max_epochs=args.rounds, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(ResNetModule(), datamodule=RandomImages())
    fit = strategy.last_fit
    strategy.shutdown()
    return {"round_seconds": list(fit.round_seconds), "layout": fit.startup.layout if fit.startup else ""}


class Utilisation:
    """``nvidia-smi dmon`` in the background: the GPU's SM utilisation, one sample a second."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["nvidia-smi", "dmon", "-s", "u", "-d", "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )

    def stop(self) -> float:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        sm = [int(line.split()[1]) for line in out.splitlines() if line.strip() and not line.startswith("#")]
        busy = [v for v in sm if v > 0] or [0]
        return statistics.mean(busy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of the arms on a machine without a GPU")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        sites = int(args.arm.rsplit("_", 1)[1])
        run = plain_arm if args.arm.startswith("plain") else lightning_fed_arm
        print(json.dumps(run(sites, args)))
        return
    import torch

    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (smoke test)"
    arms = [a for a in args.arms.split(",") if a]
    common = ["--steps", str(args.steps), "--rounds", str(args.rounds), "--batch-size", str(args.batch_size)]
    common += ["--device", args.device]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    for repeat in range(args.repeats):
        for arm in arms:
            watch = Utilisation() if args.device == "cuda" else None
            launched = time.time()
            proc = subprocess.run(
                [sys.executable, __file__, "--arm", arm, *common], capture_output=True, text=True, env=env
            )
            wall = time.time() - launched
            sm = watch.stop() if watch is not None else 0.0
            if proc.returncode != 0:
                raise SystemExit(f"{arm} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            if "round_seconds" in out:
                rounds = out["round_seconds"]
            else:
                first, ends = out["first_round_at"], out["round_ends"]
                rounds = [b - a for a, b in zip([first, *ends[:-1]], ends)]
            run = {
                "wall": wall,
                "median_round": statistics.median(rounds[1:] or rounds),
                "sm_percent": sm,
                **{k: v for k, v in out.items() if k == "layout"},
            }
            runs[arm].append(run)
            print(
                f"[{repeat + 1}/{args.repeats}] {arm:16s} wall {wall:6.1f}s  median round {run['median_round']:.2f}s  SM {sm:.0f}%",
                flush=True,
            )
    print(
        f"\n{card}: ResNet-18, 3x64x64, batch {args.batch_size}, {args.steps} steps a site and round, {args.rounds} rounds"
    )
    print(f"{'arm':16s} {'wall s':>8s} {'round s':>8s} {'SM %':>6s}")
    for arm, rs in runs.items():
        print(
            f"{arm:16s} {statistics.median(r['wall'] for r in rs):8.1f} {statistics.median(r['median_round'] for r in rs):8.2f} {statistics.median(r['sm_percent'] for r in rs):6.0f}"
        )
    for arm, rs in runs.items():
        if rs and rs[0].get("layout"):
            print(f"{arm} layout: {rs[0]['layout']}")
    for ours, floor in (
        ("lightning_fed_1", "plain_1"),
        ("lightning_fed_4", "plain_4"),
        ("lightning_fed_4", "lightning_fed_1"),
    ):
        if ours in runs and floor in runs:
            ratios = [a["median_round"] / b["median_round"] for a, b in zip(runs[ours], runs[floor])]
            print(
                f"ratio {ours} / {floor} median round: {statistics.median(ratios):.2f}x (runs: {', '.join(f'{r:.2f}' for r in ratios)})"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"card": card, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
