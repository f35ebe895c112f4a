"""FLamby's published figures for Fed-Heart-Disease and Fed-TCGA-BRCA, and where ``benchmarks/flamby.py``'s protocol
differs from the one that produced them. Data only: the benchmark reads it."""

from __future__ import annotations

import statistics

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
    "FedAvg + fine-tune: FLamby's personalisation example builds its initial model before seeding (so its initial "
    "weights follow the process's random state), here they are seeded as for every other arm; its fine-tuning, like "
    "lightning-fed's, continues each client's own optimizer (plain SGD: no state to carry).",
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

# FLamby's personalisation example (owkin/FLamby @ edacf54, flamby/personalization_example/compare_fedavg_vs_perso.py
# and its results_perso_vs_normal.csv): Fed-Heart-Disease, FedAvg with SGD at 0.00316227, 15 rounds of 100 updates,
# then 100 fine-tuning updates at every centre; "perf" is the mean over the centres' test sets, of the global model
# (finetune False) or of each centre's fine-tuned model on its own test set (finetune True), seeds 42-46
FLAMBY_PERSONALISATION_CSV = "flamby/personalization_example/results_perso_vs_normal.csv"
PERSONALISATION_LR = 0.00316227
PERSONALISATION_PERF = {
    "FedAvg (lr 0.0032)": (
        0.7110432872371074,
        0.6986189138576778,
        0.7104691851531739,
        0.7368001536540862,
        0.7319300393738596,
    ),
    "FedAvg + fine-tune": (
        0.7478488427926631,
        0.7243133583021223,
        0.7316497407087295,
        0.7368001536540862,
        0.7347390281379046,
    ),
}
PUBLISHED["heart"].update(
    {
        method: {
            "centres": {
                "mean": statistics.fmean(perf),
                "std": statistics.stdev(perf),
                "min": min(perf),
                "max": max(perf),
            }
        }
        for method, perf in PERSONALISATION_PERF.items()
    }
)
