"""Study B's federation two ways: a plain single-process PyTorch loop, and lightning-fed on Ray.

Same data (HospitalsDataModule's draw), model (SmallCNN), optimizer (Adam, one per site, kept across rounds),
batch size, epochs and FedAvg. Prints wall time, start-up time and per-round sync overhead of each, and the
small hospitals' mean test recall / precision / AUROC of each (a sanity check that both trained the same thing).

    python benchmarks/hospitals.py                       # 10 epochs, as the recipe
    python benchmarks/hospitals.py --epochs 2 --skip-plain

Data: $LIGHTNING_FED_DATA/fashion_mnist (or --data-dir).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time



def plain_loop(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    import torch
    from torch.nn import functional as F
    from torchmetrics.classification import BinaryAUROC, BinaryPrecision, BinaryRecall

    from lightning_fed.data.fashion_mnist import PooledIndexData
    from lightning_fed.models import SmallCNN
    from lightning_fed.strategies.fedavg import weighted_average
    from lightning_fed.strategies.base import SiteUpdate
    from lightning_fed.strategies.site import load_weights, state_to_numpy

    torch.manual_seed(args.seed)
    dm = hospitals(args)
    sites = {name: PooledIndexData(dm.data_dir, idx, args.batch_size) for name, idx in dm.site_indices().items()}
    for site in sites.values():
        site.setup("fit")
    global_model = SmallCNN()
    models = {n: SmallCNN() for n in sites}
    for m in models.values():
        m.load_state_dict(global_model.state_dict())
    optims = {n: torch.optim.Adam(m.parameters(), lr=1e-3) for n, m in models.items()}
    startup = time.perf_counter() - t0
    rounds, syncs = [], []
    for _ in range(args.epochs):
        r0 = time.perf_counter()
        updates = []
        for name, site in sites.items():
            model, opt = models[name], optims[name]
            model.train()
            for x, y in site.train_dataloader():
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        s0 = time.perf_counter()
        for name, model in models.items():
            updates.append(SiteUpdate(name, state_to_numpy(model.state_dict()), len(sites[name].datasets["train"])))
        averaged = weighted_average(updates)
        for model in models.values():
            load_weights(model, averaged)
        syncs.append(time.perf_counter() - s0)
        rounds.append(time.perf_counter() - r0)
    load_weights(global_model, averaged)
    global_model.eval()
    small = {}
    for name, site in sites.items():
        if name == "large":
            continue
        rec, prec, auc = BinaryRecall(), BinaryPrecision(), BinaryAUROC(thresholds=1000)
        with torch.no_grad():
            for x, y in site.test_dataloader():
                p = global_model(x).softmax(-1)[:, 1]
                for m in (rec, prec, auc):
                    m.update(p, y)
        small[name] = {"recall": float(rec.compute()), "precision": float(prec.compute()), "auroc": float(auc.compute())}
    return {"wall": time.perf_counter() - t0, "startup": startup, "rounds": rounds, "syncs": syncs, "small": small}


def lightning_fed_run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    import lightning as L

    from lightning_fed import FederatedStrategy
    from lightning_fed.models import SmallCNN

    L.seed_everything(args.seed, verbose=False)
    strategy = FederatedStrategy(aggregator="fedavg", sync_every=1, checkpoint_every=args.checkpoint_every, progress=False)
    trainer = L.Trainer(strategy=strategy, max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=args.root)
    model = SmallCNN()
    dm = hospitals(args)
    trainer.fit(model, datamodule=dm)
    fit = strategy.last_fit
    trainer.test(model, datamodule=dm, verbose=False)
    small = {n: {k: v for k, v in r.items() if k in ("recall", "precision", "auroc")}
             for n, r in strategy.last_evaluation["sites"].items() if n.startswith("small")}
    sync = fit["sync_seconds"]  # per site, per round: time inside the hand-over, waiting for slower sites included
    strategy.shutdown()
    return {"wall": time.perf_counter() - t0, "startup": fit["startup_seconds"], "fit": fit["fit_seconds"],
            "rounds": fit["round_seconds"], "sync_by_site": sync, "aggregate": fit["aggregate_seconds"], "small": small}


def hospitals(args: argparse.Namespace):
    from lightning_fed.data import HospitalsDataModule

    return HospitalsDataModule(data_dir=args.data_dir, batch_size=args.batch_size, seed=args.seed,
                               site_cpus=[args.large_site_cpus, 1, 1, 1, 1])


def mean_small(small: dict) -> dict:
    return {k: statistics.mean(v[k] for v in small.values()) for k in ("recall", "precision", "auroc")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--checkpoint-every", type=int, default=0, help="round checkpoints in the lightning-fed run (0: off)")
    parser.add_argument("--root", default="runs/benchmark")
    parser.add_argument("--large-site-cpus", type=float, default=1.0, help="CPUs (and torch threads) of the large hospital's actor")
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()

    out = {}
    if not args.skip_plain:
        plain = plain_loop(args)
        out["plain"] = plain
        print(f"plain PyTorch loop : wall {plain['wall']:.1f}s  start-up {plain['startup']:.1f}s  "
              f"round {statistics.mean(plain['rounds']):.2f}s  sync {1000 * statistics.mean(plain['syncs']):.0f} ms/round "
              f"({100 * statistics.mean(plain['syncs']) / statistics.mean(plain['rounds']):.2f} %)")
        print(f"  small hospitals mean: {json.dumps({k: round(v, 3) for k, v in mean_small(plain['small']).items()})}")
    fed = lightning_fed_run(args)
    out["lightning_fed"] = fed
    rounds = fed["rounds"]
    # the site that reaches the barrier last waits only for aggregation + transfer: that is the hand-over's cost
    overhead = [min(site[r] for site in fed["sync_by_site"].values()) for r in range(len(rounds))]
    print(f"lightning-fed      : wall {fed['wall']:.1f}s  start-up {fed['startup']:.1f}s (Ray + {len(fed['sync_by_site'])} site actors + data)  "
          f"fit {fed['fit']:.1f}s  round {statistics.mean(rounds[1:] or rounds):.2f}s (first {rounds[0]:.2f}s)")
    print(f"  per-round hand-over overhead (last site's wait: aggregate + transfer + load): "
          f"{1000 * statistics.mean(overhead):.0f} ms/round = {100 * statistics.mean(overhead) / statistics.mean(rounds):.2f} % of a round; "
          f"aggregation alone {1000 * statistics.mean(fed['aggregate']):.1f} ms")
    print(f"  small hospitals mean: {json.dumps({k: round(v, 3) for k, v in mean_small(fed['small']).items()})}")
    if "plain" in out:
        print(f"ratio lightning-fed / plain wall time: {fed['wall'] / out['plain']['wall']:.2f}x "
              f"(fit only: {fed['fit'] / (out['plain']['wall'] - out['plain']['startup']):.2f}x)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
