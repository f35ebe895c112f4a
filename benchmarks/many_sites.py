"""Many simulated sites on one machine: wall time and peak memory, packed onto workers vs one process per site.

Each run is a fresh process running ``trainer.fit`` with ``FederatedStrategy`` on a plain datamodule split across
N simulated sites (as a user's script would). Memory is the peak, over the run, of the proportional set size (PSS)
summed over that process and every process below it (Ray's daemons, the coordinator, the workers), read from
``/proc/<pid>/smaps_rollup`` every 0.2 s; shared libraries count once across processes.

- ``boring``: Lightning's ``BoringModel`` (a 32 -> 2 linear layer), 64 random samples per site, batch size 2;
- ``cnn``: study B's SmallCNN on FashionMNIST (10 classes), split across the sites by ``Dirichlet(0.5)``.

    python benchmarks/many_sites.py                                   # 10, 30, 100 sites of both, packed
    python benchmarks/many_sites.py --models boring --sites 10 --layouts packed,one_per_site

Linux only (reads /proc). Data for ``cnn``: $LIGHTNING_FED_DATA/fashion_mnist.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_arm(args: argparse.Namespace) -> dict:
    import lightning as L
    import torch
    from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
    from torch.utils.data import DataLoader

    from lightning_fed import Dirichlet, FederatedStrategy, Placement

    class RandomData(L.LightningDataModule):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.n = n

        def train_dataloader(self) -> DataLoader:
            return DataLoader(RandomDataset(32, self.n), batch_size=2)

        def val_dataloader(self) -> DataLoader:
            return DataLoader(RandomDataset(32, self.n), batch_size=2)

    torch.manual_seed(0)
    placement = Placement(sites_per_worker=1) if args.layout == "one_per_site" else Placement()
    if args.model == "boring":
        model, data, partitioner = BoringModel(), RandomData(64 * args.sites), None
    else:
        from lightning_fed.data import FashionMNISTDataModule
        from lightning_fed.models import SmallCNN

        model, data, partitioner = (
            SmallCNN(num_classes=10),
            FashionMNISTDataModule(batch_size=64),
            Dirichlet(alpha=0.5, seed=0),
        )
    strategy = FederatedStrategy(num_sites=args.sites, partitioner=partitioner, placement=placement, progress=False)
    trainer = L.Trainer(
        strategy=strategy,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.root,
    )
    trainer.fit(model, datamodule=data)
    fit = strategy.last_fit
    strategy.shutdown()
    return {
        "layout": fit.startup.layout,
        "startup": fit.startup.seconds,
        "fit": fit.fit_seconds,
        "rounds": fit.round_seconds,
    }


def tree_pss_kib(root: int) -> int:
    """PSS (KiB) summed over ``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    total, frontier = 0, [root]
    while frontier:
        pid = frontier.pop()
        frontier += children.get(pid, [])
        try:
            for line in open(f"/proc/{pid}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            pass
    return total


def measure(model: str, sites: int, layout: str, args: argparse.Namespace, root: Path) -> dict:
    command = [
        sys.executable,
        __file__,
        "--arm",
        "--model",
        model,
        "--sites",
        str(sites),
        "--layout",
        layout,
        "--epochs",
        str(args.epochs),
        "--root",
        str(root),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    t0 = time.time()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_pss_kib(proc.pid))
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.time() - t0
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{model} x {sites} ({layout}) failed:\n{out[-2000:]}\n{err[-4000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    return {"model": model, "sites": sites, "layout": layout, "wall": wall, "peak_pss_gib": peak[0] / 2**20, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="boring,cnn")
    parser.add_argument("--sites", default="10,30,100")
    parser.add_argument(
        "--layouts", default="packed", help="packed, one_per_site (one process per site: slow and large)"
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--arm", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="boring", help=argparse.SUPPRESS)
    parser.add_argument("--layout", default="packed", help=argparse.SUPPRESS)
    parser.add_argument("--root", default="runs/many_sites", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        args.sites = int(args.sites)
        print(json.dumps(run_arm(args)))
        return
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory(prefix="many-sites-") as tmp:
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            for layout in [name.strip() for name in args.layouts.split(",") if name.strip()]:
                for n in [int(s) for s in args.sites.split(",") if s.strip()]:
                    row = measure(model, n, layout, args, Path(tmp) / f"{model}-{layout}-{n}")
                    rows.append(row)
                    print(
                        f"{model:7s} {n:4d} sites {layout:13s} wall {row['wall']:6.1f}s  peak PSS {row['peak_pss_gib']:5.2f} GiB  "
                        f"start-up {row['startup']:5.1f}s  rounds {', '.join(f'{r:.1f}' for r in row['rounds'])}s  ({row['layout'][:60]})",
                        flush=True,
                    )
    by_key = {(r["model"], r["sites"], r["layout"]): r for r in rows}
    for (model, n, layout), row in by_key.items():
        other = by_key.get((model, n, "one_per_site"))
        if layout == "packed" and other is not None:
            print(
                f"{model} x {n}: one process per site / packed: wall {other['wall'] / row['wall']:.2f}x, "
                f"peak memory {other['peak_pss_gib'] / row['peak_pss_gib']:.2f}x"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
