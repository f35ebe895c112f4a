"""FLamby's benchmark of Fed-Heart-Disease and Fed-TCGA-BRCA, run with lightning-fed, beside FLamby's published results.

For each dataset and seed, with FLamby's settings (``owkin/FLamby`` @ edacf54, ``flamby/benchmarks/fed_benchmark.py``,
``config_heart_disease.json``, ``config_tcga_brca.json`` and each dataset's ``common.py``):

- ``Pooled``: a plain Lightning Trainer on every centre's training data (``pooled=True``), Adam at FLamby's pooled
  learning rate for its pooled epochs (heart: 1e-3, 50 epochs; TCGA: 0.1, 30 epochs);
- ``Local <site>``: each centre alone, as FLamby's "Local k": the same Adam and epochs on the centre's own training
  data (``aggregator="local"``, one round of all the epochs, so each centre runs its own number of steps);
- the seven strategies (FedAvg, FedProx, Scaffold, FedAdam, FedYogi, FedAdagrad, Cyclic): SGD at the strategy's
  client learning rate, ``sync_every_steps=100`` (FLamby's ``num_updates``) for FLamby's number of rounds
  (heart 15, TCGA 5), ``Trainer(max_steps=rounds * 100)``.

Every model starts from the same weights within a seed (``torch.manual_seed(seed)``, then the linear layer, as
FLamby builds its one ``global_init``). Each model is then tested in this process as FLamby tests it: the metric
(accuracy, probability > 0.5, for heart disease; Harrell's C-index for TCGA) on every centre's whole test set, and
on the pooled test set (``pooled=True``: for heart disease standardised with the pooled training statistics, as
FLamby's "Pooled Test" is). The federated C-index lightning-fed reports (the sample-weighted mean of the sites'
values) is not used: the pooled test set's C-index compares pairs across centres.

    LIGHTNING_FED_DATA=/path/to/data python benchmarks/flamby.py                     # both datasets, seeds 42..46
    python benchmarks/flamby.py --dataset heart --seeds 42 --json /tmp/flamby.json

Prints a line per run, then per dataset a table: our mean ± std over seeds (pooled test; mean over the centres'
test sets) beside FLamby's published ones (``PUBLISHED`` below, from its results CSVs), and wall seconds per
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

DIFFERENCES = [
    "Cyclic: FLamby's Cyclic (edacf54, flamby/strategies/cyclic.py) never hands weights on: each client trains its "
    "own deep copy of the model when visited, and the benchmark tests run()[0], client 0's model, i.e. client 0 "
    "trained alone with SGD for 100 steps per visit. lightning-fed's cyclic passes the model from site to site "
    "(the published Cyclic row is not cyclic weight transfer). Both visit the sites in the same seeded order.",
    "Data order: FLamby shuffles every client from torch's one global generator after set_seed(seed); here site i "
    "draws its own batches seeded seed + i, so the batches differ (initial weights: the same recipe).",
    "Scaffold: FLamby averages the model updates weighted by samples, with its own control-variate bookkeeping; "
    "lightning-fed's scaffold is the paper's option II (uniform means of dy and dc).",
    "FedAdam/FedYogi/FedAdagrad: lightning-fed's second moment starts at tau^2 (1e-16 here), FLamby's at 0.",
    "Spread: std over seeds of each seed's value (the mean over centres for that column); FLamby's figure draws "
    "seaborn's 95 % bootstrap interval over every (centre, seed) row instead.",
]


# FLamby's published results (owkin/FLamby @ edacf54d5211520583b0133d55ac39b6fda8324b, the CSVs below; the methods
# "Pooled Training", "Local k" and "<Strategy>100"): per method, (pooled test set, mean over the centres' test sets),
# each (mean, std, min, max) over seeds 42-46 of that seed's value; std with n - 1
FLAMBY_CSVS = {
    "heart": "flamby/results/results_benchmark_fed_heart_disease/heart_seed{42..46}.csv",
    "tcga": "flamby/results/results_benchmark_fed_tcga_brca/tcga_seed{42..46}.csv",
}
PUBLISHED_ROWS = {
    "heart": {
        "Pooled": ((0.7953, 0.0028, 0.7913, 0.7992), (0.7353, 0.0027, 0.7319, 0.7391)),
        "Local 0": ((0.7843, 0.0070, 0.7756, 0.7913), (0.7221, 0.0211, 0.6938, 0.7483)),
        "Local 1": ((0.7268, 0.0129, 0.7165, 0.7480), (0.6287, 0.0169, 0.6021, 0.6490)),
        "Local 2": ((0.4827, 0.0449, 0.4213, 0.5236), (0.5670, 0.0579, 0.4964, 0.6268)),
        "Local 3": ((0.6110, 0.0393, 0.5787, 0.6614), (0.6366, 0.0386, 0.5852, 0.6747)),
        "FedAvg": ((0.7480, 0.0268, 0.7008, 0.7638), (0.6850, 0.0283, 0.6427, 0.7198)),
        "FedProx": ((0.7480, 0.0268, 0.7008, 0.7638), (0.6850, 0.0283, 0.6427, 0.7198)),
        "Scaffold": ((0.7480, 0.0268, 0.7008, 0.7638), (0.6840, 0.0280, 0.6427, 0.7198)),
        "FedAdam": ((0.7787, 0.0146, 0.7677, 0.8031), (0.7255, 0.0138, 0.7115, 0.7461)),
        "FedYogi": ((0.7787, 0.0153, 0.7598, 0.7992), (0.7314, 0.0125, 0.7194, 0.7513)),
        "FedAdagrad": ((0.7787, 0.0153, 0.7598, 0.7992), (0.7314, 0.0125, 0.7194, 0.7513)),
        "Cyclic": ((0.7850, 0.0123, 0.7717, 0.8031), (0.7180, 0.0287, 0.6751, 0.7528)),
    },
    "tcga": {
        "Pooled": ((0.7041, 0.1144, 0.5524, 0.7963), (0.6759, 0.0949, 0.5448, 0.7798)),
        "Local 0": ((0.6948, 0.0426, 0.6495, 0.7502), (0.7282, 0.0378, 0.6791, 0.7754)),
        "Local 1": ((0.7275, 0.0483, 0.6447, 0.7619), (0.7496, 0.0369, 0.6919, 0.7940)),
        "Local 2": ((0.6043, 0.0314, 0.5795, 0.6571), (0.4977, 0.0260, 0.4661, 0.5243)),
        "Local 3": ((0.5650, 0.0703, 0.4941, 0.6821), (0.6562, 0.0654, 0.6106, 0.7703)),
        "Local 4": ((0.7251, 0.0345, 0.6755, 0.7656), (0.7121, 0.0320, 0.6879, 0.7572)),
        "Local 5": ((0.7103, 0.0045, 0.7062, 0.7165), (0.6913, 0.0081, 0.6810, 0.7020)),
        "FedAvg": ((0.7353, 0.1750, 0.4227, 0.8289), (0.7319, 0.1811, 0.4081, 0.8203)),
        "FedProx": ((0.7167, 0.1621, 0.4278, 0.8084), (0.7290, 0.1683, 0.4296, 0.8283)),
        "Scaffold": ((0.6995, 0.0347, 0.6579, 0.7513), (0.6869, 0.0360, 0.6448, 0.7317)),
        "FedAdam": ((0.8421, 0.0168, 0.8209, 0.8619), (0.8152, 0.0256, 0.7769, 0.8408)),
        "FedYogi": ((0.8421, 0.0166, 0.8209, 0.8615), (0.8152, 0.0256, 0.7769, 0.8408)),
        "FedAdagrad": ((0.8338, 0.0075, 0.8242, 0.8443), (0.8129, 0.0048, 0.8088, 0.8195)),
        "Cyclic": ((0.6607, 0.0749, 0.5297, 0.7190), (0.6582, 0.0429, 0.5858, 0.6985)),
    },
}
PUBLISHED = {
    dataset: {
        method: {
            column: dict(zip(("mean", "std", "min", "max"), figures))
            for column, figures in zip(("pooled", "centres"), row)
        }
        for method, row in rows.items()
    }
    for dataset, rows in PUBLISHED_ROWS.items()
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


ARMS = ("Pooled", "Local", *STRATEGIES)


def arm(name: str) -> Callable[..., dict]:
    return {"Pooled": run_pooled, "Local": run_local}.get(name) or run_strategy(name)


# -- the report ------------------------------------------------------------------------------------------------
def summary(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if v == v]  # a centre without a comparable pair has no C-index
    return {
        "mean": statistics.fmean(finite) if finite else float("nan"),
        "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
    }


def fmt(stat: dict | None) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}" if stat else "-"


def within(ours: dict, theirs: dict | None) -> str:
    """``yes`` when our mean lies inside the range of FLamby's five seeds."""
    if not theirs:
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
        lines.append(
            f"{name:<22} {fmt(ours['pooled']):>17} {fmt(theirs.get('pooled')):>13} "
            f"{within(ours['pooled'], theirs.get('pooled')):>3}   {fmt(ours['centres']):>23} "
            f"{fmt(theirs.get('centres')):>13} {within(ours['centres'], theirs.get('centres')):>3} "
            f"{'' if wall is None else f'{wall:.1f}':>7}"
        )
    if centres:
        lines.append(f"(Local: one wall time for the {len(centres)} centres together)")
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
        "flamby_sources": FLAMBY_CSVS,
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
                    models = arm(name)(dataset, s, seed, init, root)
                    took = time.perf_counter() - t0
                    walls[name] = walls.get(name, 0.0) + took
                    for label, model in models.items():
                        per_centre = {c: score(model, tests[c]) for c in centres}
                        row = results.setdefault(label, {"pooled": [], "centres": [], "per_centre": []})
                        row["pooled"].append(score(model, tests["pooled"]))
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
