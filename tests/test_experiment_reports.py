"""What compare and sweep write: typed reports in results.json (written once, atomically, with their kind), read back
by kind (and by their keys when older files carry none), and figures no wider than 3:1 -- all without training."""

import json
import shutil
from pathlib import Path

import matplotlib.image
import pytest

from lightning_fed.experiments import (
    CompareReport,
    LeaveOneOutReport,
    Run,
    SweepReport,
    confusion_plot,
    heat_maps,
    legacy_kind,
    outputs,
    read_report,
    replot,
    reports,
    write_compare,
    write_leave_one_out,
    write_sweep,
)

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


class _Recorded:
    """An :class:`~lightning_fed.experiments.Experiment` after its runs, rebuilt from a results.json."""

    def __init__(self, report, group_names=None, wandb=None):
        self.runs = [Run(**r) for r in report["runs"]]
        self.configs, self.overrides = report["recipes"], report["overrides"]
        self.modes, self.repeats = report["modes"], report["repeats"]
        self.mean_over, self.label_names = report.get("mean_over"), report.get("label_names")
        self.holdout, self.group_names, self.wandb = report.get("holdout"), group_names, wandb
        self._startup = report["startup"]

    def startup_report(self):
        return dict(self._startup)


@pytest.fixture
def writes(monkeypatch):
    """Every results.json write, by path."""
    seen = []
    write = reports.write_atomically

    def record(path, text):
        seen.append(path)
        write(path, text)

    monkeypatch.setattr(reports, "write_atomically", record)
    return seen


def _aspect_ok(path: Path) -> bool:
    height, width = matplotlib.image.imread(path).shape[:2]
    return width <= 3 * height


def test_every_stored_results_json_reads_as_its_kind():
    kinds = {}
    for path in sorted(RESULTS.rglob("results.json")):
        report = read_report(path.parent)
        kinds[path.parent.relative_to(RESULTS).as_posix()] = report.kind if report is not None else None
    assert kinds["study_b"] == kinds["study_c_fiva"] == kinds["study_c_holdout_fedavg/holdout-E"] == "compare"
    assert kinds["study_b_sweep_count"] == kinds["wire_ct"] == "sweep"
    assert kinds["study_c_holdout_fedavg"] == "leave_one_out"
    assert kinds["study_c_fit"] is None and kinds["privacy_dp"] is None  # a fit's results, a benchmark's list
    assert legacy_kind({"summary": {}}) == "compare" and legacy_kind({"test": {}}) is None


def test_replot_goes_by_kind(tmp_path):
    old = tmp_path / "old"
    shutil.copytree(RESULTS / "study_b_sweep_count", old)
    stored = json.loads((old / "results.json").read_text())
    assert "kind" not in stored and {p.name for p in replot(old)} == set(stored["plots"])  # read by its keys

    new = tmp_path / "new"
    new.mkdir()
    data = read_report(RESULTS / "study_a").to_json()
    assert next(iter(data)) == "kind" and data["kind"] == "compare"
    data["grid"] = ["stray"]  # a key only sweeps once wrote: the kind decides, not the keys
    (new / "results.json").write_text(json.dumps(data))
    names = {p.name for p in replot(new)}
    assert {"accuracy.png", "accuracy_models_by_site.png", "confusion_matrices.png"} <= names
    data["kind"] = "sweep"
    (new / "results.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="lacks 'points'"):
        replot(new)


def test_leave_one_out_folder_redraws_each_held_out_site(tmp_path):
    folder = tmp_path / "loo"
    shutil.copytree(RESULTS / "study_c_holdout_fedavg", folder)
    paths = replot(folder)
    assert {p.parent.name for p in paths} == {"holdout-E", "holdout-G", "holdout-J"}
    assert all(_aspect_ok(p) for p in paths)  # two model rows on 11 test sets: taller cells, not a strip


def test_single_model_compare_has_no_strip_wider_than_three_to_one(tmp_path):
    folder = tmp_path / "fiva"
    shutil.copytree(RESULTS / "study_c_fiva", folder)
    for old in folder.glob("*_models_by_site.png"):
        old.unlink()
    paths = replot(folder)
    assert paths and not any(p.name.endswith("_models_by_site.png") for p in paths)  # one model: the dot plot says it
    assert all(_aspect_ok(p) for p in paths)
    summary = read_report(RESULTS / "study_c_fiva").summary
    assert heat_maps(summary, ["dice"], ["A", "B"], ["federated"], tmp_path, "t") == []
    heart = read_report(RESULTS / "heart_disease")  # one model's confusion matrices at 4 hospitals and merged: wrapped
    plot = confusion_plot(
        heart.confusion_matrices, ["federated"], [*heart.sites, "federated"], tmp_path, heart.label_names
    )
    assert _aspect_ok(plot)
    plot = confusion_plot(
        heart.confusion_matrices, ["pooled", "local", "federated"], [*heart.sites, "federated"], tmp_path
    )
    height, width = matplotlib.image.imread(plot).shape[:2]
    assert (width, height) == (1265, 726)  # where a row per model fits, the layout is as before


def test_compare_writes_results_json_once_atomically(tmp_path, writes, monkeypatch):
    stored = json.loads((RESULTS / "study_c_fiva" / "results.json").read_text())
    monkeypatch.setattr(outputs, "log_to_wandb", lambda *args: "wandb/run-1/files")
    experiment = _Recorded(stored, group_names=("ge", "philips", "siemens", "canon"), wandb={"name": "fiva"})
    report = write_compare(experiment, tmp_path, stored["metrics"], stored["wall_seconds"], stored["command"].split())
    assert writes == [tmp_path / "results.json"]  # once, with the W&B folder in it
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".png")) == ["results.json", "results.md"]
    written = json.loads((tmp_path / "results.json").read_text())
    assert list(written)[:2] == ["kind", "command"] and written["wandb_dir"] == "wandb/run-1/files"
    assert isinstance(report, CompareReport) and json.dumps(CompareReport.from_json(written).to_json()) == json.dumps(
        written
    )
    assert json.dumps(report.to_json()) == json.dumps(written)  # what compare returns is what it wrote
    for key in ("sites", "columns", "models", "seeds", "metrics", "summary", "confusion_matrices"):
        assert written[key] == stored[key], key  # the stored run's numbers, written again
    assert report["summary"] == report.summary and "summary" in report


def test_sweep_writes_results_json_once_per_point(tmp_path, writes):
    stored = json.loads((RESULTS / "wire_study_b" / "results.json").read_text())
    experiment = _Recorded(stored)
    if stored["column"].startswith("mean("):  # a sweep keeps only its column's name
        experiment.mean_over = stored["column"][len("mean(") : -1].split(",")
    points, metrics = stored["points"], list(stored["rows"][0]["metrics"])
    write_sweep(experiment, points[:1], tmp_path, metrics, 1.0, ["lightning-fed", "sweep"], final=False)
    report = write_sweep(experiment, points, tmp_path, metrics, 2.0, ["lightning-fed", "sweep"])
    assert writes == [tmp_path / "results.json"] * 2 and not list(tmp_path.glob("*.partial"))
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["kind"] == "sweep" and "wandb_dir" not in written
    assert SweepReport.from_json(written).rows == json.loads(json.dumps(report.rows)) == stored["rows"]


def test_leave_one_out_report_round_trips(tmp_path, writes):
    stored = json.loads((RESULTS / "study_c_holdout_fedavg" / "results.json").read_text())
    held = {h: read_report(RESULTS / "study_c_holdout_fedavg" / f"holdout-{h}") for h in stored["holdouts"]}
    report = write_leave_one_out(held, tmp_path, None, ["lightning-fed", "compare"])
    assert writes == [tmp_path / "results.json"]
    again = read_report(tmp_path)
    assert isinstance(again, LeaveOneOutReport) and again == report
    assert json.loads(json.dumps(report.rows)) == stored["rows"] and report.folders == stored["folders"]
