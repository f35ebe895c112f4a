"""``lightning-fed inventory``: each site's exams by vendor, scanner model and reconstruction kernel.

Study C's first step groups each hospital's CT by acquisition condition before any training. The headers are read
*inside each site* (a Ray task with the site's resources, so on the hospital's own node when the site is pinned
there); only the counts travel back, never an image or a patient identifier::

    lightning-fed inventory --config recipes/ct_vendors.yaml       # every site of a recipe, in its own process
    lightning-fed inventory /data/hospital_a/dicom                  # a folder on this machine

A site's datamodule takes part by offering ``inventory() -> list[dict]`` (rows of :func:`count_exams`);
:class:`~lightning_fed.data.ct.CTFolderSite` reads DICOM headers with
:func:`~lightning_fed.data.dicom.read_dicom_headers`.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

from lightning_fed.data.dicom import UNKNOWN, count_exams, normalise_vendor, read_dicom_headers

__all__ = [
    "UNKNOWN",
    "count_exams",
    "folder_inventory",
    "normalise_vendor",
    "read_dicom_headers",
    "recipe_inventory",
    "site_inventory",
]

FIELDS = ("vendor", "model", "kernel", "exams", "images")


def site_inventory(datamodule: Any, site: str) -> list[dict[str, Any]]:
    """What one site's datamodule reports; a datamodule without ``inventory()`` is named with the way out."""
    hook = getattr(datamodule, "inventory", None)
    if not callable(hook):
        raise ValueError(
            f"site {site!r}: its datamodule {type(datamodule).__name__} has no inventory() method: "
            "use lightning_fed.data.CTFolderSite for real CT, or add inventory() returning count_exams(...) rows"
        )
    return [{"site": site, **row} for row in hook()]


def recipe_inventory(configs: Sequence[str], overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every site of a recipe, counted inside the site: a site pinned to its hospital's node (``resources``) in a
    Ray task on that node; the sites simulated on this cluster's shared workers together in one task (one process
    importing the data stack instead of one per site), holding the most any of them asks for."""
    import warnings

    import ray

    from lightning_fed.lightning_cli import FederatedCLI
    from lightning_fed.pool import make_room
    from lightning_fed.runtime import RayRuntime

    args = [a for c in configs for a in ("--config", c)] + list(overrides)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        cli = FederatedCLI(args=args, run=False, save_config_callback=None, parser_kwargs={"prog": "lightning-fed"})
    strategy = cli.trainer.strategy
    sites = strategy.sites(cli.datamodule, cli.model)
    runtime = RayRuntime(strategy.config.cluster.address, strategy.config.cluster.init_kwargs)
    runtime.ensure(max(s.num_cpus for s in sites))
    try:
        count = ray.remote(_count_sites)
        pinned = [s for s in sites if s.resources]
        shared = [s for s in sites if not s.resources]
        groups = [[s] for s in pinned] + ([shared] if shared else [])
        make_room(
            [{"CPU": max(s.num_cpus for s in group)} for group in groups]
        )  # warm workers of this process give way
        refs = [
            count.options(
                num_cpus=max(s.num_cpus for s in group),
                num_gpus=max(s.num_gpus for s in group),
                resources=group[0].resources or None,
            ).remote(group)
            for group in groups
        ]
        counted = {row_site: rows for result in ray.get(refs) for row_site, rows in result}
        return [row for s in sites for row in counted[s.name]]  # in the recipe's site order
    finally:
        runtime.shutdown()


def _count_sites(sites: Sequence[Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    return [(site.name, site_inventory(site.build_datamodule(), site.name)) for site in sites]


def folder_inventory(folders: Sequence[str]) -> tuple[list[dict[str, Any]], int]:
    rows, skipped = [], 0
    for folder in folders:
        records, n = read_dicom_headers(folder)
        skipped += n
        rows += [{"site": Path(folder).name, **row} for row in count_exams(records)]
    return rows, skipped


def print_table(rows: list[dict[str, Any]], file: Any = None) -> None:
    """Sites x (vendor, model, kernel) with exams and images; totals per site and vendor."""
    from lightning_fed.progress import text_table

    out = file or sys.stdout
    header = ["site", *FIELDS]
    print(text_table(header, [[str(r[h]) for h in header] for r in rows]), file=out)
    vendors: Counter = Counter()
    for r in rows:
        vendors[(r["site"], r["vendor"])] += r["exams"]
    sites = sorted({r["site"] for r in rows})
    names = sorted({v for _, v in vendors})
    print("\nExams per site and vendor:", file=out)
    print(text_table(["vendor", *sites], [[v, *(str(vendors[(s, v)]) for s in sites)] for v in names]), file=out)


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="lightning-fed inventory", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", help="DICOM folders on this machine (each counted as one site)")
    parser.add_argument("--config", action="append", default=[], help="a recipe: every site counts its own exams")
    parser.add_argument("--out", default=None, help="write the rows to this CSV file")
    args, overrides = parser.parse_known_args(argv)
    if bool(args.folders) == bool(args.config):
        raise ValueError("give either --config RECIPE (every site of the recipe) or DICOM folders, not both or neither")
    if args.config:
        rows = recipe_inventory(args.config, overrides)
    else:
        if overrides:
            raise ValueError(f"unknown arguments {overrides}: overrides need --config")
        rows, skipped = folder_inventory(args.folders)
        if skipped:
            print(f"({skipped} files were not DICOM and are not counted)")
    print_table(rows)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["site", *FIELDS])
            writer.writeheader()
            writer.writerows(rows)
        print(f"\ninventory written to {out}")
    return rows
