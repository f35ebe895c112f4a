"""A model for each hospital, measured on a recipe's real or simulated hospitals.

For each seed, one federation of the recipe (its data, model and rounds; seed and data seed set to the seed) gives
every model this project can deploy at a hospital:

- ``global``: the recipe's rule's model (FedAvg; FedFBN for ``partial``);
- ``personal``: Ditto's personal model (``aggregator="ditto"`` over the recipe's rule, λ = ``--lam``), trained
  beside the shared one;
- ``fine_tuned``: the global model fine-tuned for ``--fine-tune-epochs`` epochs at the hospital;
- ``local``: the hospital's own model, trained alone for the run's length (``Deployment(local_baseline=True)``);
- ``deployed``: the one of those four the hospital chose on its validation split (``--metric``), with its
  temperature (classifiers only).

Ditto's shared model is its rule's (the personal step never touches it), so one run gives all five. Every model is
tested at each hospital on that hospital's test split. Prints per hospital the mean ± std over seeds of each reported
metric of each model, how often each model was deployed, and (classifiers) the deployed model's expected
calibration error before and after temperature scaling.

    python benchmarks/personalisation.py --recipe heart --seeds 0 1 2 3 4 [--metric loss] --json out.json
    python benchmarks/personalisation.py --recipe ct --seeds 0 1 2 --json out.json
    python benchmarks/personalisation.py --recipe partial --seeds 0 1 2 --json out.json

``heart``: ``recipes/heart_disease.yaml`` (UCI heart disease, four real hospitals), each hospital split
train/val/test 50/20/30 %. ``ct``: ``recipes/ct_vendors.yaml`` (study C: ten simulated CT hospitals, Dice).
``partial``: ``recipes/partial_labels.yaml`` (seed D: four sites, each annotating 6 of 10 labels, FedFBN over a
pretrained ResNet-10t), 20 % of each site's training mosaics held out for validation; macro AUROC over the labels
with positives and negatives. Its pretrained weights are made first if missing (``lightning_fed.models.pretrain``).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODELS = ("global", "personal", "fine_tuned", "local", "deployed")
MERGED = "_merged"  # a run's entry for every hospital's test data together
GROUPED = re.compile(r"^fl/test_dice_[a-z0-9_]+$")  # per vendor
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Recipe:
    config: str
    overrides: tuple[str, ...]  # what the recipe needs here beyond its file (a validation split, ...)
    reported: tuple[str, ...]  # the metrics the tables show
    metric: str  # what the hospitals choose by, unless --metric says otherwise
    rule: str = "fedavg"  # the recipe's own rule: Ditto's shared model is trained by it
    weights: str | None = None  # pretrained weights the recipe reads, made by lightning_fed.models.pretrain if missing


RECIPES = {
    "heart": Recipe(
        "recipes/heart_disease.yaml",
        ("--data.init_args.val_fraction=0.2", "--data.init_args.test_fraction=0.3"),
        ("auroc", "accuracy"),
        "auroc",
    ),
    "ct": Recipe("recipes/ct_vendors.yaml", (), ("dice",), "dice"),
    "partial": Recipe(
        "recipes/partial_labels.yaml",
        ("--data.init_args.val_fraction=0.2",),
        ("auroc",),
        "auroc",
        rule="fedfbn",
        weights="runs/weights/resnet10t-fashion.pth",
    ),
}


def run(recipe: Recipe, seed: int, root: str, lam: float, fine_tune_epochs: int, metric: str) -> dict[str, Any]:
    from lightning_fed.lightning_cli import FederatedCLI

    args = [
        "--config",
        str(REPO / recipe.config),
        *recipe.overrides,
        f"--seed_everything={seed}",
        f"--data.init_args.seed={seed}",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.strategy.init_args.aggregator=ditto",
        f"--trainer.strategy.init_args.aggregator_kwargs={{lam: {lam}, rule: {recipe.rule}}}",
        f"--trainer.strategy.init_args.fine_tune_epochs={fine_tune_epochs}",
        f"--trainer.strategy.init_args.deployment={{metric: {metric}, local_baseline: true}}",
        "--trainer.strategy.init_args.progress=false",
        "--trainer.strategy.init_args.checkpoint_every=0",
    ]
    cli = FederatedCLI(args=args, run=False, save_config_callback=None, parser_kwargs={"prog": "personalisation"})
    trainer, strategy = cli.trainer, cli.trainer.strategy
    try:
        trainer.fit(cli.model, datamodule=cli.datamodule)
        trainer.test(datamodule=cli.datamodule, verbose=False)
    finally:
        strategy.shutdown()
    evaluation, fit = strategy.last_evaluation, strategy.last_fit
    out = {}
    for site in evaluation.sites:
        tested = {"global": evaluation.sites[site].values}
        tested.update({kind: e.sites[site].values for kind, e in evaluation.personal.items()})
        deployment = fit.sites[site].deployment
        out[site] = {
            **{f"{m}_{r}": tested[m][r] for m in MODELS for r in recipe.reported},
            **{f"{m}_auroc_per_label": tested[m].get("auroc_per_label") for m in MODELS},
            "chosen": deployment.chosen,
            "validation": deployment.validation,
            "temperature": deployment.temperature,
            "ece": tested["deployed"].get("ece"),
            "ece_calibrated": tested["deployed"].get("ece_calibrated"),
        }
    annotated = getattr(cli.datamodule, "annotated_labels", None)  # partial labels: the labels each site annotates
    for k, site in enumerate(evaluation.sites):
        out[site]["annotated"] = list(annotated[k]) if annotated else []
    # every hospital's test data merged, per group (CT: vendor), for each model: Dice from summed pixel counts
    everyone = {"global": evaluation.federated, **{k: e.federated for k, e in evaluation.personal.items()}}
    out[MERGED] = {
        m: {k.removeprefix("fl/test_"): v for k, v in everyone[m].items() if GROUPED.match(k) and isinstance(v, float)}
        for m in MODELS
    }
    return out


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def label_split(run: dict[str, Any], site: str, model: str) -> tuple[float | None, float | None]:
    """A site's macro test AUROC over the labels it annotates, and over those it does not (labels without both
    classes in its test data left out)."""
    per_label = run[site].get(f"{model}_auroc_per_label") or []
    annotated = set(run[site]["annotated"])
    own = [v for i, v in enumerate(per_label) if v is not None and i in annotated]
    other = [v for i, v in enumerate(per_label) if v is not None and i not in annotated]
    return (statistics.fmean(own) if own else None, statistics.fmean(other) if other else None)


def annotated_table(runs: list[dict[str, Any]], sites: list[str]) -> list[str]:
    lines = ["\ntest auroc on the labels each site annotates / does not annotate (what its validation cannot see)"]
    head = f"{'hospital':<13}" + "".join(f"{m:>24}" for m in MODELS)
    lines += [head, "-" * len(head)]
    for site in sites:
        cells = []
        for m in MODELS:
            split = [label_split(r, site, m) for r in runs]
            own, other = [a for a, _ in split if a is not None], [b for _, b in split if b is not None]
            cells.append(f"{statistics.fmean(own):.3f} / {statistics.fmean(other):.3f}" if own and other else "-")
        lines.append(f"{site:<13}" + "".join(f"{c:>24}" for c in cells))
    return lines


def tables(runs: list[dict[str, dict[str, Any]]], reported: tuple[str, ...], metric_chosen_by: str) -> str:
    sites = [s for s in runs[0] if s != MERGED]
    lines = []
    for metric in reported:
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
    if any(r[s].get("annotated") for r in runs for s in sites):
        lines += annotated_table(runs, sites)
    groups = sorted({g for r in runs for m in MODELS for g in r[MERGED][m]})
    if groups:
        head = f"{'model':<13}" + "".join(f"{g.removeprefix('dice_'):>17}" for g in groups)
        lines += ["\ntest dice per vendor, every hospital's test data merged", head, "-" * len(head)]
        for m in MODELS:
            cells = "".join(f"{fmt([r[MERGED][m][g] for r in runs if g in r[MERGED][m]]):>17}" for g in groups)
            lines.append(f"{m:<13}{cells}")
    lines += [
        f"\ndeployed (chosen on each hospital's validation {metric_chosen_by}), and its calibration on the test split"
    ]
    head = f"{'hospital':<13}{'chosen (seeds)':<46}{'ECE before':>16}{'ECE after':>16}{'temperature':>16}"
    lines += [head, "-" * len(head)]
    for site in sites:
        counts = collections.Counter(r[site]["chosen"] for r in runs)
        chosen = ", ".join(f"{m} {n}" for m, n in counts.most_common())
        eces = [r[site]["ece"] for r in runs if r[site]["ece"] is not None]
        after = [r[site]["ece_calibrated"] for r in runs if r[site]["ece_calibrated"] is not None]
        temps = [r[site]["temperature"] for r in runs if r[site]["temperature"] is not None]
        lines.append(f"{site:<13}{chosen:<46}{fmt(eces):>16}{fmt(after):>16}{fmt(temps):>16}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="heart")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--lam", type=float, default=0.1, help="Ditto's λ")
    parser.add_argument("--fine-tune-epochs", type=int, default=5)
    parser.add_argument(
        "--metric", default=None, help="what the hospitals choose by on validation (default: the recipe's)"
    )
    parser.add_argument(
        "--data",
        default=os.environ.get("LIGHTNING_FED_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")),
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ["LIGHTNING_FED_DATA"] = str(Path(args.data).resolve())
    recipe = RECIPES[args.recipe]
    metric = args.metric or recipe.metric
    os.chdir(REPO)  # the recipes' relative paths (pretrained weights) are the repository's
    if recipe.weights is not None and not Path(recipe.weights).is_file():
        import subprocess
        import sys

        subprocess.run(
            [sys.executable, "-m", "lightning_fed.models.pretrain", "--backbone", "resnet10t", "--out", recipe.weights],
            check=True,
        )
    import lightning  # noqa: F401  (before quietening its loggers: it sets their levels itself)

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    from lightning_fed import warm_workers

    runs = []
    t0 = time.perf_counter()
    with warm_workers(), tempfile.TemporaryDirectory(prefix="personalisation-") as root:
        for seed in args.seeds:
            t = time.perf_counter()
            runs.append(run(recipe, seed, str(Path(root) / str(seed)), args.lam, args.fine_tune_epochs, metric))
            chosen = {s: r["chosen"] for s, r in runs[-1].items() if s != MERGED}
            print(f"[seed {seed}] deployed {chosen} ({time.perf_counter() - t:.1f} s)", flush=True)
    report = {"recipe": args.recipe, "seeds": args.seeds, "lam": args.lam, "metric": metric, "runs": runs}
    if args.json is not None:  # the raw figures first: a table that fails to print loses nothing
        args.json.write_text(json.dumps(report, indent=2))
    text = tables(runs, recipe.reported, metric)
    print(text)
    print(f"\ntotal wall: {time.perf_counter() - t0:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps({**report, "tables": text}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
