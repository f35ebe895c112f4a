"""What a federation hands back: typed results, read by the launcher, the CLI and ``compare``/``sweep``.

Sites return :class:`SiteReady`, :class:`SiteFit` and :class:`SiteEvaluation`; the driver combines them into a
:class:`FitResult` (``strategy.last_fit``) and an :class:`Evaluation` (``strategy.last_evaluation``). Nothing here
holds a sample or a per-sample output: scalars, counts, metric states and loop counters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from lightning_fed.strategies.base import GlobalModel


@dataclass(frozen=True)
class SiteReady:
    """A site set up in its worker: its data is there (``train_samples``: -1 when the loader cannot tell)."""

    site: str
    train_samples: int
    device: str
    node: str
    worker: int
    worker_marker: str = ""  # where the worker notes which site computes (see lightning_fed.worker)


@dataclass(frozen=True)
class SitePrivacy:
    """One site's DP-SGD as its accountant saw it."""

    epsilon: float
    delta: float
    noise_multiplier: Optional[float]
    sample_rate: Optional[float]
    max_grad_norm: float
    steps: int
    epsilon_per_epoch: list[float]
    accountant: str = "rdp"


@dataclass(frozen=True)
class SiteFineTuning:
    """One site's fine-tuning after the federated run (:class:`~lightning_fed.config.FineTuning`)."""

    steps: int  # optimizer steps it took
    epochs: int  # epochs it started
    seconds: float
    checkpoint: Optional[str]  # where the fine-tuned model is kept, at the site
    train_metrics: dict[str, float]  # what the module logged in training, as the last step left it


@dataclass(frozen=True)
class SiteDeployment:
    """The model a site chose to deploy (:class:`~lightning_fed.config.Deployment`), and why: only scores."""

    chosen: str  # "global", "personal", "fine_tuned", "local"
    metric: str
    validation: dict[str, float]  # each candidate's validation score, by name
    temperature: Optional[float]  # the fitted temperature (None: not a classification, or calibrate=False)
    validation_ece: Optional[tuple[float, float]]  # expected calibration error on validation, before and after
    checkpoint: str  # where the chosen model and its temperature are kept, at the site


@dataclass(frozen=True)
class SiteFit:
    """One site's ``fit``, as it ended."""

    site: str
    epoch: int
    global_step: int
    fit_loop: dict[str, Any]  # Lightning's loop state: the driver's Trainer takes its counters from it
    callback_metrics: dict[str, float]
    best_model_path: Optional[str]
    sync_seconds: list[float]  # time inside each hand-over, waiting for slower sites included
    privacy: Optional[SitePrivacy] = None
    fine_tuning: Optional[SiteFineTuning] = None
    deployment: Optional[SiteDeployment] = None


@dataclass(frozen=True)
class SiteEvent:
    """A site left out of, or back in, the federation (``on_site_failure="continue"``)."""

    round: int  # the round it left or rejoins at
    site: str
    event: str  # "left out", "out for good" or "rejoined"
    reason: str
    time: float  # wall-clock (``time.time()``)

    def line(self) -> str:
        return f"site {self.site!r} {self.event} (round {self.round}){': ' + self.reason if self.reason else ''}"


@dataclass(frozen=True)
class MergedValidation:
    """One validation merged over the sites (metric states summed, scalars sample-weighted)."""

    stage: str  # "val"
    epoch: int
    round: int  # rounds aggregated when it ran
    merged: dict[str, Any]  # what :func:`~lightning_fed.metric_states.merge_reports` returned
    sites: dict[str, dict[str, Any]]  # each site's own scalars and values, by site


@dataclass(frozen=True)
class ProgressSnapshot:
    """Where a running federation stands, as the coordinator sees it: what the driver's progress view and loggers
    read while the sites train (``Coordinator.progress``)."""

    round: int  # rounds aggregated so far
    sites: dict[str, dict[str, Any]]  # each site's last report: status, epoch, global_step, metrics
    history: list[MergedValidation] = field(default_factory=list)  # merged validations from the poll's ``since`` on
    history_len: int = 0  # merged validations so far: the next poll's ``since``
    round_seconds: list[float] = field(default_factory=list)
    aggregate_seconds: list[float] = field(default_factory=list)
    aborted: Optional[str] = None  # why the run stopped, if it did
    events: list[SiteEvent] = field(default_factory=list)  # sites left out and rejoined, in order
    round_sites: list[list[str]] = field(default_factory=list)  # the sites each aggregated round combined
    round_metrics: list[dict[str, float]] = field(default_factory=list)  # the aggregator's figures per round
    traffic: dict[str, dict[str, list[int]]] = field(
        default_factory=dict
    )  # bytes per site and round, the round in progress last


@dataclass(frozen=True)
class PrivacyReport:
    """DP-SGD over the federation: each private site's accountant, and the guarantee of the weakest (max ε)."""

    sites: dict[str, SitePrivacy]

    @property
    def max_epsilon(self) -> float:
        return max(p.epsilon for p in self.sites.values())


@dataclass(frozen=True)
class TrafficReport:
    """Bytes that crossed between each site and the coordinator, per round (serialized sizes, see
    :mod:`lightning_fed.traffic`): ``sent[site][r]`` and ``received[site][r]`` for round ``r + 1``; ``update_sent``:
    the part of ``sent`` that was the site's hand-over (its update), the rest being metric states, agreed
    decisions, status reports and key exchanges."""

    sent: dict[str, list[int]]
    received: dict[str, list[int]]
    update_sent: dict[str, list[int]] = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        return max((len(v) for v in self.sent.values()), default=0)

    @property
    def total_sent(self) -> int:
        return sum(sum(v) for v in self.sent.values())

    @property
    def total_received(self) -> int:
        return sum(sum(v) for v in self.received.values())

    def per_site_round(self) -> tuple[float, float]:
        """Mean bytes one site sends and receives in one round."""
        slots = sum(len(v) for v in self.sent.values()) or 1
        return self.total_sent / slots, self.total_received / slots

    def update_per_site_round(self) -> float:
        """Mean bytes of one site's update (its hand-over) in one round."""
        slots = sum(len(v) for v in self.update_sent.values()) or 1
        return sum(sum(v) for v in self.update_sent.values()) / slots

    def as_dict(self) -> dict[str, Any]:
        """What ``results.json`` holds: per site and round, and the totals."""
        sites = {
            s: {
                "bytes_sent": self.sent[s],
                "bytes_received": self.received.get(s, []),
                "update_bytes_sent": self.update_sent.get(s, []),
                "total_sent": sum(self.sent[s]),
                "total_received": sum(self.received.get(s, [])),
            }
            for s in self.sent
        }
        per_round = self.per_site_round()
        return {
            "sites": sites,
            "bytes_sent": self.total_sent,
            "bytes_received": self.total_received,
            "bytes_sent_per_site_round": per_round[0],
            "bytes_received_per_site_round": per_round[1],
            "update_bytes_per_site_round": self.update_per_site_round(),
        }

    @classmethod
    def from_ledger(cls, per_site: dict[str, dict[str, list[int]]]) -> "TrafficReport":
        return cls(
            {s: list(v["sent"]) for s, v in per_site.items()},
            {s: list(v["received"]) for s, v in per_site.items()},
            {s: list(v.get("update_sent", [])) for s, v in per_site.items()},
        )


@dataclass(frozen=True)
class Startup:
    """Where start-up went: seconds from ``fit``/``test`` entry to every site ready, and the layout used."""

    seconds: float
    workers: int
    layout: str
    warm: bool  # every worker was reused from an earlier run of the same layout


@dataclass(frozen=True)
class FitResult:
    """A federated ``fit``: every site's end state, the global model, federated metrics and timings."""

    sites: dict[str, SiteFit]
    global_model: Optional[GlobalModel]
    metrics: dict[str, float]  # the last federated ``fl/...`` values
    round_seconds: list[float]
    aggregate_seconds: list[float]
    fit_seconds: float
    startup: Startup
    privacy: Optional[PrivacyReport] = None
    started_at: float = 0.0  # wall-clock time (``time.time()``) at which the sites were told to train
    events: list[SiteEvent] = field(default_factory=list)  # sites left out and rejoined, in order
    round_sites: list[list[str]] = field(default_factory=list)  # the sites each round aggregated
    round_metrics: list[dict[str, float]] = field(
        default_factory=list
    )  # the aggregator's figures per round (site weights, ...)
    traffic: Optional[TrafficReport] = None  # bytes each site sent and received per round

    @property
    def sync_seconds(self) -> dict[str, list[float]]:
        return {name: s.sync_seconds for name, s in self.sites.items()}


@dataclass(frozen=True)
class SiteEvaluation:
    """One site's ``test``/``validate`` of a model on its own data."""

    site: str
    scalars: dict[str, float]  # what the module logged (``test_loss``, ...)
    num_samples: int
    metrics: Optional[dict[str, Any]]  # mergeable metric states (never predictions)
    values: dict[str, Any]  # lightning-fed's metrics at this site (accuracy, AUROC, confusion matrix, ...)
    note: Optional[str] = None
    hidden_labels: bool = (
        False  # a site without ground truth: any label-based value comes from labels it never trained on
    )
    personal: dict[str, "SiteEvaluation"] = field(
        default_factory=dict
    )  # the site's own models (``"fine_tuned"``), each tested on this site's data

    def report(self) -> dict[str, Any]:
        """What merging needs (:func:`lightning_fed.metric_states.merge_reports`)."""
        return {"scalars": self.scalars, "num_samples": self.num_samples, "metrics": self.metrics}


@dataclass(frozen=True)
class Evaluation:
    """A model tested (or validated) at every site on its own data, and over all of them merged.

    ``federated`` is the metrics of every site's predictions pooled: scalars sample-weighted, classification
    metrics from summed states, never averaged values.
    """

    stage: str  # "test" | "validate"
    sites: dict[str, SiteEvaluation]
    federated: dict[str, Any]  # fl/<split>_<metric> -> value
    notes: list[str] = field(default_factory=list)
    personal: dict[str, "Evaluation"] = field(
        default_factory=dict
    )  # each site's own model of a kind (``"fine_tuned"``) at that site, merged as above

    @property
    def split(self) -> str:
        return "test" if self.stage == "test" else "val"

    def rows(self) -> dict[str, dict[str, Any]]:
        """One row per site and ``"federated"``, keys without the split prefix (``loss``, ``auroc``, ...)."""
        prefix = self.split
        rows = {
            name: {
                **{k.removeprefix(f"{prefix}_"): v for k, v in r.scalars.items()},
                **r.values,
                **({"labels": "hidden"} if r.hidden_labels else {}),
            }
            for name, r in self.sites.items()
        }
        rows["federated"] = {k.removeprefix(f"fl/{prefix}_"): v for k, v in self.federated.items()}
        return rows

    def metrics(self) -> dict[str, float]:
        """The flat scalar dict ``trainer.test()``/``validate()`` return: the module's own keys (``test_acc``, ...)
        with their federated values, as if one model had seen every site's data, then ``fl/...`` and
        ``site/<name>/...``."""
        own = {k for r in self.sites.values() for k in r.scalars}
        out: dict[str, float] = {
            k: self.federated[f"fl/{k}"] for k in sorted(own) if isinstance(self.federated.get(f"fl/{k}"), float)
        }
        out.update({k: v for k, v in self.federated.items() if isinstance(v, float)})
        for name, result in self.sites.items():
            out.update({f"site/{name}/{k}": v for k, v in result.scalars.items()})
            out.update({f"site/{name}/{self.split}_{k}": v for k, v in result.values.items() if isinstance(v, float)})
        for kind, evaluation in self.personal.items():  # ``fine_tuned/test_acc``, ``fine_tuned/site/<name>/...``
            out.update({f"{kind}/{k}": v for k, v in evaluation.metrics().items()})
        return out

    @property
    def confusion_matrices(self) -> dict[str, Any]:
        return {
            **{n: r.values.get("confusion_matrix") for n, r in self.sites.items()},
            "federated": self.federated.get(f"fl/{self.split}_confusion_matrix"),
        }
