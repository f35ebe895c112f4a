"""The shift report (study C, step 2): which site and acquisition group (vendor) the global model is least sure
about, from each site's images alone.

Every site measures the global model's predictive uncertainty on its own test images, per group (``group`` in
its batches, e.g. the scanner vendor), and sends only sums and pixel counts
(:class:`~lightning_fed.metrics.GroupedUncertainty`). This module turns the sites' values into a table
(``shift_report.csv``) and a heat-map (``shift_report.png``): rows are sites, columns groups, cells the mean
mutual information (what the model does not know, high under domain shift) with Dice beside it where the site has
labels. ``aggregation_weights.png`` plots the weights an uncertainty-guided rule gave each site per round.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Optional, Sequence

from lightning_fed.metrics import metric_key

TERMS = ("mutual_information", "entropy", "aleatoric", "dice")


def shift_rows(rows: dict[str, dict[str, Any]], groups: Sequence[str]) -> list[dict[str, Any]]:
    """One row per site and group with images there: ``site, group, mutual_information, entropy, aleatoric, dice``
    (``dice`` ``None`` without labels; ``labels`` ``hidden`` at a site that never trained on labels)."""
    out = []
    for site, values in rows.items():
        if site == "federated":
            continue
        for group in groups:
            key = metric_key(group)
            if not isinstance(values.get(f"mutual_information_{key}"), float):
                continue
            row = {"site": site, "group": group, **{t: values.get(f"{t}_{key}") for t in TERMS}}
            row["labels"] = values.get("labels", "own")
            out.append(row)
    return out


def write_shift_report(
    rows: dict[str, dict[str, Any]], groups: Sequence[str], out: Path, title: str = ""
) -> list[Path]:
    """``shift_report.csv`` and ``shift_report.png`` under ``out`` (nothing when no site measured uncertainty per group)."""
    table = shift_rows(rows, groups)
    if not table:
        return []
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "shift_report.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["site", "group", *TERMS, "labels"])
        writer.writeheader()
        writer.writerows(table)
    return [csv_path, heat_map(table, groups, out / "shift_report.png", title)]


def heat_map(table: list[dict[str, Any]], groups: Sequence[str], path: Path, title: str = "") -> Path:
    """Sites x groups: colour = mean mutual information, text = its value and the Dice there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sites = list(dict.fromkeys(r["site"] for r in table))
    used = [g for g in groups if any(r["group"] == g for r in table)]
    grid = np.full((len(sites), len(used)), np.nan)
    text = [["" for _ in used] for _ in sites]
    for r in table:
        i, j = sites.index(r["site"]), used.index(r["group"])
        grid[i, j] = r["mutual_information"]
        dice = f"\nDice {r['dice']:.2f}" if isinstance(r.get("dice"), float) else ""
        text[i][j] = f"{r['mutual_information']:.4f}{dice}"
    width = 1.6 + 1.5 * len(used)
    fig, ax = plt.subplots(figsize=(width, max(0.9 + 0.42 * len(sites), width / 3 + 0.05)))  # never wider than 3:1
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="magma_r", aspect="auto")
    for i in range(len(sites)):
        for j in range(len(used)):
            if text[i][j]:
                light = grid[i, j] > np.nanmean(grid)
                ax.text(j, i, text[i][j], ha="center", va="center", fontsize=7, color="white" if light else "black")
    labels = [
        f"{s} (no labels)" if any(r["site"] == s and r["labels"] == "hidden" for r in table) else s for s in sites
    ]
    ax.set_xticks(range(len(used)), used)
    ax.set_yticks(range(len(sites)), labels)
    ax.set_xlabel("group (vendor); blank: no images")
    fig.colorbar(image, ax=ax, label="mutual information (nats / pixel)", fraction=0.05)
    ax.set_title(title or "Global model's uncertainty per site and vendor", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def weights_plot(round_metrics: list[dict[str, float]], path: Path, prefix: str = "weight/") -> Optional[Path]:
    """Each site's aggregation weight per round (``fl/weight/<site>``), or ``None`` if the rule reported none."""
    sites = sorted({k[len(prefix) :] for m in round_metrics for k in m if k.startswith(prefix)})
    if not sites:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    rounds = range(1, len(round_metrics) + 1)
    for site in sites:
        ax.plot(rounds, [m.get(prefix + site, float("nan")) for m in round_metrics], marker=".", label=site)
    ax.axhline(1 / len(sites), color="grey", lw=0.8, ls=":", label="equal share")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("aggregation weight")
    ax.legend(fontsize=7, ncol=2, bbox_to_anchor=(1.02, 1), loc="upper left", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
