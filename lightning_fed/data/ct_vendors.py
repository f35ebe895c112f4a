"""Study C, simulated: ten CT hospitals whose scanner vendors follow the study's exam counts.

The study's CT cannot leave its hospitals, so this module draws synthetic CT-like cross-sections with
musculoskeletal labels inside each simulated hospital. What is simulated, exactly:

* **Vendor mix.** Hospital ``A``-``J`` draws its exams' vendors in the proportions of :data:`STUDY_EXAMS` (the
  study's exam counts per hospital and vendor): ``n`` exams get ``round(n * share)`` of each vendor by largest
  remainder, so every hospital's mix is within one exam of the table. Each exam then gets a scanner model and a
  reconstruction kernel of its vendor, uniformly.
* **Anatomy** (the same for every vendor; in millimetres): an elliptical limb/trunk section of subcutaneous fat
  (class 1, about -100 HU) around a muscle compartment (class 2, about +50 HU) holding one or two bones (class 3:
  cortical ring 700-1100 HU around marrow about +250 HU) and a few intramuscular fat islands; air (class 0,
  -1000 HU) around it.
* **Acquisition signature** (:class:`Acquisition`, per vendor, invented values that span what differs between
  real scanners, not measured ones): pixel spacing (the same anatomy covers more or fewer pixels), HU
  calibration ``hu * scale + offset``, quantum noise (white, then shaped by the kernel), and the reconstruction
  kernel: smooth kernels blur (Gaussian), sharp ones enhance edges (unsharp mask) and noise.
* **Preprocessing** as a hospital would do it: an HU window of [-250, 1250] scaled to [0, 1] (MONAI's
  ``ScaleIntensityRange``).

Every exam is drawn from ``(seed, hospital, exam index)`` inside the hospital's own process: nothing is shared
across sites. Batches are dicts: ``image`` ``[1, H, W]`` float, ``label`` ``[H, W]`` class indices (absent from the
training batches of a hospital declared without labels), ``group`` the vendor's index in :data:`VENDORS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import Dataset

from lightning_fed.data.dicom import count_exams
from lightning_fed.data.partition import split_fractions, train_val_test
from lightning_fed.data.sites import Site, SiteSplits, chosen_sites, per_site
from lightning_fed.data.tensors import GatheredBatch

VENDORS = ("CANON", "GE", "PHILIPS", "SIEMENS")
CLASSES = ("background", "fat", "muscle", "bone")

STUDY_EXAMS: dict[str, dict[str, int]] = {
    # study C (research brief): CT exams per hospital and vendor
    "A": {"CANON": 107_200, "GE": 0, "PHILIPS": 49_948, "SIEMENS": 0},
    "B": {"CANON": 189_048, "GE": 381_000, "PHILIPS": 0, "SIEMENS": 0},
    "C": {"CANON": 1_775_148, "GE": 0, "PHILIPS": 196_878, "SIEMENS": 0},
    "D": {"CANON": 577_924, "GE": 327_474, "PHILIPS": 25_570, "SIEMENS": 214},
    "E": {"CANON": 1_345_462, "GE": 0, "PHILIPS": 0, "SIEMENS": 0},
    "F": {"CANON": 440_212, "GE": 334_410, "PHILIPS": 0, "SIEMENS": 13_284},
    "G": {"CANON": 948_054, "GE": 219_084, "PHILIPS": 0, "SIEMENS": 389_384},
    "H": {"CANON": 439_246, "GE": 47_520, "PHILIPS": 514, "SIEMENS": 0},
    "I": {"CANON": 165_620, "GE": 20_016, "PHILIPS": 69_356, "SIEMENS": 11_468},
    "J": {"CANON": 221_016, "GE": 0, "PHILIPS": 201_932, "SIEMENS": 0},
}

WINDOW_HU = (-250.0, 1250.0)


@dataclass(frozen=True)
class Kernel:
    """A reconstruction kernel: ``sharpness`` < 0 blurs (Gaussian sigma of ``-sharpness`` pixels of the simulated
    image), > 0 sharpens (unsharp-mask amount)."""

    name: str
    sharpness: float


@dataclass(frozen=True)
class Acquisition:
    """One vendor's simulated acquisition signature."""

    vendor: str
    models: tuple[str, ...]
    kernels: tuple[Kernel, ...]
    spacing_mm: float  # at a 512-pixel matrix: the field of view is 512 * spacing_mm
    hu_scale: float
    hu_offset: float
    noise_hu: float


SIGNATURES: dict[str, Acquisition] = {
    "CANON": Acquisition(
        "CANON",
        ("Aquilion ONE", "Aquilion Prime"),
        (Kernel("FC03", -0.8), Kernel("FC18", -0.45)),
        spacing_mm=0.78,
        hu_scale=1.00,
        hu_offset=0.0,
        noise_hu=12.0,
    ),
    "GE": Acquisition(
        "GE",
        ("Revolution CT", "Discovery CT750 HD"),
        (Kernel("STANDARD", -0.3), Kernel("BONE", 0.8)),
        spacing_mm=0.70,
        hu_scale=1.05,
        hu_offset=30.0,
        noise_hu=20.0,
    ),
    "PHILIPS": Acquisition(
        "PHILIPS",
        ("Brilliance 64", "IQon"),
        (Kernel("B", -0.3), Kernel("YC", 1.0)),
        spacing_mm=0.88,
        hu_scale=0.93,
        hu_offset=-45.0,
        noise_hu=25.0,
    ),
    "SIEMENS": Acquisition(
        "SIEMENS",
        ("SOMATOM Force", "SOMATOM Definition AS"),
        (Kernel("Br40", 0.4), Kernel("Br64", 1.6)),
        spacing_mm=0.62,
        hu_scale=1.10,
        hu_offset=60.0,
        noise_hu=32.0,
    ),
}


@dataclass(frozen=True)
class Exam:
    """What a DICOM header would say about one simulated exam."""

    index: int
    vendor: str
    model: str
    kernel: str


def vendor_counts(hospital: str, exams: int) -> dict[str, int]:
    """How many of ``exams`` each vendor gets at ``hospital``: the study's proportions, largest remainder."""
    counts = STUDY_EXAMS[hospital]
    total = sum(counts.values())
    quotas = {v: exams * counts[v] / total for v in VENDORS}
    out = {v: int(math.floor(q)) for v, q in quotas.items()}
    for v in sorted(VENDORS, key=lambda v: (-(quotas[v] - out[v]), VENDORS.index(v)))[: exams - sum(out.values())]:
        out[v] += 1
    return out


def hospital_exams(hospital: str, exams: int, seed: int) -> list[Exam]:
    """The exams of one simulated hospital: vendors by :func:`vendor_counts` in a seeded order, each with a model
    and kernel of its vendor."""
    rng = np.random.default_rng([seed, ord(hospital[0]), 7])
    vendors = [v for v, n in vendor_counts(hospital, exams).items() for _ in range(n)]
    vendors = [vendors[i] for i in rng.permutation(len(vendors))]
    out = []
    for i, vendor in enumerate(vendors):
        acq = SIGNATURES[vendor]
        out.append(
            Exam(i, vendor, acq.models[rng.integers(len(acq.models))], acq.kernels[rng.integers(len(acq.kernels))].name)
        )
    return out


def _gaussian(image: torch.Tensor, sigma: float) -> torch.Tensor:
    from monai.transforms import GaussianSmooth

    return GaussianSmooth(sigma=sigma)(image[None])[0] if sigma > 0 else image


def simulate_exam(exam: Exam, seed: int, hospital: str, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``(hu float32 [size, size], label int64 [size, size])`` of one exam as its scanner would render it."""
    rng = np.random.default_rng([seed, ord(hospital[0]), exam.index, 11])
    acq = SIGNATURES[exam.vendor]
    kernel = next(k for k in acq.kernels if k.name == exam.kernel)
    mm = 512 * acq.spacing_mm / size  # millimetres per pixel at this matrix size
    coords = (np.arange(size) - (size - 1) / 2) * mm
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    cy, cx = rng.uniform(-15, 15, size=2)
    a, b = rng.uniform(115, 165), rng.uniform(85, 125)  # semi-axes of the section, mm
    angle = rng.uniform(-0.3, 0.3)
    u = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
    v = -(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)
    label = np.zeros((size, size), np.int64)
    hu = np.full((size, size), -1000.0)
    body = (u / a) ** 2 + (v / b) ** 2 <= 1
    label[body], hu[body] = 1, rng.normal(-100, 8)
    fat = rng.uniform(10, 28)
    muscle = (u / (a - fat)) ** 2 + (v / (b - fat)) ** 2 <= 1
    label[muscle], hu[muscle] = 2, rng.normal(50, 6)
    for _ in range(rng.integers(2, 5)):  # intramuscular fat islands
        fy, fx = rng.uniform(-0.6, 0.6) * (b - fat) + cy, rng.uniform(-0.6, 0.6) * (a - fat) + cx
        island = muscle & (((xx - fx) ** 2 + (yy - fy) ** 2) <= rng.uniform(5, 11) ** 2)
        label[island], hu[island] = 1, -90.0
    for k in range(rng.integers(1, 3)):  # bones: cortex around marrow
        by = cy + rng.uniform(-0.35, 0.35) * (b - fat)
        bx = cx + (rng.uniform(-0.45, -0.1) if k == 0 else rng.uniform(0.1, 0.45)) * (a - fat)
        r = rng.uniform(13, 22)
        dist = np.sqrt((xx - bx) ** 2 + (yy - by) ** 2)
        bone = muscle & (dist <= r)
        label[bone], hu[bone] = 3, rng.uniform(700, 1100)
        marrow = bone & (dist <= r * rng.uniform(0.45, 0.65))
        hu[marrow] = rng.normal(250, 30)
    hu = hu * acq.hu_scale + acq.hu_offset * (hu > -900)  # calibration; air stays air
    image = torch.from_numpy(hu.astype(np.float32))[None]
    noise = torch.from_numpy(rng.normal(0, acq.noise_hu, size=(size, size)).astype(np.float32))[None]
    if kernel.sharpness < 0:
        image = _gaussian(image + noise * 1.8, -kernel.sharpness)  # smooth kernels: less, correlated noise
    else:
        detail = image - _gaussian(image, 0.8)
        image = image + kernel.sharpness * detail + noise * (1 + 0.6 * kernel.sharpness)
    return image[0].numpy(), label


class CTSlices(Dataset):
    """2-D CT slices as dicts (``image`` windowed to [0, 1], ``label`` unless hidden, ``group``), served a whole batch
    per gather (:mod:`lightning_fed.data.tensors`)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, groups: np.ndarray, with_labels: bool) -> None:
        self.images, self.labels, self.groups, self.with_labels = images, labels, groups, with_labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"image": torch.from_numpy(self.images[i])[None], "group": torch.tensor(int(self.groups[i]))}
        if self.with_labels:
            item["label"] = torch.from_numpy(self.labels[i])
        return item

    def __getitems__(self, indices: Sequence[int]) -> GatheredBatch:
        """A whole batch in one gather per field (the batch ``default_collate`` would stack from the samples)."""
        index = np.asarray(indices, dtype=np.int64)
        batch = {
            "image": torch.from_numpy(self.images[index])[:, None],
            "group": torch.from_numpy(self.groups[index].astype(np.int64)),
        }
        if self.with_labels:
            batch["label"] = torch.from_numpy(self.labels[index])
        return GatheredBatch(batch)


def window(hu: np.ndarray) -> np.ndarray:
    """HU window [-250, 1250] scaled to [0, 1] (MONAI ``ScaleIntensityRange``, clipped)."""
    from monai.transforms import ScaleIntensityRange

    lo, hi = WINDOW_HU
    return np.asarray(ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(hu), dtype=np.float32)


class SimulatedCTHospital(SiteSplits):
    """One simulated hospital: its exams drawn and windowed in ``setup`` (inside the site's process)."""

    group_names = VENDORS
    class_names = CLASSES

    def __init__(
        self,
        hospital: str,
        exams: int,
        fractions: Sequence[float],
        seed: int,
        image_size: int,
        batch_size: int,
        labelled: bool,
    ) -> None:
        super().__init__(batch_size, eval_batch_size=64)
        self.hospital, self.exams, self.fractions, self.seed = hospital, exams, list(fractions), seed
        self.image_size, self.labelled = image_size, labelled

    def exam_list(self) -> list[Exam]:
        return hospital_exams(self.hospital, self.exams, self.seed)

    def split_indices(self) -> dict[str, np.ndarray]:
        parts = split_fractions(np.arange(self.exams), self.fractions, seed=self.seed + 101 + ord(self.hospital[0]))
        return dict(zip(("train", "val", "test"), parts))

    def inventory(self) -> list[dict[str, Any]]:
        """Exams by vendor, model and kernel, as :func:`~lightning_fed.data.dicom.count_exams` counts them from headers."""
        return count_exams(
            [{"vendor": e.vendor, "model": e.model, "kernel": e.kernel, "exam": str(e.index)} for e in self.exam_list()]
        )

    def setup(self, stage: str) -> None:
        if self.datasets:
            return
        exams = self.exam_list()
        drawn = [simulate_exam(e, self.seed, self.hospital, self.image_size) for e in exams]
        images = np.stack([window(hu) for hu, _ in drawn])
        labels = np.stack([label for _, label in drawn])
        groups = np.array([VENDORS.index(e.vendor) for e in exams])
        for split, idx in self.split_indices().items():
            # a hospital without labels trains on images alone; its hidden labels serve evaluation only
            with_labels = self.labelled or split != "train"
            self.datasets[split] = CTSlices(images[idx], labels[idx], groups[idx], with_labels)


class SimulatedCTHospitals(LightningDataModule):
    """Study C's ten hospitals (``A``-``J``) as federated sites, each with its vendor mix (:data:`STUDY_EXAMS`).

    Args:
        hospitals: which of ``A``-``J`` take part (default all ten).
        exams: exams (2-D slices) per hospital, one number or one per hospital.
        unlabelled: hospitals without ground truth: their training batches carry no ``label`` (they can only
            learn from images); their validation/test labels exist in simulation only, and results mark them.
        test_fraction, val_fraction: each hospital's own split.
        image_size: pixels per side (the anatomy is drawn in millimetres, so vendors' spacings differ).
        batch_size, seed, site_cpus: as in the other site datamodules.
    """

    group_names = VENDORS
    class_names = CLASSES

    def __init__(
        self,
        hospitals: Sequence[str] = tuple(STUDY_EXAMS),
        exams: Union[int, Sequence[int]] = 40,
        unlabelled: Sequence[str] = (),
        test_fraction: float = 0.25,
        val_fraction: float = 0.15,
        image_size: int = 64,
        batch_size: int = 8,
        seed: int = 0,
        site_cpus: Union[float, Sequence[float]] = 1.0,
    ) -> None:
        super().__init__()
        hospitals = chosen_sites(hospitals, list(STUDY_EXAMS))
        if unlabelled:
            chosen_sites(unlabelled, hospitals, "unlabelled hospitals")
        if set(unlabelled) == set(hospitals):
            raise ValueError("every hospital is unlabelled: at least one hospital needs ground truth to learn from")
        counts = [int(exams)] * len(hospitals) if isinstance(exams, int) else [int(e) for e in exams]
        if len(counts) != len(hospitals) or min(counts) < 4:
            raise ValueError(f"exams must be one number >= 4 or one per hospital ({len(hospitals)}), got {exams!r}")
        if image_size < 16 or image_size % 8:
            raise ValueError(
                f"image_size must be a multiple of 8 and >= 16 (the U-Net halves it three times), got {image_size}"
            )
        self.fractions = train_val_test(test_fraction, val_fraction)
        self.hospitals, self.exams, self.unlabelled = list(hospitals), counts, list(unlabelled)
        self.image_size, self.batch_size, self.seed = image_size, batch_size, seed
        self.site_cpus = per_site(site_cpus, len(self.hospitals))

    def hospital_data(self, hospital: str) -> SimulatedCTHospital:
        k = self.hospitals.index(hospital)
        return SimulatedCTHospital(
            hospital,
            self.exams[k],
            self.fractions,
            self.seed,
            self.image_size,
            self.batch_size,
            labelled=hospital not in self.unlabelled,
        )

    def federated_sites(self) -> list[Site]:
        out = []
        for hospital, cpus in zip(self.hospitals, self.site_cpus):
            data = self.hospital_data(hospital)
            out.append(
                Site(
                    hospital,
                    data,
                    num_cpus=cpus,
                    train_size=len(data.split_indices()["train"]),
                    labelled=hospital not in self.unlabelled,
                )
            )
        return out
