"""FLamby's benchmark of Fed-Heart-Disease and Fed-TCGA-BRCA, run with lightning-fed, beside FLamby's published results.

For each dataset and seed, with FLamby's settings (``owkin/FLamby`` @ edacf54, ``flamby/benchmarks/fed_benchmark.py``,
``config_heart_disease.json``, ``config_tcga_brca.json`` and each dataset's ``common.py``):

- ``Pooled``: a plain Lightning Trainer on every centre's training data (``pooled=True``), Adam at FLamby's pooled
  learning rate for its pooled epochs (heart: 1e-3, 50 epochs; TCGA: 0.1, 30 epochs);
- ``Local <site>``: each centre alone, as FLamby's "Local k": the same Adam and epochs on the centre's own training
  data (``aggregator="local"``, one round of all the epochs, so each centre runs its own number of steps);
- the seven strategies (FedAvg, FedProx, Scaffold, FedAdam, FedYogi, FedAdagrad, Cyclic): SGD at the strategy's
  client learning rate, ``sync_every_steps=100`` (FLamby's ``num_updates``) for FLamby's number of rounds
  (heart 15, TCGA 5), ``Trainer(max_steps=rounds * 100)``;
- ``FedAvg + fine-tune`` (heart only), FLamby's personalisation example: FedAvg with SGD at 0.00316227 for 15 rounds
  of 100 updates (row ``FedAvg (lr 0.0032)``, the global model), then ``fine_tune_steps=100`` at every centre; each
  centre's fine-tuned model (read from the checkpoint the site wrote) is tested on that centre's test set only, so it
  has no pooled-test figure.
- ``Ditto`` (heart only, not in FLamby): the same FedAvg run with Ditto's personal model beside it (λ 0.1) at every
  centre. The personal models never leave their sites: ``trainer.test`` tests each at its own centre, inside the
  site, with the same accuracy (probability > 0.5); the shared model (row ``FedAvg (Ditto's shared)``) is tested here.

Every model starts from the same weights within a seed (``torch.manual_seed(seed)``, then the linear layer, as
FLamby builds its one ``global_init``). Each model is then tested in this process as FLamby tests it: the metric
(accuracy, probability > 0.5, for heart disease; Harrell's C-index for TCGA) on every centre's whole test set, and
on the pooled test set (``pooled=True``: for heart disease standardised with the pooled training statistics, as
FLamby's "Pooled Test" is). The federated C-index lightning-fed reports (the sample-weighted mean of the sites'
values) is not used: the pooled test set's C-index compares pairs across centres.

    LIGHTNING_FED_DATA=/path/to/data python benchmarks/flamby.py                     # both datasets, seeds 42..46
    python benchmarks/flamby.py --dataset heart --seeds 42 --json /tmp/flamby.json

Prints a line per run, then per dataset a table: our mean ± std over seeds (pooled test; mean over the centres'
test sets) beside FLamby's published ones (``flamby_published.py``, from its results CSVs), and wall seconds per
arm (all seeds). All federations run inside one ``lightning_fed.warm_workers()`` block.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from flamby_published import (  # beside this file
    DIFFERENCES,
    FLAMBY_CSVS,
    FLAMBY_PERSONALISATION_CSV,
    PERSONALISATION_LR,
    PUBLISHED,
)

STRATEGIES = ("FedAvg", "FedProx", "Scaffold", "FedAdam", "FedYogi", "FedAdagrad", "Cyclic")
NUM_UPDATES = 100  # FLamby's run_num_updates


@dataclass(frozen=True)
class Setting:
    """One dataset's benchmark as FLamby's common.py and config json set it."""

    title: str
    metric: str
    rounds: int  # get_nb_max_rounds(100)
    pooled_lr: float
    pooled_epochs: int
    strategies: dict[str, tuple[str, float, dict[str, Any]]] = field(default_factory=dict)  # name: rule, lr, kwargs


def _adaptive(server_lr: float) -> dict[str, Any]:
    return {"eta": server_lr, "beta1": 0.9, "beta2": 0.999, "tau": 1e-8}


def _adagrad(server_lr: float) -> dict[str, Any]:
    return {"eta": server_lr, "beta1": 0.9, "tau": 1e-8}  # Adagrad keeps every squared update: no beta2


SETTINGS = {
    "heart": Setting(
        "Fed-Heart-Disease",
        "accuracy",
        rounds=(486 // 4 // 4) * 50 // NUM_UPDATES,  # 15
        pooled_lr=1e-3,
        pooled_epochs=50,
        strategies={
            "FedAvg": ("fedavg", 0.001, {}),
            "FedProx": ("fedprox", 0.001, {"mu": 0.01}),
            "Scaffold": ("scaffold", 0.001, {"eta_g": 1.0}),
            "FedAdam": ("fedadam", 0.01, _adaptive(0.01)),
            "FedYogi": ("fedyogi", 0.003162, _adaptive(0.01)),
            "FedAdagrad": ("fedadagrad", 0.003162, _adagrad(0.316228)),
            "Cyclic": ("cyclic", 0.01, {"deterministic_cycle": False}),
        },
    ),
    "tcga": Setting(
        "Fed-TCGA-BRCA",
        "C-index",
        rounds=(866 // 6 // 8) * 30 // NUM_UPDATES,  # 5
        pooled_lr=0.1,
        pooled_epochs=30,
        strategies={
            "FedAvg": ("fedavg", 0.1, {}),
            "FedProx": ("fedprox", 0.1, {"mu": 0.1}),
            "Scaffold": ("scaffold", 0.01, {"eta_g": 1.0}),
            "FedAdam": ("fedadam", 0.01, _adaptive(0.1)),
            "FedYogi": ("fedyogi", 0.01, _adaptive(0.1)),
            "FedAdagrad": ("fedadagrad", 0.01, _adagrad(1.0)),
            "Cyclic": ("cyclic", 0.01, {"deterministic_cycle": False}),
        },
    ),
}


# -- models and test sets --------------------------------------------------------------------------------------
def datamodule(dataset: str, **kwargs: Any) -> Any:
    from lightning_fed.data.flamby import FedHeartDisease, FedTcgaBrca

    return (FedHeartDisease if dataset == "heart" else FedTcgaBrca)(**kwargs)


def new_model(dataset: str, optimizer: str, lr: float, init: dict | None = None) -> Any:
    from lightning_fed.models.survival import CoxModel, LogisticRegression

    model = (LogisticRegression if dataset == "heart" else CoxModel)(optimizer=optimizer, lr=lr)
    if init is not None:
        model.load_state_dict(init)
    return model


def test_sets(dataset: str) -> dict[str, tuple]:
    """Every centre's test set (standardised as that centre's site is) and the pooled one, as tensors."""
    sites = [s.name for s in datamodule(dataset).federated_sites()]
    out = {}
    for name, centres in [(s, [s]) for s in sites] + [("pooled", sites)]:
        dm = datamodule(dataset, centres=centres, pooled=True)
        dm.prepare_data()
        dm.setup("test")
        out[name] = dm.datasets["test"].tensors
    return out


def scorer(dataset: str) -> Callable[[Any, tuple], float]:
    import torch

    from lightning_fed.models.survival import concordance_index

    def score(model: Any, tensors: tuple) -> float:
        model.eval()
        with torch.no_grad():
            out = model(tensors[0]).reshape(-1)
        if dataset == "heart":  # FLamby: probability above 0.5
            return float(((out.sigmoid() > 0.5) == (tensors[1] > 0.5)).float().mean())
        return concordance_index(out, tensors[1], tensors[2])

    return score


def to_torch(weights: dict) -> dict:
    import torch

    return {k: torch.from_numpy(v.copy()) for k, v in weights.items()}


# -- the arms --------------------------------------------------------------------------------------------------
def _trainer(root: str, strategy: Any = None, **limits: Any) -> Any:
    import lightning as L

    return L.Trainer(
        strategy=strategy if strategy is not None else "auto",
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **limits,
    )


def run_pooled(dataset: str, s: Setting, seed: int, init: dict, root: str) -> dict:
    from lightning import seed_everything

    seed_everything(seed, verbose=False)  # FLamby: set_seed(seed) before the pooled training
    model = new_model(dataset, "adam", s.pooled_lr, init)
    _trainer(root, max_epochs=s.pooled_epochs).fit(model, datamodule=datamodule(dataset, pooled=True))
    return {"Pooled": model}


def run_local(dataset: str, s: Setting, seed: int, init: dict, root: str) -> dict:
    from lightning_fed import FederatedStrategy

    # one round of all the epochs: every centre runs its own epochs (FLamby's Local k), nothing is exchanged
    strategy = FederatedStrategy(
        aggregator="local", sync_every=s.pooled_epochs, seed=seed, progress=False, checkpoint_every=0
    )
    model = new_model(dataset, "adam", s.pooled_lr, init)
    try:
        _trainer(root, strategy, max_epochs=s.pooled_epochs).fit(model, datamodule=datamodule(dataset))
        weights = strategy.federation.site_weights()
    finally:
        strategy.shutdown()
    return {
        f"Local {site}": new_model(dataset, "adam", s.pooled_lr, to_torch(state)) for site, state in weights.items()
    }


def run_strategy(name: str) -> Callable[..., dict]:
    def run(dataset: str, s: Setting, seed: int, init: dict, root: str) -> dict:
        from lightning_fed import FederatedStrategy
        from lightning_fed.strategies import get_aggregator

        rule, lr, kwargs = s.strategies[name]
        kwargs = {**kwargs, "seed": seed} if rule == "cyclic" else kwargs  # FLamby: default_rng(seed)
        aggregator = get_aggregator(rule, **kwargs)
        strategy = FederatedStrategy(
            aggregator=aggregator, sync_every_steps=NUM_UPDATES, seed=seed, progress=False, checkpoint_every=0
        )
        model = new_model(dataset, "sgd", lr, init)
        try:
            trainer = _trainer(root, strategy, max_steps=s.rounds * NUM_UPDATES)
            trainer.fit(model, datamodule=datamodule(dataset))
        finally:
            strategy.shutdown()
        return {name: model}  # the driver's module holds the last global model

    return run


def run_fine_tuned(dataset: str, s: Setting, seed: int, init: dict, root: str) -> dict:
    """FedAvg at the personalisation example's rate, then 100 fine-tuning updates per centre: the global model, and
    each centre's fine-tuned model as ``{centre: model}`` (tested at its own centre only)."""
    import torch

    from lightning_fed import FederatedStrategy

    strategy = FederatedStrategy(
        sync_every_steps=NUM_UPDATES, fine_tune_steps=NUM_UPDATES, seed=seed, progress=False, checkpoint_every=0
    )
    model = new_model(dataset, "sgd", PERSONALISATION_LR, init)
    try:
        _trainer(root, strategy, max_steps=s.rounds * NUM_UPDATES).fit(model, datamodule=datamodule(dataset))
    finally:
        strategy.shutdown()
    assert strategy.last_fit is not None
    tuned = {}
    for site, fit in strategy.last_fit.sites.items():
        assert fit.fine_tuning is not None and fit.fine_tuning.steps == NUM_UPDATES
        state = torch.load(fit.fine_tuning.checkpoint, map_location="cpu", weights_only=False)["state_dict"]
        tuned[site] = new_model(dataset, "sgd", PERSONALISATION_LR, state)
    return {"FedAvg (lr 0.0032)": model, "FedAvg + fine-tune": tuned}


DITTO_LAMBDA = 0.1


def run_ditto(dataset: str, s: Setting, seed: int, init: dict, root: str) -> dict:
    """FedAvg at the personalisation example's rate with Ditto's personal model beside it: the shared model, and each
    centre's personal model's accuracy at its own centre as ``{centre: accuracy}`` (tested inside the site)."""
    from lightning_fed import FederatedStrategy

    strategy = FederatedStrategy(
        aggregator="ditto",
        aggregator_kwargs={"lam": DITTO_LAMBDA},
        sync_every_steps=NUM_UPDATES,
        seed=seed,
        progress=False,
        checkpoint_every=0,
    )
    model = new_model(dataset, "sgd", PERSONALISATION_LR, init)
    try:
        trainer = _trainer(root, strategy, max_steps=s.rounds * NUM_UPDATES)
        trainer.fit(model, datamodule=datamodule(dataset))
        trainer.test(datamodule=datamodule(dataset), verbose=False)
    finally:
        strategy.shutdown()
    assert strategy.last_evaluation is not None
    personal = strategy.last_evaluation.personal["personal"]
    return {
        "FedAvg (Ditto's shared)": model,
        f"Ditto personal (λ {DITTO_LAMBDA:g})": {c: float(e.values["accuracy"]) for c, e in personal.sites.items()},
    }


ARMS = ("Pooled", "Local", *STRATEGIES, "FineTune", "Ditto")
PERSONAL_ONLY = ("FineTune", "Ditto")  # FLamby's personalisation example is on Fed-Heart-Disease only


def arm(name: str) -> Callable[..., dict]:
    runs = {"Pooled": run_pooled, "Local": run_local, "FineTune": run_fine_tuned, "Ditto": run_ditto}
    return runs.get(name) or run_strategy(name)


# -- the report ------------------------------------------------------------------------------------------------
def summary(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if v == v]  # a centre without a comparable pair has no C-index
    return {
        "mean": statistics.fmean(finite) if finite else float("nan"),
        "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
    }


def fmt(stat: dict | None) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}" if stat and stat["mean"] == stat["mean"] else "-"


def within(ours: dict, theirs: dict | None) -> str:
    """``yes`` when our mean lies inside the range of FLamby's five seeds."""
    if not theirs or ours["mean"] != ours["mean"]:
        return "-"
    return "yes" if theirs["min"] <= ours["mean"] <= theirs["max"] else "no"


def table(dataset: str, results: dict[str, dict], walls: dict[str, float], seeds: list[int]) -> str:
    s, published = SETTINGS[dataset], PUBLISHED[dataset]
    centres = [name.removeprefix("Local ") for name in results if name.startswith("Local ")]
    head = (
        f"{'arm':<22} {'pooled test: ours':>17} {'FLamby':>13} {'in':>3}   "
        f"{'mean over centres: ours':>23} {'FLamby':>13} {'in':>3} {'wall s':>7}"
    )
    lines = [
        f"\n{s.title}: {s.metric}, mean ± std over seeds {' '.join(map(str, seeds))}; FLamby: its seeds 42-46 "
        f"('in': our mean within the min-max of FLamby's seeds)",
        head,
        "-" * len(head),
    ]
    for name, row in results.items():
        local = name.startswith("Local ")
        key = f"Local {centres.index(name.removeprefix('Local '))}" if local else name  # FLamby's Local k
        theirs = published.get(key, {})
        ours = {column: summary(row[column]) for column in ("pooled", "centres")}
        wall = walls.get("Local", 0.0) if name == f"Local {centres[0] if centres else ''}" else walls.get(name)
        wall = walls.get("FineTune") if name == "FedAvg (lr 0.0032)" else wall
        wall = walls.get("Ditto") if name == "FedAvg (Ditto's shared)" else wall
        lines.append(
            f"{name:<22} {fmt(ours['pooled']):>17} {fmt(theirs.get('pooled')):>13} "
            f"{within(ours['pooled'], theirs.get('pooled')):>3}   {fmt(ours['centres']):>23} "
            f"{fmt(theirs.get('centres')):>13} {within(ours['centres'], theirs.get('centres')):>3} "
            f"{'' if wall is None else f'{wall:.1f}':>7}"
        )
    if centres:
        lines.append(f"(Local: one wall time for the {len(centres)} centres together)")
    if "FedAvg + fine-tune" in results:
        lines.append(
            "(FedAvg (lr 0.0032) and FedAvg + fine-tune: one run, FLamby's personalisation example "
            f"({FLAMBY_PERSONALISATION_CSV}); a fine-tuned model is tested at its own centre only)"
        )
    if "FedAvg (Ditto's shared)" in results:
        lines.append(
            "(Ditto: not in FLamby; one run at the personalisation example's rate, each personal model tested at its "
            "own centre inside its site)"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("heart", "tcga", "both"), default="both")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44, 45, 46])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="default: every arm")
    parser.add_argument(
        "--data",
        default=os.environ.get("LIGHTNING_FED_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")),
        help="the folder holding heart_disease/ and fed_tcga_brca/ (default: $LIGHTNING_FED_DATA, else ../shared/data)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every run's figures and the tables here")
    args = parser.parse_args()
    os.environ["LIGHTNING_FED_DATA"] = str(Path(args.data).resolve())  # read by the sites, in their workers too
    import lightning  # noqa: F401  (imported before its loggers are quietened: it sets their levels itself)
    import torch

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available" banner per Trainer

    from lightning_fed import warm_workers

    datasets = ["heart", "tcga"] if args.dataset == "both" else [args.dataset]
    report: dict[str, Any] = {
        "seeds": args.seeds,
        "flamby_sources": {**FLAMBY_CSVS, "personalisation": FLAMBY_PERSONALISATION_CSV},
        "differences": DIFFERENCES,
    }
    tables = []
    t_start = time.perf_counter()
    with warm_workers(), tempfile.TemporaryDirectory(prefix="flamby-bench-") as root:
        for dataset in datasets:
            s, score = SETTINGS[dataset], scorer(dataset)
            tests = test_sets(dataset)
            centres = [k for k in tests if k != "pooled"]
            results: dict[str, dict[str, list]] = {}
            walls: dict[str, float] = {}
            for seed in args.seeds:
                torch.manual_seed(seed)  # FLamby: set_seed(seed), then the one global_init every method copies
                init = copy.deepcopy(new_model(dataset, "sgd", 0.0).state_dict())
                for name in args.arms:
                    t0 = time.perf_counter()
                    if name in PERSONAL_ONLY and dataset != "heart":
                        continue
                    models = arm(name)(dataset, s, seed, init, root)
                    took = time.perf_counter() - t0
                    walls[name] = walls.get(name, 0.0) + took
                    for label, model in models.items():
                        personal = isinstance(model, dict)  # each centre's own model, tested at its centre only
                        per_centre = {
                            c: model[c]
                            if personal and isinstance(model[c], float)
                            else score(model[c] if personal else model, tests[c])
                            for c in centres
                        }  # a personal model's score comes from its site when the model never left it
                        row = results.setdefault(label, {"pooled": [], "centres": [], "per_centre": []})
                        row["pooled"].append(float("nan") if personal else score(model, tests["pooled"]))
                        row["centres"].append(statistics.fmean(v for v in per_centre.values() if v == v))
                        row["per_centre"].append(per_centre)
                        print(
                            f"[{dataset} seed {seed}] {label:<22} pooled test {row['pooled'][-1]:.3f}  "
                            f"mean over centres {row['centres'][-1]:.3f}  ({took:.1f} s)",
                            flush=True,
                        )
            tables.append(table(dataset, results, walls, args.seeds))
            report[dataset] = {"results": results, "wall_seconds": walls, "published": PUBLISHED[dataset]}
    print("\n".join(tables))
    print(f"\ntotal wall: {time.perf_counter() - t_start:.0f} s")
    print("\nWhere this protocol differs from FLamby's:")
    for line in DIFFERENCES:
        print(f"- {line}")
    if args.json is not None:
        report["tables"] = tables
        args.json.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
