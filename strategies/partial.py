"""Partial sharing: the tensors named personal stay at their site; the wrapped rule aggregates the others.

    site k:  sends w_k without its personal tensors P, and loads the global model around them:
             w_k[p] for p in P is trained at site k only, never sent, never overwritten by aggregation
    server:  the wrapped rule, unchanged, on the tensors the sites send

``FederatedStrategy(aggregator="fedavg", personal=["classifier.*"])`` keeps a classification head per site (FedPer,
Arivazhagan et al., 2019); ``personal=["*.bn*"]`` keeps normalisation layers, as ``aggregator="fedbn"`` does by layer
type. Names are state-dict keys matched with shell patterns (:func:`fnmatch.fnmatchcase`), or any callable
``name -> bool``. Composes with every rule, compression and secure aggregation (the sites leave the personal tensors
out before anything is encoded or masked). After ``fit`` the driver's module holds the shared tensors of the global
model (its personal ones are the initial values: there is no global value of a personal tensor); ``trainer.test``
tests every site with its own personal tensors.

Server half: :class:`PartialSharing` (wraps any rule); site half:
:class:`~lightning_fed.strategies.site.partial.PartialSharingSite`.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

from lightning_fed.strategies.base import Aggregator, SiteUpdate, Weights, WrappedAggregator

if TYPE_CHECKING:
    from lightning_fed.strategies.site.partial import PartialSharingSite

PersonalSpec = Union[Sequence[str], Callable[[str], bool]]
"""Which state-dict names stay at the sites: shell patterns (``"classifier.*"``) or a callable ``name -> bool``."""


class PersonalNames:
    """Which of a model's state-dict names are personal (a picklable predicate: it travels to every site)."""

    def __init__(self, spec: PersonalSpec) -> None:
        if callable(spec):
            self.patterns: tuple[str, ...] = ()
            self.predicate: Callable[[str], bool] | None = spec
        elif isinstance(spec, str) or not all(isinstance(p, str) for p in spec) or not spec:
            raise ValueError(
                f"personal must be a non-empty list of state-dict name patterns (e.g. ['classifier.*']) or a "
                f"callable name -> bool, got {spec!r}"
            )
        else:
            self.patterns, self.predicate = tuple(spec), None

    def __call__(self, name: str) -> bool:
        if self.predicate is not None:
            return bool(self.predicate(name))
        return any(fnmatchcase(name, pattern) for pattern in self.patterns)

    def of(self, names: Sequence[str]) -> set[str]:
        return {n for n in names if self(n)}

    def __repr__(self) -> str:
        return repr(list(self.patterns)) if self.predicate is None else repr(self.predicate)


class PartialSharing(WrappedAggregator):
    """Wraps any rule: its sites never send the personal tensors, and never load a global value into them."""

    def __init__(self, inner: Aggregator, personal: PersonalSpec) -> None:
        super().__init__(inner, "partial sharing")  # what is shared changes, the rule's state does not
        self.personal = PersonalNames(personal)

    def check_model(self, model: Any) -> None:
        names = list(model.state_dict())
        personal = self.personal.of(names)
        if not personal:
            raise ValueError(
                f"personal={self.personal!r} names none of the model's tensors (e.g. {names[:4]}): give state-dict "
                "name patterns such as 'classifier.*'"
            )
        if personal == set(names):
            raise ValueError(
                f"personal={self.personal!r} names every tensor of the model: nothing would be shared; use "
                "aggregator='local' to train each site alone"
            )
        self.inner.check_model(model)

    def site_algorithm(self) -> "PartialSharingSite":
        from lightning_fed.strategies.site.partial import PartialSharingSite

        return PartialSharingSite(self.inner.site_algorithm(), self.personal)

    def receive(self, update: SiteUpdate, current: Weights | None) -> SiteUpdate:
        leaked = sorted(self.personal.of(list(update.weights)))
        if leaked:  # only a site half that is not this one's would send them
            raise ValueError(f"its update holds personal tensors {leaked[:3]}, which must stay at the site")
        return self.inner.receive(update, current)

    def __repr__(self) -> str:
        return f"PartialSharing({self.inner!r}, personal={self.personal!r})"
