"""DICOM headers, read where the images live: vendor, scanner model and reconstruction kernel of each file, and
exams counted by acquisition condition (what ``lightning-fed inventory`` reports per site, study C's first step)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Iterable

UNKNOWN = "(not recorded)"


def read_dicom_headers(folder: str | Path) -> tuple[list[dict[str, str]], int]:
    """One record per DICOM file under ``folder`` (``vendor``, ``model``, ``kernel``, ``exam``), read without pixel
    data; returns ``(records, files that are not DICOM)``."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"DICOM folder {root} does not exist: point the site at its own folder of DICOM files")
    records, skipped = [], 0
    tags = [
        "Manufacturer",
        "ManufacturerModelName",
        "ConvolutionKernel",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
    ]
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
        except (InvalidDicomError, OSError, ValueError):
            skipped += 1
            continue
        if "SOPClassUID" not in ds and not any(t in ds for t in tags):
            skipped += 1
            continue
        kernel = ds.get("ConvolutionKernel", "")
        if isinstance(kernel, (list, tuple)) or type(kernel).__name__ == "MultiValue":
            kernel = "\\".join(str(k) for k in kernel)
        records.append(
            {
                "vendor": normalise_vendor(str(ds.get("Manufacturer", "") or "")),
                "model": str(ds.get("ManufacturerModelName", "") or "").strip() or UNKNOWN,
                "kernel": str(kernel).strip() or UNKNOWN,
                "exam": str(ds.get("StudyInstanceUID", "") or ds.get("SeriesInstanceUID", "") or path),
                "modality": str(ds.get("Modality", "") or ""),
            }
        )
    return records, skipped


_VENDOR_NAMES = (
    ("GE", "GE"),
    ("G.E.", "GE"),
    ("SIEMENS", "SIEMENS"),
    ("PHILIPS", "PHILIPS"),
    ("TOSHIBA", "CANON"),
    ("CANON", "CANON"),
    ("HITACHI", "HITACHI"),
    ("FUJIFILM", "FUJIFILM"),
    ("UNITED IMAGING", "UIH"),
)


def normalise_vendor(manufacturer: str) -> str:
    """One name per vendor (``GE MEDICAL SYSTEMS`` -> ``GE``; Toshiba, now Canon Medical, -> ``CANON``)."""
    name = manufacturer.strip().upper()
    if not name:
        return UNKNOWN
    for prefix, vendor in _VENDOR_NAMES:
        if name.startswith(prefix):
            return vendor
    return name


def count_exams(records: Iterable[dict[str, str]]) -> list[dict[str, Any]]:
    """Rows ``vendor, model, kernel, exams (distinct exam ids), images (records)``, most exams first."""
    images: Counter = Counter()
    exams: dict[tuple[str, str, str], set[str]] = {}
    for r in records:
        key = (r["vendor"], r["model"], r["kernel"])
        images[key] += 1
        exams.setdefault(key, set()).add(r["exam"])
    rows = [
        {"vendor": k[0], "model": k[1], "kernel": k[2], "exams": len(exams[k]), "images": images[k]} for k in images
    ]
    return sorted(rows, key=lambda r: (-r["exams"], r["vendor"], r["model"], r["kernel"]))
