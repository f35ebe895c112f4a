"""A hospital's own CT, read where it lives: NIfTI volumes or DICOM series, with label masks, as 2-D slices.

Point each site at its own folder::

    <root>/images/<case>.nii.gz        a volume per case (or <root>/images/<case>/ holding one DICOM series)
    <root>/labels/<case>.nii.gz        its label mask (class indices); no labels/ folder: a hospital without labels
    <root>/cases.csv                   optional: columns case, vendor (DICOM series read the vendor from headers)

Each volume goes through MONAI's transforms inside the site: orientation to RAS, resampling to ``spacing`` (mm),
the HU window scaled to [0, 1], then its axial slices (those with any foreground label when labels exist, every
``slice_step``-th otherwise) resized to ``image_size``. Cases (never slices) are split train/val/test, so no patient
is in two splits. Batches are dicts like the simulated hospitals' (:mod:`lightning_fed.data.ct_vendors`): ``image``,
``label`` (absent without labels), ``group`` (the case's vendor index in ``group_names``, -1 when unknown).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule

from lightning_fed.data.ct_vendors import VENDORS, WINDOW_HU, CTSlices
from lightning_fed.data.dicom import UNKNOWN, count_exams, normalise_vendor, read_dicom_headers
from lightning_fed.data.partition import split_fractions, train_val_test
from lightning_fed.data.sites import Site, SiteSplits

_NIFTI = (".nii.gz", ".nii")


def _case_name(path: Path) -> str:
    name = path.name
    for suffix in _NIFTI:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class CTFolderSite(SiteSplits):
    """One hospital's CT folder as a site's data (see the module's docstring for the layout).

    Args:
        root: the hospital's folder (read inside the site's process only).
        spacing: in-plane and slice spacing in mm to resample to (``None``: keep each volume's own).
        window: the HU window scaled to [0, 1].
        image_size: pixels per side of the slices.
        slice_step: without labels, every ``slice_step``-th slice is kept.
        test_fraction, val_fraction, seed: the split of cases.
        labelled: ``False`` keeps labels out of the training split even when masks exist (a hospital that
            contributes images only); without a ``labels/`` folder the site is unlabelled anyway.
        group_names: the vendor names whose indices batches carry.
    """

    def __init__(
        self,
        root: str,
        spacing: Optional[Sequence[float]] = (1.0, 1.0, 5.0),
        window: Sequence[float] = WINDOW_HU,
        image_size: int = 64,
        slice_step: int = 4,
        test_fraction: float = 0.2,
        val_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 8,
        labelled: bool = True,
        group_names: Sequence[str] = VENDORS,
    ) -> None:
        super().__init__(batch_size, eval_batch_size=32)
        self.root, self.spacing, self.window = Path(root).expanduser(), spacing, tuple(window)
        self.image_size, self.slice_step, self.seed = image_size, slice_step, seed
        self.fractions = train_val_test(test_fraction, val_fraction)
        self.labelled, self.group_names = labelled, tuple(group_names)
        self._pipelines: dict[tuple[str, ...], Any] = {}  # MONAI transforms, built once per set of keys

    # -- what is there ---------------------------------------------------------------------------
    def cases(self) -> dict[str, Path]:
        """Case name -> its image (a NIfTI file or a DICOM series folder)."""
        images = self.root / "images"
        if not images.is_dir():
            raise FileNotFoundError(
                f"CT folder {self.root} has no images/ folder: put one NIfTI volume or DICOM series "
                "folder per case in <root>/images (and masks in <root>/labels)"
            )
        found = {_case_name(p): p for p in sorted(images.iterdir()) if p.is_dir() or p.name.endswith(_NIFTI)}
        if not found:
            raise FileNotFoundError(f"{images} holds no NIfTI volumes (.nii, .nii.gz) or DICOM series folders")
        return found

    def has_labels(self) -> bool:
        return (self.root / "labels").is_dir()

    def vendors(self) -> dict[str, str]:
        """Case -> vendor, from ``cases.csv`` or the DICOM headers of each series."""
        table = self.root / "cases.csv"
        out: dict[str, str] = {}
        if table.is_file():
            with table.open() as f:
                for row in csv.DictReader(f):
                    out[row["case"]] = normalise_vendor(row.get("vendor") or "")
        for case, path in self.cases().items():
            if case not in out and path.is_dir():
                records, _ = read_dicom_headers(path)
                out[case] = records[0]["vendor"] if records else UNKNOWN
        return out

    def inventory(self) -> list[dict[str, Any]]:
        """Exams by vendor, model and kernel: from the DICOM headers, or ``cases.csv`` for NIfTI volumes."""
        records = []
        vendors = self.vendors()
        for case, path in self.cases().items():
            if path.is_dir():
                records += [{**r, "exam": r["exam"] or case} for r in read_dicom_headers(path)[0]]
            else:
                records.append(
                    {"vendor": vendors.get(case, UNKNOWN), "model": UNKNOWN, "kernel": UNKNOWN, "exam": case}
                )
        return count_exams(records)

    # -- loading ---------------------------------------------------------------------------------
    def _transforms(self, keys: list[str]) -> Any:
        from monai import transforms as T

        steps = [
            T.LoadImaged(keys=keys, image_only=True),
            T.EnsureChannelFirstd(keys=keys),
            T.Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        ]
        if self.spacing is not None:
            steps.append(T.Spacingd(keys=keys, pixdim=tuple(self.spacing), mode=["bilinear", "nearest"][: len(keys)]))
        lo, hi = self.window
        steps.append(T.ScaleIntensityRanged(keys=["image"], a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True))
        return T.Compose(steps)

    def _slices(self, case: str, path: Path, with_labels: bool) -> tuple[np.ndarray, Optional[np.ndarray]]:
        from monai.transforms import Resize

        item = {"image": str(path)}
        if with_labels:
            mask = next(
                (
                    self.root / "labels" / f"{case}{s}"
                    for s in _NIFTI
                    if (self.root / "labels" / f"{case}{s}").is_file()
                ),
                None,
            )
            if mask is None:
                raise FileNotFoundError(
                    f"case {case!r} has no mask in {self.root / 'labels'}: add {case}.nii.gz or remove the labels/ folder"
                )
            item["label"] = str(mask)
        keys = tuple(item)
        if keys not in self._pipelines:
            self._pipelines[keys] = self._transforms(list(keys))
        data = self._pipelines[keys](item)
        image = torch.as_tensor(data["image"])[0]  # [X, Y, Z]
        label = torch.as_tensor(data["label"])[0].round().long() if with_labels else None
        if label is not None:
            keep = [z for z in range(image.shape[-1]) if bool((label[..., z] > 0).any())]
        else:
            keep = list(range(0, image.shape[-1], self.slice_step))
        size = (self.image_size, self.image_size)
        images = np.stack([Resize(size, mode="bilinear")(image[None, ..., z])[0].numpy() for z in keep]).astype(
            np.float32
        )
        labels = None
        if label is not None:
            labels = np.stack(
                [Resize(size, mode="nearest")(label[None, ..., z].float())[0].numpy() for z in keep]
            ).astype(np.int64)
        return images, labels

    def split_cases(self) -> dict[str, list[str]]:
        names = sorted(self.cases())
        parts = split_fractions(np.arange(len(names)), self.fractions, seed=self.seed)
        return {split: [names[i] for i in idx] for split, idx in zip(("train", "val", "test"), parts)}

    def setup(self, stage: str) -> None:
        if self.datasets:
            return
        cases, labels_exist, vendors = self.cases(), self.has_labels(), self.vendors()
        for split, names in self.split_cases().items():
            images, labels, groups = [], [], []
            for case in names:
                x, y = self._slices(case, cases[case], labels_exist)
                images.append(x)
                labels.append(y if y is not None else np.zeros((len(x), self.image_size, self.image_size), np.int64))
                vendor = vendors.get(case, "")
                groups.append(np.full(len(x), self.group_names.index(vendor) if vendor in self.group_names else -1))
            if not images:
                continue
            with_labels = labels_exist and (self.labelled or split != "train")
            self.datasets[split] = CTSlices(
                np.concatenate(images), np.concatenate(labels), np.concatenate(groups), with_labels
            )


class CTFolderSites(LightningDataModule):
    """Hospitals as sites, each reading its own CT folder (:class:`CTFolderSite`): ``folders`` maps site name to
    the folder on that hospital's machine; ``pin`` places each site on the Ray node that carries the resource
    ``site:<name>`` (the hospital's own node)."""

    group_names = VENDORS

    def __init__(
        self,
        folders: dict[str, str],
        unlabelled: Sequence[str] = (),
        pin: bool = False,
        site_cpus: float = 1.0,
        **site_options: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(unlabelled) - set(folders))
        if not folders or unknown:
            raise ValueError(f"folders must map each site to its CT folder; unlabelled names unknown sites {unknown}")
        self.folders, self.unlabelled, self.pin, self.site_cpus, self.site_options = (
            dict(folders),
            list(unlabelled),
            pin,
            site_cpus,
            site_options,
        )

    def federated_sites(self) -> list[Site]:
        return [
            Site(
                name,
                CTFolderSite(folder, labelled=name not in self.unlabelled, **self.site_options),
                num_cpus=self.site_cpus,
                resources={f"site:{name}": 0.01} if self.pin else {},
                labelled=name not in self.unlabelled,
            )
            for name, folder in self.folders.items()
        ]
