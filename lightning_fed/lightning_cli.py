"""``lightning-fed fit --config recipes/hospitals.yaml``: LightningCLI with a federated report at the end.

Everything LightningCLI offers works (``--print_config``, dotted overrides such as ``--trainer.max_epochs=3``,
several ``--config`` files). After ``fit`` the global model is tested on every site's own test split, a
per-site results table is printed and ``results.json`` (per-site and federated test metrics, the config, wall
time) is written into the run's log directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.cli import LightningCLI

from lightning_fed.progress import format_bytes, per_label_table, report_columns, results_cells, show_table
from lightning_fed.strategy import FederatedStrategy


class FederatedCLI(LightningCLI):
    """LightningCLI plus ``results.mean_over`` (sites averaged in the report) and the post-fit test report."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--results.mean_over",
            type=Optional[list[str]],
            default=None,
            help="sites whose test metrics are averaged in the report (study B: the small hospitals)",
        )
        parser.add_argument(
            "--results.test_after_fit", type=bool, default=True, help="test the global model on every site after fit"
        )

    def before_fit(self) -> None:
        self._t0 = time.monotonic()
        mean_over = self.config[self.subcommand]["results"]["mean_over"]
        sites = getattr(self.datamodule, "federated_sites", None)
        if mean_over and callable(sites):  # checked before hours of training, not after
            names = [site.name for site in sites()]
            unknown = sorted(set(mean_over) - set(names))
            if unknown:
                raise ValueError(f"results.mean_over names unknown sites {unknown}: the recipe's sites are {names}")

    def after_fit(self) -> None:
        trainer, strategy = self.trainer, self.trainer.strategy
        cfg = self.config[self.subcommand]
        try:
            report: dict[str, Any] = {"wall_seconds": None}
            if cfg["results"]["test_after_fit"]:
                trainer.test(self.model, datamodule=self.datamodule, verbose=False)
                report.update(self._test_report(strategy, cfg["results"]["mean_over"]))
            report["wall_seconds"] = time.monotonic() - self._t0
            if isinstance(strategy, FederatedStrategy) and strategy.last_fit:
                fit = strategy.last_fit
                report["startup_seconds"] = fit.startup.seconds
                report["fit_started_unix"] = fit.started_at
                report["layout"] = fit.startup.layout
                report["fit_seconds"] = fit.fit_seconds
                report["round_seconds"] = fit.round_seconds
                if fit.traffic is not None:
                    report["traffic"] = fit.traffic.as_dict()
                    sent, received = fit.traffic.per_site_round()
                    print(
                        f"\ntraffic: {format_bytes(fit.traffic.total_sent)} sent to the coordinator, "
                        f"{format_bytes(fit.traffic.total_received)} received from it ({format_bytes(sent)} sent and "
                        f"{format_bytes(received)} received per site and round)"
                    )
                if any(fit.round_metrics):
                    report["round_metrics"] = fit.round_metrics
                if fit.events:  # continue mode: who was left out of which round, and who came back
                    report["site_events"] = [dataclasses.asdict(e) for e in fit.events]
                    report["round_sites"] = fit.round_sites
                if fit.privacy is not None:
                    report["privacy"] = {
                        "sites": {n: dataclasses.asdict(p) for n, p in fit.privacy.sites.items()},
                        "max_epsilon": fit.privacy.max_epsilon,
                    }
                    sites = ", ".join(
                        f"{n} ε={p.epsilon:.3g} (δ={p.delta:g}, {p.accountant.upper()})"
                        for n, p in fit.privacy.sites.items()
                    )
                    print(
                        f"\nDP-SGD, from each site's accountant: {sites}; federation: max ε={fit.privacy.max_epsilon:.3g}"
                    )
            report["config"] = json.loads(json.dumps(cfg.as_dict(), default=str))
            out = Path(trainer.log_dir or trainer.default_root_dir) / "results.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            figures = self._figures(strategy, out.parent)
            if figures:
                report["figures"] = [p.name for p in figures]
            out.write_text(json.dumps(report, indent=2, default=_jsonable))
            print(f"\nresults written to {out}" + (f" (and {', '.join(p.name for p in figures)})" if figures else ""))
        finally:
            if isinstance(strategy, FederatedStrategy):
                strategy.shutdown()

    def _figures(self, strategy: Any, out: Path) -> list[Path]:
        """The shift report (uncertainty per site and group, when the sites measured it) and the aggregation
        weights per round (when the rule reported them)."""
        from lightning_fed.shift import weights_plot, write_shift_report

        paths: list[Path] = []
        groups = getattr(self.datamodule, "group_names", None)
        evaluation = getattr(strategy, "last_evaluation", None)
        if groups and evaluation is not None:
            paths += write_shift_report(evaluation.rows(), groups, out)
        fit = getattr(strategy, "last_fit", None)
        if fit is not None and fit.round_metrics:
            plot = weights_plot(fit.round_metrics, out / "aggregation_weights.png")
            paths += [plot] if plot else []
        return paths

    def _test_report(self, strategy: Any, mean_over: Optional[list[str]]) -> dict[str, Any]:
        evaluation = strategy.last_evaluation
        table = evaluation.rows()
        sites = {n: v for n, v in table.items() if n != "federated"}
        rows = dict(sites)
        report: dict[str, Any] = {
            "test": {"sites": sites, "federated": table["federated"]},
            "confusion_matrices": evaluation.confusion_matrices,
        }
        if mean_over:
            unknown = sorted(set(mean_over) - set(sites))
            if unknown:
                raise ValueError(f"results.mean_over names unknown sites {unknown}; the sites are {sorted(sites)}")
            mean = {
                m: sum(sites[s][m] for s in mean_over) / len(mean_over)
                for m in report_columns(sites)
                if all(isinstance(sites[s].get(m), float) for s in mean_over)
            }
            report["test"]["mean_over_sites"] = {"sites": mean_over, **mean}
            rows[f"mean({','.join(mean_over)})"] = mean
        rows["federated"] = table["federated"]
        show_table(*results_cells(rows), title="\nTest results (global model, each site's own test split):")
        for kind, personal in evaluation.personal.items():  # each site's own model, e.g. "fine_tuned"
            own = personal.rows()
            report[kind] = {"sites": {n: v for n, v in own.items() if n != "federated"}, "federated": own["federated"]}
            show_table(
                *results_cells(own),
                title=f"\nTest results ({kind.replace('_', '-')} models, each site's own model on its own test split):",
            )
        fit = strategy.last_fit
        chosen = {n: s.deployment for n, s in (fit.sites.items() if fit is not None else ()) if s.deployment}
        if chosen:  # why each site deploys what it does: its validation scores (the test figures are above)
            report["deployment"] = {n: dataclasses.asdict(d) for n, d in chosen.items()}
            print(
                "\nDeployed at each site (best validation "
                + ", ".join(f"{n}: {d.chosen} {d.metric} {d.validation[d.chosen]:.4f}" for n, d in chosen.items())
                + ")"
            )
        for note in evaluation.notes:
            print(f"note: {note}")
        label_names = _label_names(self.model, self.datamodule)
        labels = per_label_table({**sites, "federated": rows["federated"]}, label_names)
        if labels:
            report["label_names"] = label_names
            print("\nAUROC per label (macro AUROC above averages the labels with support):")
            print(labels)
        return report


def _label_names(model: Any, datamodule: Any) -> Optional[list[str]]:
    names = model.hparams.get("label_names") or getattr(datamodule, "label_names", None)
    return list(names) if names else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
