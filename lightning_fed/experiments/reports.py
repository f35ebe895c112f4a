"""What ``compare`` and ``sweep`` write to ``results.json``, as typed, frozen reports.

- :class:`CompareReport` (``kind: "compare"``): every model on every test set, mean ± std over repetitions;
- :class:`SweepReport` (``kind: "sweep"``): one table row per grid point and model;
- :class:`LeaveOneOutReport` (``kind: "leave_one_out"``): ``compare --holdout A,B,...``, each held-out site's full
  comparison in its own folder.

A report is written once by :func:`write_report` (atomically: a reader never sees half a file) with its ``kind`` as
the first key, and read back by :func:`read_report`, which goes by that ``kind``; files written before reports
carried one are recognised by :func:`legacy_kind`. Reports read like the dicts they once were (``report["summary"]``).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Optional, TypeVar, Union

from lightning_fed.experiments.grid import Point
from lightning_fed.experiments.runs import StartupReport
from lightning_fed.experiments.summaries import Confusions, Stats, Summary, SweepRow, Traffic

RESULTS_JSON = "results.json"
RunRecord = dict[str, Any]  # a :class:`~lightning_fed.experiments.runs.Run` as JSON (``dataclasses.asdict``)

_R = TypeVar("_R", bound="_Report")


@dataclass(frozen=True)
class _Report:
    """JSON form, reading by key, and reading back; subclasses declare ``kind`` first, then the fields in file order."""

    _OPTIONAL: ClassVar[Mapping[str, Any]] = {}  # keys older results.json files lack -> the value they meant

    def to_json(self) -> dict[str, Any]:
        """The results.json content: ``kind`` first, then every field (``wandb_dir`` only when there is one)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if data.get("wandb_dir", "") is None:
            del data["wandb_dir"]
        return data

    @classmethod
    def from_json(cls: type[_R], data: Mapping[str, Any]) -> _R:
        """The report in a results.json's content; keys it does not know are ignored, keys older files lack get the
        value they meant (``_OPTIONAL``)."""
        kind = data.get("kind")
        expected = next(f.default for f in fields(cls) if f.name == "kind")
        if kind is not None and kind != expected:
            raise ValueError(f"results.json holds a {kind!r} report, not a {expected!r} one")
        values = {}
        for f in fields(cls):
            if not f.init:
                continue
            if f.name in data:
                values[f.name] = data[f.name]
            elif f.name in cls._OPTIONAL:
                values[f.name] = copy.deepcopy(cls._OPTIONAL[f.name])
            elif f.default is MISSING:
                raise ValueError(f"results.json of a {expected} lacks {f.name!r}")
        return cls(**values)

    def __getitem__(self, key: str) -> Any:
        """``report["summary"]``: a field by its results.json key (reports were plain dicts before they were typed)."""
        if key not in self:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in {f.name for f in fields(self)}


@dataclass(frozen=True)
class CompareReport(_Report):
    """``lightning-fed compare``: every model (pooled, local, each site's own, federated) on every test set."""

    kind: Literal["compare"] = field(default="compare", init=False)
    command: str
    recipes: list[str]
    overrides: list[str]
    modes: list[str]
    repeats: int
    seeds: list[int]
    sites: list[str]
    mean_over: Optional[list[str]]
    columns: list[str]  # the sites, the mean over ``mean_over``, "federated" (all sites merged)
    models: list[str]
    label_names: Optional[list[str]]
    summary: Summary
    confusion_matrices: Confusions
    metrics: list[str]
    holdout: Optional[str]
    runs: list[RunRecord]
    startup: StartupReport
    wall_seconds: float
    plots: list[str]
    traffic: Traffic
    wandb_dir: Optional[str] = None

    _OPTIONAL: ClassVar[Mapping[str, Any]] = {
        "metrics": [],
        "holdout": None,
        "traffic": {},
        "mean_over": None,
        "label_names": None,
        "confusion_matrices": {},
    }


@dataclass(frozen=True)
class SweepReport(_Report):
    """``lightning-fed sweep``: each grid point's models in one column (all sites merged, or a mean over sites)."""

    kind: Literal["sweep"] = field(default="sweep", init=False)
    command: str
    recipes: list[str]
    overrides: list[str]
    grid: list[str]  # the grid keys, the plots' x axis first
    points: list[Point]
    modes: list[str]
    repeats: int
    column: str
    rows: list[SweepRow]
    runs: list[RunRecord]
    startup: StartupReport
    wall_seconds: float
    plots: list[str]
    wandb_dir: Optional[str] = None


@dataclass(frozen=True)
class LeaveOneOutReport(_Report):
    """``lightning-fed compare --holdout A,B,...``: each model at each held-out site; ``folders`` holds each held-out
    site's :class:`CompareReport`."""

    kind: Literal["leave_one_out"] = field(default="leave_one_out", init=False)
    command: str
    holdouts: list[str]
    metrics: list[str]
    rows: dict[str, dict[str, dict[str, Stats]]]  # model -> held-out site -> metric -> stats
    folders: dict[str, str]  # held-out site -> sub-folder


Report = Union[CompareReport, SweepReport, LeaveOneOutReport]
REPORTS: dict[str, type[Report]] = {"compare": CompareReport, "sweep": SweepReport, "leave_one_out": LeaveOneOutReport}


def legacy_kind(data: Mapping[str, Any]) -> Optional[str]:
    """The kind of a results.json written before reports carried a ``kind`` key (up to lightning-fed 0.x, e.g.
    every file under docs/results/ then), told apart by the keys only that kind wrote: ``holdouts`` (leave one site
    out), ``grid`` (sweep), ``summary`` (compare); ``None`` for anything else (a fit's results.json)."""
    for key, kind in (("holdouts", "leave_one_out"), ("grid", "sweep"), ("summary", "compare")):
        if key in data:
            return kind
    return None


def read_report(folder: Path) -> Optional[Report]:
    """The report in ``folder/results.json``, by its ``kind``; ``None`` when the file holds none (a fit's results,
    or a benchmark's list)."""
    data = json.loads((folder / RESULTS_JSON).read_text())
    if not isinstance(data, dict):
        return None
    cls = REPORTS.get(data.get("kind") or legacy_kind(data) or "")
    return cls.from_json(data) if cls is not None else None


def write_report(report: Report, folder: Path) -> Path:
    """``folder/results.json``: the report with its ``kind``, written once and atomically."""
    path = folder / RESULTS_JSON
    write_atomically(path, json.dumps(report.to_json(), indent=2, default=_jsonable))
    return path


def write_atomically(path: Path, text: str) -> None:
    """Write ``path`` through a ``.partial`` file renamed over it: a reader (or a stopped sweep) never sees half a
    file, and no ``.partial`` stays behind."""
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(text)
    partial.replace(path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
