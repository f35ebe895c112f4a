"""Study B's federation four ways, and the smallest fit two ways, side by side and interleaved in one invocation.

Each peer as an expert writes it:

- ``plain``: plain PyTorch in one process (``benchmarks/plain_hospitals.py``): torch and numpy only, threads set to
  the machine's CPUs, data as tensors, batches by index, a stateful model and Adam per hospital, FedAvg by hand;
- ``pooled``: a plain Lightning Trainer on the five hospitals' training data together (same steps per epoch), fed
  through the same data path as lightning-fed's sites (``TensorBatches``: whole batches gathered from tensors);
- ``flower``: Flower's simulation engine, 2 CPUs per client, the client's torch threads set to them, data as
  tensors and batches by index (``benchmarks/flower_hospitals.py``, in its own environment: ``--flower-python``,
  default ``.venv-flower/bin/python``; skipped with a note when it is missing);
- ``lightning_fed``: ``lightning-fed fit --config recipes/hospitals.yaml`` as a user runs it (loggers off, the
  test of the global model on every hospital after fit, as the recipe does);
- ``tiny_lightning`` / ``tiny_lightning_fed``: Lightning's BoringModel, 8 steps, plain Lightning against the same
  Trainer with ``FederatedStrategy(num_sites=2)`` (``benchmarks/tiny_fit.py``): only fixed costs show.

Same data (HospitalsDataModule's draw), model (SmallCNN), optimizer (Adam), batch size, epochs and FedAvg. Every run
is a fresh process; the arms take turns (A B C D A B C D ...) so that a noisy machine slows them alike. For each
arm: wall (launch to exit), start-up (launch to the first round), median round, and the ratios run by run.
Start-up of lightning-fed is split into the driver's own start (imports, recipe, Ray), the federation's (workers and
sites ready) and the first round's extra (each site's fit set-up).

    python benchmarks/hospitals.py                                  # 10 epochs, 2 repetitions, every arm
    python benchmarks/hospitals.py --epochs 3 --repeats 1 --arms plain,lightning_fed

Data: $LIGHTNING_FED_DATA/fashion_mnist (or --data-dir).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = ("plain", "pooled", "flower", "lightning_fed", "tiny_lightning", "tiny_lightning_fed")
TINY = ("tiny_lightning", "tiny_lightning_fed")  # whole-process walls only: no rounds to time
REPO = Path(__file__).resolve().parents[1]


# -- the arms (each runs in its own process and prints one JSON line last) ------------------------
def pooled_arm(args: argparse.Namespace) -> dict:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from lightning_fed.data import TensorBatches, collate
    from lightning_fed.data.fashion_mnist import PooledIndexData
    from lightning_fed.models import SmallCNN

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.first_round_at, self.round_ends = None, []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.first_round_at = self.first_round_at or time.time()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.round_ends.append(time.time())

    torch.manual_seed(args.seed)
    torch.set_flush_denormal(True)  # as lightning-fed's sites and the other peers do
    sites = {
        name: PooledIndexData(args.data_dir, idx, args.batch_size)
        for name, idx in hospitals(args).site_indices().items()
    }
    for site in sites.values():
        site.setup("fit")
    parts = [s.datasets["train"].tensors for s in sites.values()]  # the hospitals' tensors, joined
    pooled = TensorBatches(*(torch.cat(field) for field in zip(*parts)))
    train = DataLoader(pooled, batch_size=args.batch_size, shuffle=True, collate_fn=collate)
    clock, model = Clock(), SmallCNN()
    trainer = L.Trainer(
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    trainer.fit(model, train_dataloaders=train)
    return {
        "first_round_at": clock.first_round_at,
        "round_ends": clock.round_ends,
        "small": small_metrics(model, sites),
    }


def small_metrics(model, sites: dict) -> dict:
    import torch
    from torchmetrics.classification import BinaryAUROC, BinaryPrecision, BinaryRecall

    model.eval()
    out = {}
    for name, site in sites.items():
        if name == "large":
            continue
        rec, prec, auc = BinaryRecall(), BinaryPrecision(), BinaryAUROC(thresholds=1000)
        with torch.no_grad():
            for x, y in site.test_dataloader():
                p = model(x).softmax(-1)[:, 1]
                for m in (rec, prec, auc):
                    m.update(p, y)
        out[name] = {"recall": float(rec.compute()), "precision": float(prec.compute()), "auroc": float(auc.compute())}
    return out


def hospitals(args: argparse.Namespace):
    from lightning_fed.data import HospitalsDataModule

    return HospitalsDataModule(data_dir=args.data_dir, batch_size=args.batch_size, seed=args.seed)


def write_split(args: argparse.Namespace, path: Path) -> None:
    """The hospitals' index split, for the Flower arm's environment (which has no lightning-fed)."""
    import numpy as np

    from lightning_fed.data.fashion_mnist import fashion_mnist_root

    indices = hospitals(args).site_indices()
    arrays = {f"{site}/{split}": idx for site, parts in indices.items() for split, idx in parts.items()}
    np.savez(path, sites=np.array(list(indices)), data_dir=str(fashion_mnist_root(args.data_dir)), **arrays)


# -- the parent: launch, time, compare ------------------------------------------------------------
def launch(arm: str, args: argparse.Namespace, scratch: Path, repeat: int) -> dict:
    # the benchmarks' folder too: the Flower clients (Ray workers) import study_b_torch from it
    paths = [str(REPO), str(REPO / "benchmarks"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths).rstrip(os.pathsep)}
    common = ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    if arm in TINY:
        command = [
            sys.executable,
            str(REPO / "benchmarks" / "tiny_fit.py"),
            *(["--federated"] if arm.endswith("fed") else []),
        ]
    elif arm in ("plain", "flower"):  # both read the hospitals' split written for them
        python, script = (
            (sys.executable, "plain_hospitals.py") if arm == "plain" else (args.flower_python, "flower_hospitals.py")
        )
        command = [python, str(REPO / "benchmarks" / script), "--split-file", str(scratch / "split.npz"), *common]
    elif arm == "lightning_fed":
        root = scratch / f"lightning_fed_{repeat}"
        command = [
            str(Path(sys.executable).parent / "lightning-fed"),
            "fit",
            "--config",
            str(REPO / "recipes" / "hospitals.yaml"),
            "--trainer.logger=false",
            f"--trainer.max_epochs={args.epochs}",
            f"--trainer.default_root_dir={root}",
            f"--data.init_args.batch_size={args.batch_size}",
            f"--seed_everything={args.seed}",
            f"--data.init_args.seed={args.seed}",
            "--trainer.strategy.init_args.progress=false",
        ]
        if args.data_dir:
            command.append(f"--data.init_args.data_dir={args.data_dir}")
    else:
        command = [
            sys.executable,
            __file__,
            "--arm",
            arm,
            *common,
            *(["--data-dir", args.data_dir] if args.data_dir else []),
        ]
    launched = time.time()
    proc = subprocess.run(command, env=env, cwd=scratch, capture_output=True, text=True)
    wall = time.time() - launched
    if proc.returncode != 0:
        raise SystemExit(f"{arm} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    if arm in TINY:
        return {"wall": wall}
    if arm == "lightning_fed":
        report = json.loads(next(root.rglob("results.json")).read_text())
        rounds = report["round_seconds"]
        first = report["fit_started_unix"]
        small = {s: report["test"]["sites"][s] for s in report["test"]["sites"] if s.startswith("small")}
        extra = {
            "driver_ready": first - report["startup_seconds"] - launched,
            "federation_start": report["startup_seconds"],
            "first_round_extra": rounds[0] - statistics.median(rounds[1:] or rounds),
            "layout": report.get("layout"),
        }
    else:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        first, ends = out["first_round_at"], out["round_ends"]
        rounds = [b - a for a, b in zip([first, *ends[:-1]], ends)]
        small, extra = out["small"], {}
    return {
        "wall": wall,
        "startup": first - launched,
        "rounds": rounds,
        "median_round": statistics.median(rounds[1:] or rounds),
        "small": {k: statistics.mean(v[k] for v in small.values()) for k in ("recall", "precision", "auroc")},
        **extra,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {', '.join(ARMS)}")
    parser.add_argument("--flower-python", default=str(REPO / ".venv-flower" / "bin" / "python"))
    parser.add_argument("--json", default=None, help="also write every run's figures to this file")
    parser.add_argument("--arm", choices=("pooled",), help=argparse.SUPPRESS)  # one arm, in this process
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(pooled_arm(args)))
        return

    # every arm runs in a scratch folder: a relative data folder is resolved here, against the folder this started in
    if args.data_dir:
        args.data_dir = str(Path(args.data_dir).expanduser().resolve())
    if os.environ.get("LIGHTNING_FED_DATA"):
        os.environ["LIGHTNING_FED_DATA"] = str(Path(os.environ["LIGHTNING_FED_DATA"]).expanduser().resolve())
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}: choose from {', '.join(ARMS)}")
    if "flower" in arms and not Path(args.flower_python).is_file():
        print(
            f"note: no Flower environment at {args.flower_python} (see benchmarks/flower_hospitals.py): Flower skipped"
        )
        arms.remove("flower")
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory(prefix="hospitals-bench-") as tmp:
        scratch = Path(tmp)
        if {"plain", "flower"} & set(arms):
            write_split(args, scratch / "split.npz")
        for repeat in range(args.repeats):
            for arm in arms:
                run = launch(arm, args, scratch, repeat)
                runs[arm].append(run)
                if arm in TINY:
                    print(f"[{repeat + 1}/{args.repeats}] {arm:18s} wall {run['wall']:6.1f}s", flush=True)
                    continue
                print(
                    f"[{repeat + 1}/{args.repeats}] {arm:14s} wall {run['wall']:6.1f}s  start-up {run['startup']:5.1f}s  "
                    f"median round {run['median_round']:.2f}s",
                    flush=True,
                )
    report(runs, args)


def report(runs: dict[str, list[dict]], args: argparse.Namespace) -> None:
    study = {arm: rs for arm, rs in runs.items() if arm not in TINY}
    med = {
        arm: {k: statistics.median(r[k] for r in rs) for k in ("wall", "startup", "median_round")}
        for arm, rs in study.items()
    }
    print(f"\nStudy B, {args.epochs} rounds, {args.repeats} run(s) per arm, medians:")
    print(f"{'arm':14s} {'wall s':>8s} {'start-up s':>11s} {'round s':>8s}   small hospitals: recall precision auroc")
    for arm, m in med.items():
        small = {k: statistics.mean(r["small"][k] for r in runs[arm]) for k in ("recall", "precision", "auroc")}
        print(
            f"{arm:14s} {m['wall']:8.1f} {m['startup']:11.1f} {m['median_round']:8.2f}   "
            f"{small['recall']:.3f} {small['precision']:.3f} {small['auroc']:.3f}"
        )
    if "lightning_fed" in runs:
        fed = runs["lightning_fed"]
        split = {
            k: statistics.median(r[k] for r in fed) for k in ("driver_ready", "federation_start", "first_round_extra")
        }
        print(
            f"\nlightning-fed start-up: driver ready (imports, recipe, Ray) {split['driver_ready']:.1f}s, "
            f"federation (workers + sites ready) {split['federation_start']:.1f}s; first round "
            f"+{split['first_round_extra']:.1f}s (each site's fit set-up); layout: {fed[0]['layout']}"
        )
        pairs = [
            ("flower", "wall", "wall"),
            ("flower", "median_round", "median round"),
            ("plain", "wall", "wall"),
            ("plain", "median_round", "median round"),
            ("pooled", "median_round", "median round"),
        ]
        for other, key, label in pairs:
            if other in runs:
                ratio_line(f"lightning-fed / {other} {label}", fed, runs[other], key)
    if all(arm in runs for arm in TINY):
        print(f"\nTiny fit (BoringModel, 8 steps), whole process, {args.repeats} run(s):")
        for arm in TINY:
            print(f"{arm:18s} wall {statistics.median(r['wall'] for r in runs[arm]):6.1f}s")
        ratio_line(
            "tiny lightning-fed / plain Lightning wall", runs["tiny_lightning_fed"], runs["tiny_lightning"], "wall"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))


def ratio_line(label: str, ours: list[dict], theirs: list[dict], key: str) -> None:
    """The median of the run-by-run ratios (runs of one repetition ran next to each other: same machine load)."""
    ratios = [a[key] / b[key] for a, b in zip(ours, theirs)]
    print(f"ratio {label}: {statistics.median(ratios):.2f}x (runs: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
