"""Figures that show the differences (fitted axes, bounded size, heat-maps equal to the results), the live progress
table and its plain-text fallback, tables drawn with rich only on a terminal."""

import dataclasses
import io
import json
import shutil
from pathlib import Path

import matplotlib.image
import pytest

from lightning_fed import experiments
from lightning_fed.errors import UsageError
from lightning_fed.experiments import fitted_limits, model_site_matrix, plots, replot
from lightning_fed.progress import FederatedProgress, show_table
from lightning_fed.results import ProgressSnapshot, SiteEvent
from tests.test_cli import _main

REPO = Path(__file__).resolve().parents[1]
STUDY_B = REPO / "docs" / "results" / "study_b"


@pytest.fixture
def drawn(monkeypatch):
    """Every figure the writers save: its axes' value limits and cell texts, read before it is written."""
    seen = {}
    save = plots._save

    def record(plt, fig, path):
        ax = fig.axes[0]
        legend = ax.get_legend()
        seen[path.name] = {
            "ylim": ax.get_ylim(),
            "texts": [t.get_text() for t in ax.texts],
            "legend": [t.get_text() for t in legend.get_texts()] if legend else [],
            "xlabel": ax.get_xlabel(),
        }
        return save(plt, fig, path)

    monkeypatch.setattr(plots, "_save", record)
    return seen


def test_fitted_limits_frame_the_data_not_zero():
    lo, hi = fitted_limits([0.81, 0.9], [0.95, 0.99])
    assert 0.79 < lo < 0.81 and 0.99 < hi < 1.01
    lo, hi = fitted_limits([0.5], [0.5])  # one value: a minimum span around it
    assert lo < 0.5 < hi and hi - lo >= 0.02


def test_compare_figures_fit_the_axis_to_the_data_and_stay_small(tmp_path, drawn):
    folder = tmp_path / "study_b"
    shutil.copytree(STUDY_B, folder)
    report = json.loads((folder / "results.json").read_text())
    paths = replot(folder)
    names = {p.name for p in paths}
    assert {"recall.png", "recall_models_by_site.png", "auroc.png", "confusion_matrices.png"} <= names
    for path in paths:
        height, width = matplotlib.image.imread(path).shape[:2]
        assert width <= 1100 and height <= 600 or path.name == "confusion_matrices.png", (path.name, width, height)
    summary = report["summary"]
    for metric in ("recall", "precision", "auroc"):
        stats = [s[metric] for by_column in summary.values() for s in by_column.values() if metric in s]
        lows = [s["mean"] - s["std"] for s in stats]
        highs = [s["mean"] + s["std"] for s in stats]
        ylim = drawn[f"{metric}.png"]["ylim"]
        assert ylim[0] <= min(lows) and ylim[1] >= max(highs)  # every error bar inside the plot
        assert ylim[0] > 0.3 and ylim[1] - ylim[0] < 1.0  # ... and the axis no wider than the data needs
        assert ylim[0] >= min(lows) - 0.1 * (max(highs) - min(lows)) - 0.01


def test_heat_map_cells_are_the_results_values(tmp_path, drawn):
    folder = tmp_path / "study_b"
    shutil.copytree(STUDY_B, folder)
    report = json.loads((folder / "results.json").read_text())
    replot(folder)
    matrix = model_site_matrix(report["summary"], "recall", report["models"], report["columns"])
    for i, model in enumerate(report["models"]):
        for j, column in enumerate(report["columns"]):
            assert matrix[i][j] == report["summary"][model][column]["recall"]["mean"]
    texts = drawn["recall_models_by_site.png"]["texts"]
    assert texts == [f"{v:.3f}" for row in matrix for v in row if v is not None]  # row by row, as drawn


def test_sweep_lines_follow_the_grid_not_the_zipped_partner_of_the_x_axis(tmp_path, drawn):
    folder = tmp_path / "sweep"
    shutil.copytree(REPO / "docs" / "results" / "study_b_sweep_count", folder)
    replot(folder)
    recall = drawn["recall.png"]
    assert len(recall["legend"]) == 4  # one line per small-hospital ratio; the large hospital's size moves with x
    assert recall["xlabel"] == "data.positive_ratios[0] (data.sizes[0] with it)"


def test_replot_command_says_what_it_needs(tmp_path, monkeypatch, capsys):
    with pytest.raises(UsageError, match="holds no results.json"):
        experiments.replot_command([str(tmp_path)])
    (tmp_path / "fit").mkdir()
    (tmp_path / "fit" / "results.json").write_text(json.dumps({"test": {}, "wall_seconds": 1.0}))
    with pytest.raises(UsageError, match="is not a compare's or sweep's"):
        experiments.replot_command([str(tmp_path / "fit")])
    code, _, err = _main(["replot", str(tmp_path)], monkeypatch, capsys)  # the command says it in one line
    assert code == 2 and "holds no results.json" in err.strip().splitlines()[-1]


SNAPSHOT = ProgressSnapshot(
    round=2,
    events=[],
    sites={
        "large": {"status": "training", "epoch": 3, "global_step": 120, "metrics": {"train_loss": 0.4321}},
        "small_1": {"status": "done", "epoch": 4, "global_step": 40, "metrics": {}},
    },
    traffic={
        "large": {"sent": [1_500_000, 500_000], "received": [2_000_000, 1_000_000]},
        "small_1": {"sent": [12_000, 8_000], "received": [2_000_000, 1_000_000]},
    },
)


def test_live_progress_table_on_a_terminal():
    from rich.console import Console

    buffer = io.StringIO()
    progress = FederatedProgress(4, console=Console(file=buffer, force_terminal=True, width=120, color_system=None))
    progress.update(SNAPSHOT, {"fl/val_loss": 0.25})
    progress.update(
        dataclasses.replace(
            SNAPSHOT, events=[SiteEvent(round=3, site="small_1", event="left out", reason="died", time=0.0)]
        ),
        {},
    )
    progress.close()
    text = buffer.getvalue()
    assert "round 2/4" in text and "left" in text  # the title: round, elapsed, time left
    for cell in (
        "large",
        "120",
        "training",
        "0.4321",
        "small_1",
        "done",
        "fl/val_loss=0.2500",
        "2.00 MB",
        "3.00 MB",
        "20.0 kB",
    ):
        assert cell in text, cell
    assert "[lightning-fed] site 'small_1' left out (round 3): died" in text  # events stay above the table
    assert "\x1b[1A" in text  # redrawn in place: the cursor goes back up over the previous table


def test_progress_falls_back_to_lines_without_a_terminal():
    stream = io.StringIO()  # not a terminal: CI, `ray job logs`, a file
    progress = FederatedProgress(4, stream=stream)
    progress.update(SNAPSHOT, {"fl/val_loss": 0.25})
    progress.update(SNAPSHOT, {"fl/val_loss": 0.25})  # nothing changed: no new line
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "[lightning-fed] round 2/4 | large: e3 training | small_1: e4 done | 2.02 MB sent"
    )
    assert "┏" not in stream.getvalue() and "\x1b" not in stream.getvalue()


def test_tables_are_plain_text_when_piped():
    stream = io.StringIO()
    show_table(
        ["site", "recall"], [["large", "0.9900"], ["federated", "0.9800"]], title="\nTest results:", stream=stream
    )
    assert stream.getvalue().splitlines() == [
        "",
        "Test results:",
        "site       recall",
        "---------  ------",
        "large      0.9900",
        "federated  0.9800",
    ]


def test_results_tables_show_the_columns_of_the_task():
    from lightning_fed.progress import report_columns

    assert report_columns({"a": {"loss": 0.3, "accuracy": 0.9, "auroc": 0.95}})[1] == "accuracy"
    assert report_columns({"a": {"loss": 0.3, "dice": 0.8}}) == ("loss", "dice", "entropy", "mutual_information")
    # a Cox model: its concordance index, not the event read as a class label
    survival = {"northeast": {"loss": 2.1, "c_index": 0.74, "accuracy": 0.2}, "federated": {"c_index": 0.7}}
    assert report_columns(survival) == ("loss", "c_index")
