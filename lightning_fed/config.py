"""The federation's settings, grouped: what the strategy is given and what it passes down, frozen.

``FederatedStrategy`` takes the algorithm's options directly and the rest in four small groups::

    FederatedStrategy(
        aggregator="fedavg", sync_every=1,
        simulation=Simulation(num_sites=4, partitioner=Dirichlet(alpha=0.5)),   # splitting a plain datamodule
        placement=Placement(sites_per_worker=1),                                 # sites onto worker processes
        checkpointing=Checkpointing(every_n_rounds=2, keep=3),                   # round checkpoints
        cluster=Cluster(address="auto"),                                         # which Ray cluster
    )

Today's flat names still work as shorthands (``FederatedStrategy(num_sites=4, checkpoint_every=0)`` and the same keys
in recipes); :func:`shorthand_groups` maps them onto the groups. Nothing below the strategy reads the strategy: the
launcher, the federation and the workers get one frozen :class:`FederationConfig`; the coordinator gets the groups it
needs. This module never imports torch: the coordinator's process reads it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional

from lightning_fed.privacy_settings import DPSGD, PrivacySpec
from lightning_fed.rounds import RoundSchedule
from lightning_fed.strategies.base import Aggregator

if TYPE_CHECKING:  # importing lightning_fed.data loads torch; jsonargparse still resolves the name from this block
    from lightning_fed.data.partition import Partitioner


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class Simulation:
    """How a plain datamodule (one without ``federated_sites()``) is split into simulated sites.

    Args:
        num_sites: how many sites.
        partitioner: how the training split is divided (:class:`~lightning_fed.data.IID` with the strategy's seed by
            default; ``Dirichlet``, ``SizeAndRatio``, or any callable ``(labels, num_sites) -> index arrays``).
        site_cpus, site_gpus: what each simulated site needs while it trains (CPU threads, GPU share).
    """

    num_sites: int = 2
    partitioner: Optional[Partitioner] = None
    site_cpus: float = 1.0
    site_gpus: float = 0.0

    def __post_init__(self) -> None:
        _check_int("num_sites", self.num_sites, 1)
        if self.site_cpus < 0 or self.site_gpus < 0:
            raise ValueError(f"site_cpus and site_gpus must be >= 0, got {self.site_cpus}, {self.site_gpus}")


@dataclass(frozen=True)
class Placement:
    """How sites are placed onto worker processes (Ray actors).

    A worker hosts one or more sites and runs them one at a time with all of its threads; each site keeps its own
    Trainer, module, optimizer, callbacks and random streams, so placement never changes results. Sites pinned to
    a node (a custom resource such as ``{"site:hospital_a": 1}``) always get a worker of their own.

    Args:
        workers: how many workers share the sites that are not pinned (``None``: chosen from the cluster's free
            CPUs/GPUs and the sites' sizes, see :func:`lightning_fed.placement.place_sites`).
        sites_per_worker: at most this many sites per worker (``1``: one process per site). Give at most one of
            ``workers`` and ``sites_per_worker``.
        worker_cpus: CPUs (torch threads) each shared worker holds (default: the most any of its sites asks for,
            or with neither ``workers`` nor ``sites_per_worker`` the cost model's choice).
        timeout: seconds to wait for the cluster to hold every worker before failing with the resources it lacks.
    """

    workers: Optional[int] = None
    sites_per_worker: Optional[int] = None
    worker_cpus: Optional[float] = None
    timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.workers is not None and self.sites_per_worker is not None:
            raise ValueError("give placement.workers or placement.sites_per_worker, not both")
        if self.workers is not None:
            _check_int("placement.workers", self.workers, 1)
        if self.sites_per_worker is not None:
            _check_int("placement.sites_per_worker", self.sites_per_worker, 1)
        if self.worker_cpus is not None and self.worker_cpus <= 0:
            raise ValueError(f"placement.worker_cpus must be > 0, got {self.worker_cpus}")
        if self.timeout <= 0:
            raise ValueError(f"placement.timeout must be > 0 seconds, got {self.timeout}")

    @property
    def automatic(self) -> bool:
        """Whether the layout is left to the cost model (nothing fixed but perhaps the timeout)."""
        return self.workers is None and self.sites_per_worker is None and self.worker_cpus is None


@dataclass(frozen=True)
class Checkpointing:
    """Round checkpoints: every site's full Lightning checkpoint plus the server's state, committed together.

    Args:
        dirpath: where round folders go (default ``<log_dir>/federated_checkpoints``); ``fit(ckpt_path=<that folder>)``
            or ``fit(ckpt_path="last")`` resumes the federation from its newest complete round.
        every_n_rounds: rounds between checkpoints (0: none).
        keep: complete rounds kept on disk.
    """

    dirpath: Optional[str] = None
    every_n_rounds: int = 1
    keep: int = 2

    def __post_init__(self) -> None:
        _check_int("checkpoint every_n_rounds", self.every_n_rounds, 0)
        _check_int("keep (checkpoints kept)", self.keep, 0)


@dataclass(frozen=True)
class Reliability:
    """What a federation tolerates, and how it guards the global model.

    Args:
        on_site_failure: ``"abort"`` (default) ends the run, naming the site, when a site raises, dies, misses
            ``round_timeout`` or sends an update that is refused; ``"continue"`` leaves that site out of the round
            (the rule aggregates the sites that reported, weights renormalised), restarts it from its last committed
            round checkpoint (a new worker process when its worker died) and lets it rejoin at the next round with
            that round's global model. Sites sharing a worker process fail together when it dies. A site that fails
            three times without the federation finishing a round in between stays out for the rest of the run.
        min_sites: with ``"continue"``, the fewest sites a round may aggregate; the run aborts cleanly below it
            (default: 1).
        round_timeout: seconds a round may take, from the previous round's global model to the last update; a site
            that has not handed in its update by then is left out (``"continue"``) or the run aborts naming it
            (None: no deadline).
        barrier_timeout: seconds a site may wait for the others at any barrier (syncs, validations, agreed
            decisions); the sites still missing then are treated like ``round_timeout``'s (None: no limit; a failed
            or dead site is noticed at once regardless).
        max_update_norm_ratio: refuse a site's update whose distance from the round's global model is more than this
            many times the median over the round's sites (None: no bound). An update holding NaN or Inf is always
            refused. Needs each site's own update, so not with secure aggregation.
    """

    on_site_failure: str = "abort"
    min_sites: Optional[int] = None
    round_timeout: Optional[float] = None
    barrier_timeout: Optional[float] = None
    max_update_norm_ratio: Optional[float] = None

    def __post_init__(self) -> None:
        if self.on_site_failure not in ("abort", "continue"):
            raise ValueError(f"on_site_failure must be 'abort' or 'continue', got {self.on_site_failure!r}")
        if self.min_sites is not None:
            _check_int("min_sites", self.min_sites, 1)
            if self.on_site_failure != "continue":
                raise ValueError(
                    "min_sites applies only with on_site_failure='continue' (an aborting run needs every site)"
                )
        for name in ("round_timeout", "barrier_timeout"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"{name} must be > 0 seconds or None, got {value!r}")
        if self.max_update_norm_ratio is not None and self.max_update_norm_ratio < 1:
            raise ValueError(
                f"max_update_norm_ratio must be >= 1 (a multiple of the round's median update norm), got {self.max_update_norm_ratio}"
            )

    @property
    def tolerant(self) -> bool:
        """Sites that fail are left out and rejoin instead of ending the run."""
        return self.on_site_failure == "continue"


@dataclass(frozen=True)
class Cluster:
    """Which Ray cluster runs the federation.

    Args:
        address: a cluster to join (default: ``RAY_ADDRESS`` as under ``ray job submit``, or the Ray this process is
            connected to; else a local Ray is started for the run and stopped after it).
        init_kwargs: extra ``ray.init`` arguments (e.g. ``{"num_cpus": 8}`` for a local Ray). A local Ray's workers
            import from the driver's own paths (its script's folder, ``sys.path`` entries it added, ``PYTHONPATH``)
            also when these hold a ``runtime_env`` of the user's.
    """

    address: Optional[str] = None
    init_kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FineTuning:
    """Local fine-tuning after the federated run (FLamby's ``FedAvgFineTuning``): every site continues from the model
    it ended the run with (the last global model, with any layers its algorithm keeps local) on its own training data,
    with its own optimizer and LR-scheduler state, and keeps the result as its fine-tuned model. ``trainer.test``
    then reports both models at every site (the fine-tuned one under ``fine_tuned/...``); the fine-tuned weights stay
    at the site (``<run>/sites/<name>/fine_tuned.ckpt``). Give exactly one of:

    Args:
        steps: optimizer steps each site fine-tunes for (FLamby's ``num_fine_tuning_steps``).
        epochs: epochs over the site's training data instead.
    """

    steps: Optional[int] = None
    epochs: Optional[int] = None

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(
                f"fine-tuning needs exactly one of steps and epochs, got steps={self.steps!r}, epochs={self.epochs!r}"
            )
        if self.steps is not None:
            _check_int("fine-tuning steps", self.steps, 1)
        if self.epochs is not None:
            _check_int("fine-tuning epochs", self.epochs, 1)

    def describe(self) -> str:
        return f"{self.steps} steps" if self.steps is not None else f"{self.epochs} epoch(s)"


@dataclass(frozen=True)
class Deployment:
    """The model each site should deploy, chosen at the site on its own validation data (never its test data).

    After the run (and any fine-tuning) every site validates each model it holds: ``global`` (the last global model,
    with any layers its algorithm keeps local), its algorithm's own (Ditto's ``personal``), ``fine_tuned`` and, with
    ``local_baseline``, ``local`` (the initial model trained on the site's data alone for the run's length, fresh
    optimizer). It keeps the best by ``metric``, fits a temperature to it on the same validation data (classification:
    temperature scaling, Guo et al. 2017) and writes both to ``<run>/sites/<name>/deployed.ckpt``; only the scores
    leave the site. ``trainer.test`` then reports the chosen model at every site (``deployed/...``) with its expected
    calibration error before and after the temperature.

    Args:
        metric: what the sites compare: a key of the site's validation results (``"auroc"``, ``"accuracy"``,
            ``"loss"``, a module's own ``val_<key>`` without ``val_``).
        mode: ``"max"`` or ``"min"`` (default: ``"min"`` for a metric with "loss" in its name, else ``"max"``).
        local_baseline: also train and consider the site's local-only model (costs one more run's training).
        calibrate: fit the temperature (classification outputs only).
    """

    metric: str = "auroc"
    mode: Optional[str] = None
    local_baseline: bool = False
    calibrate: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"deployment metric must be a name such as 'auroc' or 'loss', got {self.metric!r}")
        if self.mode not in (None, "max", "min"):
            raise ValueError(f"deployment mode must be 'max' or 'min', got {self.mode!r}")

    @property
    def maximise(self) -> bool:
        return self.mode == "max" if self.mode is not None else "loss" not in self.metric


def shorthand_groups(
    num_sites: Optional[int] = None,
    partitioner: Optional[Partitioner] = None,
    site_cpus: Optional[float] = None,
    site_gpus: Optional[float] = None,
    checkpoint_dir: Optional[str] = None,
    checkpoint_every: Optional[int] = None,
    keep_checkpoints: Optional[int] = None,
    ray_address: Optional[str] = None,
    ray_init_kwargs: Optional[dict[str, Any]] = None,
    placement_timeout: Optional[float] = None,
    workers: Optional[int] = None,
    sites_per_worker: Optional[int] = None,
    worker_cpus: Optional[float] = None,
    barrier_timeout: Optional[float] = None,
    max_update_norm_ratio: Optional[float] = None,
    on_site_failure: Optional[str] = None,
    min_sites: Optional[int] = None,
    round_timeout: Optional[float] = None,
    fine_tune_steps: Optional[int] = None,
    fine_tune_epochs: Optional[int] = None,
) -> dict[str, dict[str, Any]]:
    """The flat names ``FederatedStrategy`` has always taken, sorted into their groups (only those given).

    Args:
        num_sites, partitioner, site_cpus, site_gpus: :class:`Simulation`'s fields.
        checkpoint_dir, checkpoint_every, keep_checkpoints: :class:`Checkpointing`'s ``dirpath``, ``every_n_rounds``
            and ``keep``.
        ray_address, ray_init_kwargs: :class:`Cluster`'s ``address`` and ``init_kwargs``.
        placement_timeout, workers, sites_per_worker, worker_cpus: :class:`Placement`'s ``timeout``, ``workers``,
            ``sites_per_worker`` and ``worker_cpus``.
        on_site_failure, min_sites, round_timeout, barrier_timeout, max_update_norm_ratio: :class:`Reliability`'s
            fields.
        fine_tune_steps, fine_tune_epochs: :class:`FineTuning`'s ``steps`` and ``epochs``.
    """
    given = {
        "simulation": {
            "num_sites": num_sites,
            "partitioner": partitioner,
            "site_cpus": site_cpus,
            "site_gpus": site_gpus,
        },
        "checkpointing": {"dirpath": checkpoint_dir, "every_n_rounds": checkpoint_every, "keep": keep_checkpoints},
        "cluster": {"address": ray_address, "init_kwargs": ray_init_kwargs},
        "placement": {
            "timeout": placement_timeout,
            "workers": workers,
            "sites_per_worker": sites_per_worker,
            "worker_cpus": worker_cpus,
        },
        "reliability": {
            "barrier_timeout": barrier_timeout,
            "max_update_norm_ratio": max_update_norm_ratio,
            "on_site_failure": on_site_failure,
            "min_sites": min_sites,
            "round_timeout": round_timeout,
        },
        "fine_tuning": {"steps": fine_tune_steps, "epochs": fine_tune_epochs},
    }
    return {group: {k: v for k, v in values.items() if v is not None} for group, values in given.items()}


def merge_group(group: Any, default: type, shorthands: dict[str, Any], label: str) -> Any:
    """``group`` (or the default one) with the shorthand fields applied; a field set both ways is an error."""
    base = group if group is not None else default()
    if not isinstance(base, default):
        raise TypeError(f"{label} must be a {default.__name__}, got {type(base).__name__}")
    if group is not None:
        both = sorted(k for k in shorthands if getattr(group, k) != getattr(default(), k))
        if both:
            raise ValueError(f"{label}.{both[0]} is given twice (as {label}=... and as a flat argument): give it once")
    return dataclasses.replace(base, **shorthands) if shorthands else base


@dataclass(frozen=True)
class FederationConfig:
    """Everything below the strategy needs to run a federation; built once by ``FederatedStrategy``."""

    aggregator: Aggregator
    sync_every: int
    seed: int
    simulation: Simulation
    placement: Placement
    checkpointing: Checkpointing
    cluster: Cluster
    reliability: Reliability = field(default_factory=Reliability)
    privacy: PrivacySpec = None
    class_balance: Optional[str] = None
    audit_messages: bool = False
    metric_thresholds: int = 1000
    progress: bool = True
    sync_every_steps: Optional[int] = None
    fine_tuning: Optional[FineTuning] = None
    deployment: Optional[Deployment] = None

    def __post_init__(self) -> None:
        _check_int("sync_every", self.sync_every, 1)
        if self.fine_tuning is not None and not isinstance(self.fine_tuning, FineTuning):
            raise ValueError(f"fine_tuning must be a FineTuning, got {type(self.fine_tuning).__name__}")
        if self.aggregator.trains_personal_models and self.privacy is not None:
            raise ValueError(
                f"{self.aggregator.name or type(self.aggregator).__name__} with DP-SGD (privacy=...): the sites' "
                "personal models would train outside their privacy accountants, so the reported ε would not cover "
                "them; drop one of the two"
            )
        if self.deployment is not None and not isinstance(self.deployment, Deployment):
            raise ValueError(f"deployment must be a Deployment, got {type(self.deployment).__name__}")
        if self.deployment is not None and self.deployment.local_baseline and self.privacy is not None:
            raise ValueError(
                "deployment local_baseline with DP-SGD (privacy=...): the local model would train outside the sites' "
                "privacy accountants; drop one of the two"
            )
        if self.fine_tuning is not None and self.privacy is not None:
            raise ValueError(
                "fine_tuning with DP-SGD (privacy=...): the fine-tuning steps would train outside the sites' privacy "
                "accountants, so the reported ε would not cover them; drop one of the two"
            )
        RoundSchedule.of(self.sync_every, self.sync_every_steps)  # one of the two, each valid
        if self.privacy is not None and not isinstance(self.privacy, (DPSGD, dict)):
            raise ValueError(
                f"privacy must be a DPSGD or a dict of site name -> DPSGD, got {type(self.privacy).__name__}"
            )
        if self.class_balance not in (None, "loss", "sampler"):
            raise ValueError(f"class_balance must be 'loss', 'sampler' or None, got {self.class_balance!r}")
        if self.reliability.max_update_norm_ratio is not None and self.aggregator.hides_site_updates:
            raise ValueError(
                "max_update_norm_ratio needs each site's own update, which secure aggregation hides: bound "
                "updates on the sites instead (aggregator='dp_fedavg' clips them)"
            )
        if self.reliability.tolerant:
            try:
                self.aggregator.check_partial_rounds()
            except ValueError as err:
                raise ValueError(f"on_site_failure='continue': {err}") from None
        _check_int("metric_thresholds", self.metric_thresholds, 2)

    def replace(self, **changes: Any) -> "FederationConfig":
        """A copy with ``changes`` (checked like the original)."""
        return dataclasses.replace(self, **changes)

    @property
    def rounds(self) -> RoundSchedule:
        """What a round is: ``sync_every`` epochs or ``sync_every_steps`` optimizer steps."""
        return RoundSchedule.of(self.sync_every, self.sync_every_steps)

    def hyperparameters(self) -> dict[str, Any]:
        """The federation's settings as the driver's loggers record them."""
        rounds = self.rounds
        out: dict[str, Any] = {
            "fl_aggregator": repr(self.aggregator),
            f"fl_sync_every{'_steps' if rounds.in_steps else ''}": rounds.every,
        }
        if self.fine_tuning is not None:
            out["fl_fine_tuning"] = self.fine_tuning.describe()
        return out
