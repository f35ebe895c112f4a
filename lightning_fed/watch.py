"""The driver watching a fit while the sites train: each poll of the coordinator is shown (one progress view, never
one progress bar per site) and what is new in it goes to the driver's loggers; at the end, what it saw of the rounds
goes into the :class:`~lightning_fed.results.FitResult`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from lightning_fed.loggers import log_driver_metrics
from lightning_fed.metrics import federated_metrics
from lightning_fed.progress import FederatedProgress
from lightning_fed.results import FitResult, PrivacyReport, ProgressSnapshot, SiteFit, Startup, TrafficReport
from lightning_fed.strategies.base import GlobalModel


class FitWatch:
    """What the driver makes of the coordinator's :class:`~lightning_fed.results.ProgressSnapshot` during a fit.

    The driver's loggers get the federated metrics of every merged validation (at its epoch, with each site's own
    values under ``site/<name>/...``) and, once per aggregated round (at the round's last epoch), the aggregator's
    figures, how many sites the round combined and the bytes each site sent and received in it.

    Args:
        total_rounds: rounds the fit makes (for the progress view's ``r/N`` and time left).
        loggers: the driver Trainer's loggers.
        sync_every: epochs (or optimizer steps, with step rounds) per round: where round figures are logged.
        show: draw the progress view (``FederatedStrategy(progress=...)``).
    """

    def __init__(self, total_rounds: int, loggers: Sequence[Any], sync_every: int, show: bool = True) -> None:
        self.view = FederatedProgress(total_rounds, enabled=show)
        self.loggers = list(loggers)
        self.sync_every = sync_every
        self.snapshot: Optional[ProgressSnapshot] = None  # the latest
        self.metrics: dict[str, Any] = {}  # the latest federated values (``fl/...``)
        self._rounds_logged = 0

    @property
    def since(self) -> int:
        """Merged validations seen so far: the next poll asks for those after them."""
        return self.snapshot.history_len if self.snapshot is not None else 0

    @property
    def rounds(self) -> int:
        """Rounds aggregated, as last seen (0 before the first poll)."""
        return self.snapshot.round if self.snapshot is not None else 0

    def update(self, snapshot: ProgressSnapshot) -> None:
        """Take a new poll: log what is new, redraw the view."""
        self.snapshot = snapshot
        self._log_rounds(snapshot)
        for entry in snapshot.history:
            fl = federated_metrics(entry.merged, entry.stage)
            self.metrics.update(fl)
            site_scalars = {}
            for site, values in entry.sites.items():
                for key, value in values.items():
                    site_scalars[key if key.startswith("site/") else f"site/{site}/{key}"] = value
            log_driver_metrics(self.loggers, {**fl, **site_scalars}, step=entry.epoch)
        self.view.update(snapshot, self.metrics)

    def _log_rounds(self, snapshot: ProgressSnapshot) -> None:
        rounds, reported, traffic = snapshot.round_sites, snapshot.round_metrics, snapshot.traffic
        for number in range(self._rounds_logged, len(rounds)):  # each round once aggregated
            index = snapshot.round - len(rounds) + number  # the round's number - 1 (a resumed run starts later)
            figures = {f"fl/{k}": v for k, v in (reported[number] if number < len(reported) else {}).items()}
            figures["fl/sites_in_round"] = float(len(rounds[number]))
            # bytes per round: complete the moment the round is aggregated (lightning_fed.traffic)
            crossed = {
                s: (v["sent"][index], v["received"][index]) for s, v in traffic.items() if index < len(v["sent"])
            }
            for s, (sent, received) in crossed.items():
                figures[f"site/{s}/bytes_sent"], figures[f"site/{s}/bytes_received"] = float(sent), float(received)
            figures["fl/bytes_sent"] = float(sum(v[0] for v in crossed.values()))
            figures["fl/bytes_received"] = float(sum(v[1] for v in crossed.values()))
            log_driver_metrics(self.loggers, figures, step=(index + 1) * self.sync_every - 1)  # the round's last epoch
        self._rounds_logged = len(rounds)

    def close(self) -> None:
        self.view.close()

    def result(
        self,
        sites: dict[str, SiteFit],
        global_model: Optional[GlobalModel],
        traffic: TrafficReport,
        startup: Startup,
        fit_seconds: float,
        started_at: float,
    ) -> FitResult:
        """The fit as it ended: the sites' results and the global model with what this watch saw of the rounds."""
        snapshot = self.snapshot
        assert snapshot is not None, "the fit was never polled"
        private = {n: s.privacy for n, s in sites.items() if s.privacy is not None}
        return FitResult(
            sites=sites,
            global_model=global_model if global_model is not None and global_model.round > 0 else None,
            metrics={k: v for k, v in self.metrics.items() if isinstance(v, float)},
            round_seconds=list(snapshot.round_seconds),
            aggregate_seconds=list(snapshot.aggregate_seconds),
            fit_seconds=fit_seconds,
            startup=startup,
            privacy=PrivacyReport(private) if private else None,
            started_at=started_at,
            events=list(snapshot.events),
            round_sites=list(snapshot.round_sites),
            round_metrics=list(snapshot.round_metrics),
            traffic=traffic,
        )
