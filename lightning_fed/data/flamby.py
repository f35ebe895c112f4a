"""FLamby's Fed-Heart-Disease and Fed-TCGA-BRCA (Ogier du Terrail et al., NeurIPS 2022) as lightning-fed sites.

Each FLamby centre is a site that reads its own patients inside its own actor, with FLamby's exact train/test
split, preprocessing and batch size, so a federation here is comparable with FLamby's benchmark
(``owkin/FLamby`` @ edacf54, ``flamby/datasets/fed_heart_disease`` and ``fed_tcga_brca``). ``pooled=True`` is
FLamby's pooled baseline: one site trains on every centre's training split and tests on every test split.

- Fed-Heart-Disease: the four UCI hospitals; slope, ca and thal are dropped, patients with a missing value among
  the ten remaining attributes are dropped, chest pain (cp) and resting ECG (restecg) are one-hot encoded (first
  category dropped: 13 features); 66 % of each hospital trains (scikit-learn's ``train_test_split``, seed 43,
  stratified by label where both classes have more than two patients, as FLamby does); features are standardised
  with the training statistics of the site's own hospital (pooled: of every hospital's training split together).
  Target: heart disease present (``num > 0``) as float.
- Fed-TCGA-BRCA: 1,088 breast-cancer patients in six regions; FLamby's preprocessed ``brca.csv`` (39 features,
  not rescaled) and its static split file; target ``(event, time)``. Batches are ``(features, event, time)``:
  lightning-fed's classification metrics then read the event indicator as a binary label (the survival metric is
  the module's own C-index, :class:`~lightning_fed.models.CoxModel`).
"""

from __future__ import annotations

import csv
import os
from typing import Optional, Sequence, Union

import numpy as np
import torch

from lightning_fed.data.download import data_root, ensure_files
from lightning_fed.data.heart_disease import load_heart_disease
from lightning_fed.data.sites import Site, SiteSplits, chosen_sites, per_site
from lightning_fed.data.tensors import TensorBatches

FLAMBY_COMMIT = "edacf54d5211520583b0133d55ac39b6fda8324b"
POOLED = "pooled"

# FLamby's centres 0..3, in FLamby's order: site name -> the hospital's name in lightning_fed.data.heart_disease
HEART_CENTRES = {"cleveland": "cleveland", "hungary": "hungary", "switzerland": "switzerland", "va_long_beach": "va"}
# (train, test) patients per centre: the table in FLamby's fed_heart_disease/README.md (486 / 254 in all)
HEART_SIZES = {"cleveland": (199, 104), "hungary": (172, 89), "switzerland": (30, 16), "va_long_beach": (85, 45)}
HEART_BATCH_SIZE = 4  # FLamby fed_heart_disease/common.py BATCH_SIZE
TRAIN_FRACTION, SPLIT_SEED = 0.66, 43
# attributes 0..9 (age .. oldpeak) are kept; one-hot columns for cp (2) and restecg (6), the first category dropped:
# UCI's value sets, which are exactly the categories pandas.get_dummies finds in FLamby's concatenated table
_KEPT = 10
_ONE_HOT = {2: (1.0, 2.0, 3.0, 4.0), 6: (0.0, 1.0, 2.0)}
_NUMERIC = [c for c in range(_KEPT) if c not in _ONE_HOT]

# FLamby's regions 0..5 (fold2 train_k/test_k of the split file; names from centers.csv by TSS code)
TCGA_REGIONS = ("northeast", "south", "west", "midwest", "europe", "canada")
# (train, test) patients per region: the table in FLamby's fed_tcga_brca/README.md (866 / 222 in all)
TCGA_SIZES = {
    "northeast": (248, 63),
    "south": (156, 40),
    "west": (164, 42),
    "midwest": (129, 33),
    "europe": (129, 33),
    "canada": (40, 11),
}
TCGA_BATCH_SIZE = 8  # FLamby fed_tcga_brca/common.py BATCH_SIZE
_TCGA_RAW = f"https://raw.githubusercontent.com/owkin/FLamby/{FLAMBY_COMMIT}/flamby/datasets/fed_tcga_brca/"
# file -> (MD5 of FLamby's copy, folder it is served from)
TCGA_FILES = {
    "brca.csv": ("989df4ddec084f749d9593146d7ba92f", _TCGA_RAW),
    "train_test_split.csv": ("e648057e47463ee7763924d779cd7f2d", _TCGA_RAW + "dataset_creation_scripts/"),
}


# -- Fed-Heart-Disease -------------------------------------------------------------------------------------------
def heart_disease_centre(
    centre: str, data_dir: Optional[str] = None, download: bool = True
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """FLamby's ``"train"`` and ``"test"`` patients of one centre, in file order: ``(features float32 [n, 13],
    encoded as FLamby encodes them and not standardised, labels float32 [n] in {0, 1})``."""
    if centre not in HEART_CENTRES:
        raise ValueError(f"unknown Fed-Heart-Disease centre {centre!r}: pick from {list(HEART_CENTRES)}")
    x, y = load_heart_disease(HEART_CENTRES[centre], data_dir, download)
    complete = ~np.isnan(x[:, :_KEPT]).any(axis=1)  # FLamby drops a patient missing any of the kept attributes
    x, y = x[complete, :_KEPT], y[complete]
    columns = [x[:, _NUMERIC]]
    for col, categories in _ONE_HOT.items():
        unknown = sorted(set(np.unique(x[:, col]).tolist()) - set(categories))
        if unknown:
            raise ValueError(
                f"Fed-Heart-Disease centre {centre!r}: attribute {col} holds values {unknown} outside UCI's "
                f"{list(categories)}: the file is not the UCI original, download it again"
            )
        columns.append(np.stack([x[:, col] == c for c in categories[1:]], axis=1))
    features = np.concatenate(columns, axis=1).astype(np.float32)
    test = _flamby_test_rows(y)
    in_test = np.zeros(len(y), dtype=bool)
    in_test[test] = True
    labels = y.astype(np.float32)
    return {"train": (features[~in_test], labels[~in_test]), "test": (features[in_test], labels[in_test])}


def _flamby_test_rows(labels: np.ndarray) -> np.ndarray:
    """The rows FLamby tests on: scikit-learn's ``train_test_split`` with FLamby's arguments, so the same patients."""
    try:
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ImportError("Fed-Heart-Disease needs scikit-learn for FLamby's split: pip install scikit-learn") from None
    counts = np.bincount(labels, minlength=2)
    # FLamby stratifies only where both classes have more than two patients (Zurich has one healthy patient)
    stratify = labels if (counts > 2).all() else None
    _, test = train_test_split(
        np.arange(len(labels)),
        test_size=1.0 - TRAIN_FRACTION,  # FLamby's expression: the float decides how many patients are rounded up
        train_size=TRAIN_FRACTION,
        random_state=SPLIT_SEED,
        shuffle=True,
        stratify=stratify,
    )
    return np.sort(test)


class HeartDiseaseCentres(SiteSplits):
    """The patients of ``centres`` (one centre at a site; all of them pooled), read inside the site's actor and
    standardised with the training statistics of exactly these centres."""

    def __init__(
        self, centres: Sequence[str], data_dir: Optional[str], batch_size: int, eval_batch_size: int, normalize: bool
    ) -> None:
        super().__init__(batch_size, eval_batch_size)
        self.centres, self.data_dir, self.normalize = list(centres), data_dir, normalize

    def prepare_data(self) -> None:
        for centre in self.centres:
            load_heart_disease(HEART_CENTRES[centre], self.data_dir)

    def setup(self, stage: str) -> None:
        if self.datasets:
            return
        parts = [heart_disease_centre(c, self.data_dir) for c in self.centres]
        split = {
            s: [torch.from_numpy(np.concatenate([p[s][k] for p in parts])) for k in (0, 1)] for s in ("train", "test")
        }
        if self.normalize:
            # FLamby: mean and unbiased std of the training rows in float32, std + 1e-9 (so a constant feature, e.g.
            # Zurich's cholesterol, becomes 0); train and test alike
            train = split["train"][0]
            mean, std = train.mean(0), train.std(0) + 1e-9
            for s in split:
                split[s][0] = (split[s][0] - mean) / std
        for s, (x, y) in split.items():
            self.datasets[s] = TensorBatches(x, y)


# -- Fed-TCGA-BRCA -----------------------------------------------------------------------------------------------
def tcga_brca_root(data_dir: Optional[str] = None, download: bool = True) -> str:
    """The folder holding FLamby's ``brca.csv`` and ``train_test_split.csv`` (MD5-checked; fetched when missing)."""
    root = data_root(data_dir, "fed_tcga_brca")
    for name, (md5, mirror) in TCGA_FILES.items():
        ensure_files(root, {name: md5}, (mirror,), "Fed-TCGA-BRCA (FLamby)", download=download)
    return str(root)


def load_tcga_brca(
    split: str, regions: Optional[Sequence[str]] = None, data_dir: Optional[str] = None, download: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(features float32 [n, 39], event float32 [n], time float32 [n])`` of FLamby's ``split`` (``"train"`` or
    ``"test"``) of ``regions`` (default: every region), in ``brca.csv`` order as FLamby reads them."""
    regions = list(TCGA_REGIONS) if regions is None else chosen_sites(regions, TCGA_REGIONS, "regions")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = tcga_brca_root(data_dir, download)
    with open(os.path.join(root, "train_test_split.csv"), newline="") as fh:
        folds = {row["pid"]: row["fold2"] for row in csv.DictReader(fh)}
    wanted = {f"{split}_{TCGA_REGIONS.index(r)}" for r in regions}
    with open(os.path.join(root, "brca.csv"), newline="") as fh:
        rows = list(csv.reader(fh))
    header = rows[0]
    if len(header) != 42 or header[0] != "pid" or header[-2:] != ["E", "T"]:
        raise ValueError(
            f"{root}/brca.csv has columns {header[:2]}...{header[-2:]} ({len(header)}), not FLamby's pid, 39 "
            "features, E, T: copy it again from FLamby's flamby/datasets/fed_tcga_brca"
        )
    values = np.array([row[1:] for row in rows[1:] if folds.get(row[0]) in wanted], dtype=np.float32).reshape(-1, 41)
    return values[:, :39], values[:, 39], values[:, 40]


class TcgaBrcaRegions(SiteSplits):
    """The patients of ``regions`` (one region at a site; all of them pooled), read inside the site's actor."""

    def __init__(self, regions: Sequence[str], data_dir: Optional[str], batch_size: int, eval_batch_size: int) -> None:
        super().__init__(batch_size, eval_batch_size)
        self.regions, self.data_dir = list(regions), data_dir

    def prepare_data(self) -> None:
        tcga_brca_root(self.data_dir)

    def setup(self, stage: str) -> None:
        if self.datasets:
            return
        for split in ("train", "test"):
            arrays = load_tcga_brca(split, self.regions, self.data_dir)
            self.datasets[split] = TensorBatches(*(torch.from_numpy(a) for a in arrays))


# -- the datamodules ---------------------------------------------------------------------------------------------
class _FlambyCentres(SiteSplits):
    """Shared by both datamodules: one site per centre, or the single ``"pooled"`` site; in pooled mode the
    datamodule also serves a plain Lightning ``Trainer`` directly."""

    sizes: dict[str, tuple[int, int]] = {}

    def __init__(
        self,
        centres: Sequence[str],
        pooled: bool,
        batch_size: int,
        eval_batch_size: int,
        site_cpus: Union[float, Sequence[float]],
    ) -> None:
        super().__init__(batch_size, eval_batch_size)
        self.centres = chosen_sites(centres, list(self.sizes), "centres")
        self.pooled = pooled
        self.site_cpus = per_site(site_cpus, 1 if pooled else len(self.centres))
        self._pooled_data: Optional[SiteSplits] = None

    def _site_data(self, centres: list[str]) -> SiteSplits:
        raise NotImplementedError

    def federated_sites(self) -> list[Site]:
        """Each centre as a site named as in FLamby (or the one ``"pooled"`` site); ``train_size`` from FLamby's table."""
        if self.pooled:
            total = sum(self.sizes[c][0] for c in self.centres)
            return [Site(POOLED, self._site_data(self.centres), num_cpus=self.site_cpus[0], train_size=total)]
        return [
            Site(c, self._site_data([c]), num_cpus=cpus, train_size=self.sizes[c][0])
            for c, cpus in zip(self.centres, self.site_cpus)
        ]

    def prepare_data(self) -> None:
        self._site_data(self.centres).prepare_data()

    def setup(self, stage: str) -> None:
        if not self.pooled:
            raise ValueError(
                f"{type(self).__name__}(pooled=False) is a federation of {len(self.centres)} centres: train it with "
                "Trainer(strategy=FederatedStrategy()), or pass pooled=True for FLamby's pooled baseline"
            )
        if self._pooled_data is None:
            self._pooled_data = self._site_data(self.centres)
        self._pooled_data.setup(stage)
        self.datasets = self._pooled_data.datasets


class FedHeartDisease(_FlambyCentres):
    """FLamby's Fed-Heart-Disease: the four UCI hospitals as sites ``cleveland``, ``hungary``, ``switzerland`` and
    ``va_long_beach`` (FLamby's centres 0..3), with FLamby's split (train/test 199/104, 172/89, 30/16, 85/45) and
    preprocessing (13 features standardised per hospital); batches ``(features [B, 13], label [B])``.

    Args:
        data_dir: the folder with the four ``processed.<hospital>.data`` files (default:
            ``$LIGHTNING_FED_DATA/heart_disease``; downloaded from UCI when missing).
        centres: the hospitals to federate (default: all four, in FLamby's order).
        pooled: FLamby's pooled baseline: one site ``"pooled"`` holding every hospital's training split (standardised
            with their pooled training statistics, as FLamby does) and every test split. A pooled datamodule also
            works with a plain ``Trainer``.
        batch_size: training batch size (FLamby: 4); ``eval_batch_size`` for test batches (any size gives the
            same accuracy).
        normalize: standardise as FLamby does (its default); ``False`` keeps the encoded raw values.
        site_cpus: what each site's actor reserves (one number, or one per site).
    """

    sizes = HEART_SIZES

    def __init__(
        self,
        data_dir: Optional[str] = None,
        centres: Sequence[str] = tuple(HEART_CENTRES),
        pooled: bool = False,
        batch_size: int = HEART_BATCH_SIZE,
        eval_batch_size: int = 1024,
        normalize: bool = True,
        site_cpus: Union[float, Sequence[float]] = 1.0,
    ) -> None:
        super().__init__(centres, pooled, batch_size, eval_batch_size, site_cpus)
        self.data_dir, self.normalize = data_dir, normalize

    def _site_data(self, centres: list[str]) -> SiteSplits:
        return HeartDiseaseCentres(centres, self.data_dir, self.batch_size, self.eval_batch_size, self.normalize)


class FedTcgaBrca(_FlambyCentres):
    """FLamby's Fed-TCGA-BRCA: 1,088 TCGA breast-cancer patients, the six regions as sites ``northeast``,
    ``south``, ``west``, ``midwest``, ``europe`` and ``canada`` (FLamby's regions 0..5), with FLamby's static split
    (train/test 248/63, 156/40, 164/42, 129/33, 129/33, 40/11). Batches ``(features [B, 39], event [B], time [B])``
    for survival analysis (:class:`~lightning_fed.models.CoxModel`).

    Args:
        data_dir: the folder with FLamby's ``brca.csv`` and ``train_test_split.csv`` (default:
            ``$LIGHTNING_FED_DATA/fed_tcga_brca``; downloaded from FLamby's repository when missing).
        centres: the regions to federate (default: all six, in FLamby's order).
        pooled: FLamby's pooled baseline: one site ``"pooled"`` holding every region's training and test split;
            a pooled datamodule also works with a plain ``Trainer``.
        batch_size: training batch size (FLamby: 8). ``eval_batch_size``: test batches; the Cox loss's risk sets
            are the batch, so the default takes a site's whole test set at once (the C-index never depends on it).
        site_cpus: what each site's actor reserves (one number, or one per site).
    """

    sizes = TCGA_SIZES

    def __init__(
        self,
        data_dir: Optional[str] = None,
        centres: Sequence[str] = TCGA_REGIONS,
        pooled: bool = False,
        batch_size: int = TCGA_BATCH_SIZE,
        eval_batch_size: int = 1024,
        site_cpus: Union[float, Sequence[float]] = 1.0,
    ) -> None:
        super().__init__(centres, pooled, batch_size, eval_batch_size, site_cpus)
        self.data_dir = data_dir

    def _site_data(self, centres: list[str]) -> SiteSplits:
        return TcgaBrcaRegions(centres, self.data_dir, self.batch_size, self.eval_batch_size)


__all__ = [
    "FedHeartDisease",
    "FedTcgaBrca",
    "HEART_CENTRES",
    "HEART_SIZES",
    "TCGA_REGIONS",
    "TCGA_SIZES",
    "heart_disease_centre",
    "load_tcga_brca",
]
