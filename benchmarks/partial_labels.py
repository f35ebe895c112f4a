"""Study D on real images: FedAvg, FedProx, FedBN and FedFBN on partial-label, non-IID FashionMNIST mosaic sites.

Every algorithm trains the same ImageClassifier (timm backbone, pretrained on the held-out FashionMNIST pool, the
ImageNet stand-in) on the same four sites (FashionMosaicSites: own class mix, own annotated labels, own scanner)
for each seed, one local epoch per round. After fit, ``trainer.test`` evaluates the final model on every site's
own fully annotated test mosaics inside the site actors; the federated AUROC per label is the pooled one (merged
metric states). Writes the raw figures (JSON) and a Markdown table (mean ± std over seeds).

    python benchmarks/partial_labels.py                                  # 4 algorithms x 3 seeds (~25 min, 2 cores)
    python benchmarks/partial_labels.py --aggregators fedavg fedfbn --seeds 0 --epochs 2
    python benchmarks/partial_labels.py --same-scanner --json runs/partial_labels/same_scanner.json   # ablation

Data: $LIGHTNING_FED_DATA/fashion_mnist (or --data-dir).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def run_one(args: argparse.Namespace, aggregator: str, seed: int, weights: Path) -> dict:
    import lightning.pytorch as L

    from lightning_fed import FederatedStrategy
    from lightning_fed.data.mosaic import FashionMosaicSites
    from lightning_fed.models import ImageClassifier

    L.seed_everything(seed, verbose=False)
    dm = FashionMosaicSites(
        data_dir=args.data_dir, seed=seed, batch_size=args.batch_size, scanner_shift=not args.same_scanner
    )
    model = ImageClassifier(
        args.backbone,
        task="multilabel",
        num_classes=10,
        in_chans=1,
        pretrained=str(weights),
        lr=args.lr,
        label_names=dm.label_names,
    )
    kwargs = {"mu": args.mu} if aggregator == "fedprox" else {}
    strategy = FederatedStrategy(
        aggregator=aggregator, aggregator_kwargs=kwargs, sync_every=1, seed=seed, progress=False, checkpoint_every=0
    )
    trainer = L.Trainer(
        strategy=strategy,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    t0 = time.perf_counter()
    try:
        trainer.fit(model, datamodule=dm)
        trainer.test(model, datamodule=dm, verbose=False)
    finally:
        strategy.shutdown()
    evaluation = strategy.last_evaluation
    sites = {
        n: {"auroc": r.get("auroc"), "auroc_per_label": r.get("auroc_per_label")} for n, r in evaluation.rows().items()
    }
    return {
        "aggregator": aggregator,
        "seed": seed,
        "seconds": round(time.perf_counter() - t0, 1),
        "federated": sites.pop("federated"),
        "sites": sites,
        "notes": evaluation.notes,
    }


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def site_mean(result: dict, label: int | None = None) -> float | None:
    """Mean over sites of each site's own AUROC (macro, or of one label) on its own test data."""
    values = [s["auroc"] if label is None else s["auroc_per_label"][label] for s in result["sites"].values()]
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def table(results: list[dict], aggregators: list[str], label_names: list[str], pooled: bool = True) -> str:
    """Per-label and macro AUROC, mean ± std over seeds: pooled over every site's test data (the federated figure),
    or the mean over sites of each site's own AUROC."""
    by_algo = {a: [r for r in results if r["aggregator"] == a] for a in aggregators}
    value = (
        (lambda r, i: r["federated"]["auroc_per_label"][i] if i is not None else r["federated"]["auroc"])
        if pooled
        else site_mean
    )
    header = "| label | " + " | ".join(aggregators) + " |"
    lines = [header, "|" + "---|" * (len(aggregators) + 1)]
    for i, name in enumerate(label_names):
        lines.append(
            f"| {i} {name} | " + " | ".join(_mean_std([value(r, i) for r in by_algo[a]]) for a in aggregators) + " |"
        )
    cells = [_mean_std([value(r, None) for r in by_algo[a]]) for a in aggregators]
    lines.append("| **macro** | " + " | ".join(f"**{c}**" for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aggregators", nargs="+", default=["fedavg", "fedprox", "fedbn", "fedfbn"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5, help="rounds (one local epoch each)")
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument(
        "--weights", default=None, help="pretrained checkpoint (default: made once under runs/weights/)"
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--mu", type=float, default=0.01, help="FedProx mu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--same-scanner", action="store_true", help="ablation: every site images with the same scanner")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default="runs/partial_labels/results.json")
    args = parser.parse_args()

    from lightning_fed.data.fashion_mnist import CLASSES
    from lightning_fed.models.pretrain import pretrain_on_fashion

    weights = Path(args.weights or f"runs/weights/{args.backbone}-fashion.pth")
    if not weights.is_file():
        info = pretrain_on_fashion(args.backbone, weights, args.data_dir)
        print(f"pretrained {weights}: test accuracy {info['test_accuracy']:.4f} in {info['seconds']} s")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: list[dict] = json.loads(out.read_text()) if out.is_file() else []
    done = {(r["aggregator"], r["seed"]) for r in results}
    for seed in args.seeds:
        for aggregator in args.aggregators:
            if (aggregator, seed) in done:
                continue
            result = run_one(args, aggregator, seed, weights)
            results.append(result)
            out.write_text(json.dumps(results, indent=1))  # each finished run is kept, whatever happens next
            print(
                f"{aggregator:8s} seed {seed}: macro AUROC {result['federated']['auroc']:.4f} ({result['seconds']} s)",
                flush=True,
            )
    chosen = [r for r in results if r["aggregator"] in args.aggregators and r["seed"] in args.seeds]
    print("\nPooled over all sites' test data (federated AUROC):")
    print(table(chosen, args.aggregators, list(CLASSES)))
    print("\nMean over sites of each site's own AUROC:")
    print(table(chosen, args.aggregators, list(CLASSES), pooled=False))


if __name__ == "__main__":
    main()
