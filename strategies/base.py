"""The two halves of a federated algorithm.

An algorithm is an :class:`Aggregator` (the server half, run by the coordinator once per round, numpy only) and a
:class:`~lightning_fed.strategies.site.SiteAlgorithm` (the site half, a Lightning callback living in every site's
Trainer). The machinery
in :mod:`lightning_fed` moves :class:`SiteUpdate` objects from sites to the coordinator and a
:class:`GlobalModel` back, and knows nothing else about the algorithm.

Everything that crosses the network is parameter-shaped ``numpy`` arrays, sample counts and small named
extras (control variates, clipping norms): never samples or per-sample outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

import numpy as np

if TYPE_CHECKING:
    from lightning_fed.strategies.site import SiteAlgorithm

Weights = dict[str, np.ndarray]
"""A model's state as named numpy arrays (what travels through Ray's object store, zero-copy)."""


@dataclass
class SiteUpdate:
    """What one site sends to the coordinator at the end of a round."""

    site: str
    weights: Weights
    num_samples: int
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class GlobalModel:
    """What the coordinator sends back to every site after aggregating a round.

    ``extras["metrics"]`` (name -> float), if the aggregator sets it, is reported on the driver as ``fl/<name>``.
    """

    weights: Weights
    round: int
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FollowUp:
    """The coordinator's answer to a site's hand-over when the aggregator needs one more thing from the round's
    sites before it can aggregate (secure aggregation: shares of a dropped site's mask key). The site's half answers
    ``question`` (:meth:`~lightning_fed.strategies.site.SiteAlgorithm.answer_follow_up`)."""

    round: int
    question: Any


class SiteContext(Protocol):
    """What a site half may know of the federation: where it runs, and exchanges with the other sites.

    The machinery hands one to every site half (:meth:`SiteAlgorithm.bind`); algorithms never reach into actors,
    workers or the strategy. Calls that wait for other sites let the site's worker run its other sites meanwhile.
    """

    site: str
    """This site's name."""

    def all_gather(self, key: str, value: Any) -> dict[str, Any]:
        """Every site's ``value`` for ``key``, once all have sent theirs (e.g. public keys for secure aggregation)."""
        ...


def is_averageable(array: np.ndarray) -> bool:
    """Floating-point arrays are averaged; integer and boolean buffers (``num_batches_tracked``) never are."""
    return np.issubdtype(array.dtype, np.floating)


def combine_floating(updates: list[SiteUpdate], combine: Callable[[list[np.ndarray]], np.ndarray]) -> Weights:
    """``combine`` each floating tensor across sites (given float64 copies, site order kept); integer buffers
    are counters, never combined: they are taken from the site with the most samples."""
    largest = max(updates, key=lambda u: u.num_samples)
    out: Weights = {}
    for key, reference in largest.weights.items():
        if is_averageable(reference):
            out[key] = combine([u.weights[key].astype(np.float64) for u in updates]).astype(reference.dtype)
        else:
            out[key] = np.array(reference, copy=True)
    return out


class Aggregator:
    """The server half of an algorithm, in the spirit of Flower's ``Strategy``.

    ``aggregate`` receives this round's :class:`SiteUpdate` objects and the current global weights and returns the
    new :class:`GlobalModel`. It runs in the coordinator, never on a site. State that must survive a restart
    (server optimizer moments, control variates, privacy accountants) goes in ``state_dict``.
    """

    name: ClassVar[str] = ""
    secure_weighting: ClassVar[str | None] = None
    """How the rule weights sites when it only sees their secure sum: ``"samples"`` (weighted mean),
    ``"uniform"``, or ``None`` when it needs every site's own update (median, SCAFFOLD): then no secure aggregation."""

    trains_personal_models: ClassVar[bool] = False
    """``True`` when its sites train models of their own beside the shared one (Ditto): refused with DP-SGD, whose
    accountants cover only the shared model's steps."""

    decodes_updates: ClassVar[bool] = False
    """``True`` when :meth:`receive` turns what travelled into weights (compression's codes): such a rule cannot run
    under secure aggregation, whose coordinator only sees a masked sum."""

    hides_site_updates: ClassVar[bool] = False
    """``True`` when the coordinator only ever sees masked updates (secure aggregation): they cannot be screened."""

    def check_model(self, model: Any) -> None:
        """Called on the driver before any site starts: raise ``ValueError`` if this algorithm cannot train ``model``."""

    def check_partial_rounds(self) -> None:
        """Called when rounds may be aggregated without some sites (``on_site_failure="continue"``): raise
        ``ValueError`` saying why this rule cannot aggregate such a round. The default rule can: its weights are
        renormalised over the sites that reported."""

    def site_algorithm(self) -> "SiteAlgorithm":
        """A fresh site half, sent to every site at start-up (each site gets its own copy)."""
        from lightning_fed.strategies.site import SiteAlgorithm

        return SiteAlgorithm()

    def prepare(self, sites: list[str]) -> None:
        """Called on the driver once the federation's sites are known, before any of them starts (e.g. to check
        or provision per-site keys). Raise ``ValueError`` to refuse the federation."""

    def follow_up(self, round: int, updates: list[SiteUpdate]) -> Any:
        """Called once the round's updates are in (decoded and screened): ``None`` to aggregate them now, or a
        question every site of the round answers first (:meth:`receive_answers` gets the answers, then
        :meth:`aggregate` runs). Secure aggregation asks for shares of the masks of a site that dropped."""
        return None

    def receive_answers(self, round: int, answers: dict[str, Any]) -> None:
        """The sites' answers to this round's :meth:`follow_up` question, by site."""
        raise NotImplementedError(f"{type(self).__name__} asked a follow-up question it does not read the answers of")

    def receive(self, update: SiteUpdate, current: Weights | None) -> SiteUpdate:
        """Called by the coordinator on each site's update as the round closes, before it is screened and
        aggregated: turn what travelled into what the rule reads (e.g. decode a compressed update). Raise
        ``ValueError`` to refuse the update (the message names the site)."""
        return update

    def aggregate(self, round: int, updates: list[SiteUpdate], current: Weights | None) -> GlobalModel:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state but the checkpoint holds {sorted(state)}")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class WrappedAggregator(Aggregator):
    """A rule around another (``inner``): compression, partial sharing. Every hook goes to ``inner`` unless the wrapper
    overrides it; the wrapper keeps the inner rule's name (checkpoints stay the rule's) and how it weighs sites."""

    def __init__(self, inner: Aggregator, what: str) -> None:
        if inner.hides_site_updates:
            raise ValueError(f"{what} goes inside secure aggregation, not around it")
        self.inner = inner
        self.name = inner.name or type(inner).__name__
        self.secure_weighting = inner.secure_weighting

    @property
    def trains_personal_models(self) -> bool:  # type: ignore[override]
        return self.inner.trains_personal_models

    @property
    def decodes_updates(self) -> bool:  # type: ignore[override]
        return self.inner.decodes_updates

    def check_model(self, model: Any) -> None:
        self.inner.check_model(model)

    def check_partial_rounds(self) -> None:
        self.inner.check_partial_rounds()

    def site_algorithm(self) -> "SiteAlgorithm":
        return self.inner.site_algorithm()

    def prepare(self, sites: list[str]) -> None:
        self.inner.prepare(sites)

    def receive(self, update: SiteUpdate, current: Weights | None) -> SiteUpdate:
        return self.inner.receive(update, current)

    def follow_up(self, round: int, updates: list[SiteUpdate]) -> Any:
        return self.inner.follow_up(round, updates)

    def receive_answers(self, round: int, answers: dict[str, Any]) -> None:
        self.inner.receive_answers(round, answers)

    def aggregate(self, round: int, updates: list[SiteUpdate], current: Weights | None) -> GlobalModel:
        return self.inner.aggregate(round, updates, current)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
