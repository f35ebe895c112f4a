"""The ``lightning-fed compare``, ``sweep`` and ``replot`` commands: their flags, the checks that run before any
training, and the loop over held-out sites or grid points (:data:`COMMANDS`, dispatched by :mod:`lightning_fed.cli`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NoReturn, Optional, Sequence, Union

from lightning_fed.errors import UsageError
from lightning_fed.experiments.grid import expand_grid, point_arguments, point_label
from lightning_fed.experiments.outputs import replot, write_compare, write_leave_one_out, write_sweep
from lightning_fed.experiments.reports import CompareReport, LeaveOneOutReport, SweepReport, read_report
from lightning_fed.experiments.runs import GROUPED, METRICS, MODES, SEGMENTATION_METRICS, Experiment

if TYPE_CHECKING:
    from lightning_fed.pool import WorkerPool


class _Parser(argparse.ArgumentParser):
    """Bad flags end in one line (the command prints it), not usage plus a message."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _common_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description=description,
        allow_abbrev=False,
        epilog="Any other --key=value is a recipe override, as with `lightning-fed fit` (e.g. --trainer.max_epochs=3).",
    )
    parser.add_argument("--config", action="append", required=True, help="recipe YAML (repeatable, as for fit)")
    parser.add_argument("--repeats", type=int, default=1, help="repetitions per mode, seeds seed_everything + 0..N-1")
    parser.add_argument("--out", default=None, help="output folder (default: runs/<kind>/<recipe>-<time>)")
    parser.add_argument(
        "--metrics",
        default=None,
        help="metrics in tables and plots (default: accuracy, precision, recall, "
        "auroc; for segmentation dice, mutual_information, entropy; per vendor e.g. dice_siemens)",
    )
    parser.add_argument(
        "--fixed-data", action="store_true", help="keep the recipe's data split seed in every repetition"
    )
    parser.add_argument(
        "--no-reuse", action="store_true", help="start new site processes for every run (measure the saving)"
    )
    parser.add_argument("--progress", action="store_true", help="show each run's federated progress")
    return parser


def _out_dir(out: Optional[str], kind: str, configs: list[str]) -> Path:
    path = Path(out) if out else Path("runs") / kind / f"{Path(configs[-1]).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _metrics(text: Optional[str]) -> Optional[list[str]]:
    """The ``--metrics`` asked for (``None``: chosen from what the runs measured, :func:`reported_metrics`)."""
    if text is None:
        return None
    metrics = [m.strip() for m in text.split(",") if m.strip()]
    known = (*METRICS, *SEGMENTATION_METRICS, "aleatoric", "loss")
    unknown = [m for m in metrics if m not in known and not GROUPED.match(m)]
    if unknown:
        raise UsageError(
            f"unknown metric(s) {unknown}: choose from {', '.join(known)} (or a per-vendor one, e.g. dice_siemens)"
        )
    return metrics


def _experiment(
    args: argparse.Namespace,
    overrides: list[str],
    modes: list[str],
    holdout: Optional[str] = None,
    pool: Optional[WorkerPool] = None,
) -> Experiment:
    try:
        return Experiment(
            configs=args.config,
            overrides=overrides,
            modes=modes,
            repeats=args.repeats,
            vary_data_seed=not args.fixed_data,
            reuse_sites=not args.no_reuse,
            progress=args.progress,
            holdout=holdout,
            pool=pool,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None


def compare(argv: Sequence[str]) -> Union[CompareReport, LeaveOneOutReport]:
    """``lightning-fed compare``: pooled / local / federated on every site's test set, mean ± std, plots."""
    parser = _common_parser(
        "lightning-fed compare",
        "Train the recipe pooled, locally and federated; test every model on every site's test set.",
    )
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: pooled, local, federated")
    parser.add_argument(
        "--holdout",
        default=None,
        metavar="SITE[,SITE...]",
        help="train without SITE and test every model on it too; several: each held out in turn (leave-one-site-out)",
    )
    args, overrides = parser.parse_known_args(list(argv))
    metrics = _metrics(args.metrics)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    holdouts = [h.strip() for h in args.holdout.split(",") if h.strip()] if args.holdout else [None]
    if len(set(holdouts)) != len(holdouts):
        raise UsageError(f"--holdout names a site twice: {args.holdout}")
    out = _out_dir(args.out, "compare", args.config)
    command = ["lightning-fed", "compare", *argv]
    from lightning_fed.warm import warm_workers

    reports = {}
    # one pool (and local Ray) for every held-out site's experiment: their layouts match, so the workers stay warm
    with warm_workers(enabled=not args.no_reuse) as pool:
        for holdout in holdouts:
            experiment = _experiment(args, overrides, modes, holdout, pool)
            t0 = time.monotonic()
            with experiment:
                experiment.run_point()
            folder = out if len(holdouts) == 1 else out / f"holdout-{holdout}"
            folder.mkdir(parents=True, exist_ok=True)
            reports[holdout] = write_compare(experiment, folder, metrics, time.monotonic() - t0, command)
    if len(holdouts) == 1:
        return reports[holdouts[0]]
    return write_leave_one_out(reports, out, metrics, command)


def sweep(argv: Sequence[str]) -> SweepReport:
    """``lightning-fed sweep``: a grid of recipe overrides × modes × repetitions; one table, one line plot per metric."""
    parser = _common_parser(
        "lightning-fed sweep", "Run a grid of recipe overrides; one table and one line plot per metric."
    )
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="an axis of the grid (repeatable; the grid is their product); KEY may index a list: key[0], key[1:]",
    )
    parser.add_argument(
        "--zip",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="axes that vary together (same length), crossed with the --grid axes",
    )
    parser.add_argument("--modes", default="federated", help="comma-separated: pooled, local, federated")
    parser.add_argument(
        "--x",
        default=None,
        metavar="KEY",
        help="grid key on the plots' x axis (default: the first --grid key, else the first --zip key)",
    )
    args, overrides = parser.parse_known_args(list(argv))
    metrics = _metrics(args.metrics)
    try:
        points = expand_grid(args.grid, args.zip)
        if args.x is not None:
            if points and args.x not in points[0]:
                raise ValueError(f"--x {args.x!r} is not a grid key; the keys are {list(points[0])}")
            points = [{args.x: p[args.x], **p} for p in points]
    except ValueError as err:
        raise UsageError(str(err)) from None
    if not args.grid and not args.zip:
        raise UsageError("sweep needs at least one --grid KEY=V1,V2 (or --zip) axis (see `lightning-fed sweep --help`)")
    from lightning_fed.warm import warm_workers

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    # the points' runs share one pool (inside an enclosing warm_workers block, that block's)
    with warm_workers(enabled=not args.no_reuse) as pool:
        experiment = _experiment(args, overrides, modes, pool=pool)
        for point in points:  # every override must be valid before hours of training start
            try:
                point_arguments(point, experiment.base_config)
            except ValueError as err:
                raise UsageError(str(err)) from None
        out = _out_dir(args.out, "sweep", args.config)
        t0 = time.monotonic()
        command = ["lightning-fed", "sweep", *argv]
        with experiment:
            for i, point in enumerate(points):
                print(f"[lightning-fed] sweep point {i + 1}/{len(points)}: {point_label(point)}")
                experiment.run_point(point)
                if i + 1 < len(points):  # results so far stay on disk if the sweep is stopped or a later run fails
                    write_sweep(experiment, points[: i + 1], out, metrics, time.monotonic() - t0, command, final=False)
        return write_sweep(experiment, points, out, metrics, time.monotonic() - t0, command)


def replot_command(argv: Sequence[str]) -> list[Path]:
    """``lightning-fed replot FOLDER...``: redraw the figures of compare/sweep output folders from their results.json."""
    parser = _Parser(prog="lightning-fed replot", description=replot_command.__doc__)
    parser.add_argument("folders", nargs="+", help="folders written by lightning-fed compare or sweep")
    args = parser.parse_args(list(argv))
    paths, skipped = [], []
    for name in args.folders:
        folder = Path(name)
        if not (folder / "results.json").is_file():
            raise UsageError(f"{folder} holds no results.json: give a folder that lightning-fed compare or sweep wrote")
        if read_report(folder) is None:
            skipped.append(str(folder))  # a fit's results: its figures are drawn by the fit itself
            continue
        paths += replot(folder)
    if skipped and not paths:
        raise UsageError(
            f"{', '.join(skipped)}: results.json is not a compare's or sweep's (a fit's?): give a folder "
            "that lightning-fed compare or sweep wrote"
        )
    print(
        f"redrew {len(paths)} figure(s) in {len(args.folders) - len(skipped)} folder(s)"
        + (f"; skipped {len(skipped)} that hold a fit's results ({', '.join(skipped)})" if skipped else "")
    )
    return paths


COMMANDS: dict[str, Callable[[Sequence[str]], object]] = {"compare": compare, "sweep": sweep, "replot": replot_command}


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m lightning_fed.experiments compare|sweep|replot ...`` (``lightning-fed`` dispatches here too)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    COMMANDS[argv[0]](argv[1:])
