"""A model for each hospital, measured on UCI heart disease's four real hospitals (the recipe's data and model).

For each seed, one federation (``recipes/heart_disease.yaml``'s MLP, 30 epochs of FedAvg, each hospital split
train/val/test 50/20/30 % with its own seed) gives every model this project can deploy at a hospital:

- ``global``: the FedAvg model;
- ``personal``: Ditto's personal model (``aggregator="ditto"``, λ = ``--lam``), trained beside the shared one;
- ``fine_tuned``: the global model fine-tuned for ``--fine-tune-epochs`` epochs at the hospital;
- ``local``: the hospital's own model, trained alone for the same 30 epochs (``Deployment(local_baseline=True)``);
- ``deployed``: the one of those four the hospital chose on its validation split (AUROC), with its temperature.

Ditto's shared model is FedAvg's (the personal step never touches it), so one run gives all five. Every model is
tested at each hospital on that hospital's test split. Prints per hospital the mean ± std over seeds of the test
AUROC and accuracy of each model, how often each model was deployed, and the expected calibration error of the
deployed model before and after temperature scaling.

    LIGHTNING_FED_DATA=/path/to/data python benchmarks/personalisation.py --seeds 0 1 2 3 4 --json out.json
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

MODELS = ("global", "personal", "fine_tuned", "local", "deployed")


def run(seed: int, root: str, lam: float, fine_tune_epochs: int, metric: str) -> dict[str, dict[str, Any]]:
    import lightning as L

    from lightning_fed import Deployment, FederatedStrategy
    from lightning_fed.data import HeartDiseaseSites
    from lightning_fed.models import TabularMLP

    L.seed_everything(seed, verbose=False)
    data = HeartDiseaseSites(test_fraction=0.3, val_fraction=0.2, batch_size=32, seed=seed)
    strategy = FederatedStrategy(
        aggregator="ditto",
        aggregator_kwargs={"lam": lam},
        fine_tune_epochs=fine_tune_epochs,
        deployment=Deployment(metric=metric, local_baseline=True),
        seed=seed,
        progress=False,
        checkpoint_every=0,
    )
    trainer = L.Trainer(
        strategy=strategy,
        max_epochs=30,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    try:
        trainer.fit(TabularMLP(in_features=13, hidden=[32, 16], lr=0.003), datamodule=data)
        trainer.test(datamodule=data, verbose=False)
    finally:
        strategy.shutdown()
    evaluation, fit = strategy.last_evaluation, strategy.last_fit
    out = {}
    for site in evaluation.sites:
        tested = {
            "global": evaluation.sites[site].values,
            **{k: e.sites[site].values for k, e in evaluation.personal.items()},
        }
        deployment = fit.sites[site].deployment
        out[site] = {
            **{f"{m}_auroc": tested[m]["auroc"] for m in MODELS},
            **{f"{m}_accuracy": tested[m]["accuracy"] for m in MODELS},
            "chosen": deployment.chosen,
            "validation": deployment.validation,
            "temperature": deployment.temperature,
            "ece": tested["deployed"].get("ece"),
            "ece_calibrated": tested["deployed"].get("ece_calibrated"),
        }
    return out


def fmt(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def tables(runs: list[dict[str, dict[str, Any]]], metric_chosen_by: str) -> str:
    sites = list(runs[0])
    lines = []
    for metric in ("auroc", "accuracy"):
        head = f"{'hospital':<13}" + "".join(f"{m:>17}" for m in MODELS)
        lines += [f"\ntest {metric}, mean ± std over {len(runs)} seeds", head, "-" * len(head)]
        for site in sites:
            lines.append(
                f"{site:<13}" + "".join(f"{fmt([r[site][f'{m}_{metric}'] for r in runs]):>17}" for m in MODELS)
            )
        lines.append(
            f"{'mean':<13}"
            + "".join(
                f"{fmt([statistics.fmean(r[s][f'{m}_{metric}'] for s in sites) for r in runs]):>17}" for m in MODELS
            )
        )
    lines += [
        f"\ndeployed (chosen on each hospital's validation {metric_chosen_by}), and its calibration on the test split"
    ]
    head = f"{'hospital':<13}{'chosen (seeds)':<46}{'ECE before':>14}{'ECE after':>14}{'temperature':>14}"
    lines += [head, "-" * len(head)]
    for site in sites:
        counts = collections.Counter(r[site]["chosen"] for r in runs)
        chosen = ", ".join(f"{m} {n}" for m, n in counts.most_common())
        eces = [r[site]["ece"] for r in runs if r[site]["ece"] is not None]
        after = [r[site]["ece_calibrated"] for r in runs if r[site]["ece_calibrated"] is not None]
        temps = [r[site]["temperature"] for r in runs if r[site]["temperature"] is not None]
        lines.append(f"{site:<13}{chosen:<46}{fmt(eces):>14}{fmt(after):>14}{fmt(temps):>14}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--lam", type=float, default=0.1, help="Ditto's λ")
    parser.add_argument("--fine-tune-epochs", type=int, default=5)
    parser.add_argument(
        "--metric", default="auroc", help="what the hospitals choose by on validation (auroc, loss, ...)"
    )
    parser.add_argument(
        "--data",
        default=os.environ.get("LIGHTNING_FED_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")),
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ["LIGHTNING_FED_DATA"] = str(Path(args.data).resolve())
    import lightning  # noqa: F401  (before quietening its loggers: it sets their levels itself)

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    from lightning_fed import warm_workers

    runs = []
    t0 = time.perf_counter()
    with warm_workers(), tempfile.TemporaryDirectory(prefix="personalisation-") as root:
        for seed in args.seeds:
            t = time.perf_counter()
            runs.append(run(seed, str(Path(root) / str(seed)), args.lam, args.fine_tune_epochs, args.metric))
            chosen = {s: r["chosen"] for s, r in runs[-1].items()}
            print(f"[seed {seed}] deployed {chosen} ({time.perf_counter() - t:.1f} s)", flush=True)
    text = tables(runs, args.metric)
    print(text)
    print(f"\ntotal wall: {time.perf_counter() - t0:.0f} s")
    if args.json is not None:
        report = {"seeds": args.seeds, "lam": args.lam, "metric": args.metric, "runs": runs, "tables": text}
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
