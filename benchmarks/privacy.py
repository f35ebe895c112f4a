"""Study B's privacy experiments: DP-SGD on all hospitals / on the small hospitals only / no DP / the large
hospital alone with DP, ε swept, with the RDP or the PRV accountant.

Same federation as recipes/hospitals.yaml (five hospitals, SmallCNN, FedAvg every epoch, 10 epochs, seed 0); each
private hospital runs DP-SGD (Opacus, Poisson sampling, clipping norm 1.0) with the target ε for the whole run at
δ = 1e-5, its noise calibrated by the chosen accountant. The "large" arm trains the large hospital alone (with DP)
and tests its model on every hospital. Reported: the small hospitals' mean recall and AUROC on their own test data,
and the ε each private site's accountant spent (the federation's is the max). Writes JSON, a Markdown table and
PNG plots (the three arms; federated + DP against the large hospital alone + DP).

    python benchmarks/privacy.py                                   # 1 + 2 x 6 runs (~30-40 min on 2 cores)
    python benchmarks/privacy.py --arms all large --epsilons 0.5 1 2 4 8 --png docs/privacy_large_only.png
    python benchmarks/privacy.py --arms all --accountant prv --epsilons 0.5 1 2 4 8
    python benchmarks/privacy.py --epsilons 1 8 --epochs 2         # a quick look

Data: $LIGHTNING_FED_DATA/fashion_mnist (or --data-dir). The plot needs matplotlib (pip install -e ".[bench]").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

SMALL = ("small_1", "small_2", "small_3", "small_4")
ARMS = {
    "all": "DP on all sites",
    "small": "DP on small hospitals only",
    "none": "no DP",
    "large": "large hospital alone, with DP",
}


class OnlySites:
    """The hospitals of a datamodule that train (the others are still tested on, with the full datamodule)."""

    def __new__(cls, datamodule, names):
        import lightning.pytorch as L

        class Only(L.LightningDataModule):
            def federated_sites(self):
                return [s for s in datamodule.federated_sites() if s.name in names]

        return Only()


def run_one(args: argparse.Namespace, arm: str, epsilon: float | None) -> dict:
    import lightning.pytorch as L

    from lightning_fed import DPSGD, FederatedStrategy
    from lightning_fed.data import HospitalsDataModule
    from lightning_fed.models import SmallCNN

    L.seed_everything(args.seed, verbose=False)
    dm = HospitalsDataModule(data_dir=args.data_dir, seed=args.seed)
    private = {"all": ("large", *SMALL), "small": SMALL, "none": (), "large": ("large",)}[arm]
    privacy = {
        site: DPSGD(
            target_epsilon=epsilon, delta=args.delta, max_grad_norm=args.max_grad_norm, accountant=args.accountant
        )
        for site in private
    }
    strategy = FederatedStrategy(privacy=privacy or None, progress=False, checkpoint_every=0, seed=args.seed)
    trainer = L.Trainer(
        strategy=strategy,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    t0 = time.perf_counter()
    try:
        # the large hospital alone trains on its own; its model is then tested at every hospital, like the others
        trainer.fit(SmallCNN(), datamodule=OnlySites(dm, ("large",)) if arm == "large" else dm)
        trainer.test(datamodule=dm, verbose=False)
    finally:
        strategy.shutdown()
    sites = strategy.last_evaluation.rows()
    spent = strategy.last_fit.privacy.sites if strategy.last_fit.privacy is not None else {}
    return {
        "arm": arm,
        "target_epsilon": epsilon,
        "delta": args.delta,
        "seconds": round(time.perf_counter() - t0, 1),
        "accountant": args.accountant,
        "small_recall": statistics.mean(sites[s]["recall"] for s in SMALL),
        "small_auroc": statistics.mean(sites[s]["auroc"] for s in SMALL),
        "small_precision": statistics.mean(sites[s]["precision"] for s in SMALL),
        "epsilon_spent": {s: p.epsilon for s, p in spent.items()},
        "max_epsilon": max((p.epsilon for p in spent.values()), default=None),
        "noise_multiplier": {s: p.noise_multiplier for s, p in spent.items()},
    }


def table(results: list[dict]) -> str:
    lines = [
        "| arm | accountant | target ε | ε spent (max over sites) | noise σ (large) | small recall | small precision | small AUROC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (list(ARMS).index(r["arm"]), _accountant(r), r["target_epsilon"] or 0)):
        spent = f"{r['max_epsilon']:.3f}" if r["max_epsilon"] is not None else "-"
        target = f"{r['target_epsilon']:g}" if r["target_epsilon"] is not None else "∞"
        sigma = r["noise_multiplier"].get("large")
        lines.append(
            f"| {ARMS[r['arm']]} | {_accountant(r) if r['target_epsilon'] else '-'} | {target} | {spent} | "
            f"{f'{sigma:.3f}' if sigma else '-'} | {r['small_recall']:.3f} | {r['small_precision']:.3f} | {r['small_auroc']:.4f} |"
        )
    return "\n".join(lines)


def _accountant(result: dict) -> str:
    return result.get("accountant", "rdp")


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    baseline = next((r for r in results if r["arm"] == "none"), None)
    for ax, metric, label in ((axes[0], "small_recall", "recall"), (axes[1], "small_auroc", "AUROC")):
        for arm in ("all", "small", "large"):
            for accountant in ("rdp", "prv"):
                rows = sorted(
                    (r for r in results if r["arm"] == arm and _accountant(r) == accountant),
                    key=lambda r: r["target_epsilon"],
                )
                if rows:
                    ax.plot(
                        [r["target_epsilon"] for r in rows],
                        [r[metric] for r in rows],
                        marker="o",
                        linestyle="-" if accountant == "rdp" else ":",
                        label=f"{ARMS[arm]} ({accountant.upper()})",
                    )
        if baseline is not None:
            ax.axhline(baseline[metric], color="grey", linestyle="--", label=ARMS["none"])
        ax.set_xscale("log")
        epsilons = sorted({r["target_epsilon"] for r in results if r["target_epsilon"] is not None})
        ax.minorticks_off()
        ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
        ax.set_xlabel("target ε (δ = 1e-5)")
        ax.set_ylabel(f"small hospitals' mean {label}")
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=["none", "small", "all"], choices=list(ARMS))
    parser.add_argument("--title", default="Study B with DP-SGD: small hospitals' test data (lightning-fed, measured)")
    parser.add_argument("--epsilons", nargs="+", type=float, default=[0.2, 0.5, 1, 2, 4, 8])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--accountant", choices=["rdp", "prv"], default="rdp", help="calibrates the noise for the target ε"
    )
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default="runs/privacy/results.json")
    parser.add_argument("--png", default="docs/privacy.png")
    args = parser.parse_args()

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: list[dict] = json.loads(out.read_text()) if out.is_file() else []
    done = {(r["arm"], r["target_epsilon"], _accountant(r)) for r in results}
    for arm in args.arms:
        for epsilon in [None] if arm == "none" else args.epsilons:
            if (arm, epsilon, args.accountant) in done or (epsilon is None and (arm, None, "rdp") in done):
                continue
            result = run_one(args, arm, epsilon)
            results.append(result)
            out.write_text(json.dumps(results, indent=1))  # each finished run is kept, whatever happens next
            print(
                f"{arm:5s} ε={epsilon}: recall {result['small_recall']:.3f} AUROC {result['small_auroc']:.4f} "
                f"spent {result['max_epsilon']} ({result['seconds']} s)",
                flush=True,
            )
    print()
    print(table(results))
    try:
        plot([r for r in results if r["arm"] in args.arms or r["arm"] == "none"], Path(args.png), args.title)
        print(f"plot written to {args.png}")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')")


if __name__ == "__main__":
    main()
