"""FedPer (Arivazhagan et al., 2019): the base layers are averaged, each site keeps its own head.

    site k keeps its head H_k: trained at the site only, never sent, never overwritten
    server:  w_{t+1} = sum_k (n_k / n) * w_k   over the base (FedAvg's server half)

The head is, by default, the model's last layer that holds parameters (its classifier, in the order the module
registers its layers); ``aggregator_kwargs={"head": ["classifier.*"]}`` names it by state-dict patterns instead. It is
partial sharing (:mod:`lightning_fed.strategies.partial`) with the head personal; ``FederatedStrategy(personal=...)``
gives the same with any other rule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.strategies.registry import register_aggregator

if TYPE_CHECKING:
    from lightning_fed.strategies.site.partial import HeadSite


@register_aggregator("fedper")
class FedPer(FedAvg):
    """FedAvg over the base layers; every site keeps its own head."""

    def __init__(self, head: Optional[Sequence[str]] = None) -> None:
        if head is not None and (isinstance(head, str) or not head or not all(isinstance(p, str) for p in head)):
            raise ValueError(f"fedper: head must be a non-empty list of state-dict name patterns, got {head!r}")
        self.head = list(head) if head is not None else None

    def check_model(self, model: Any) -> None:
        from lightning_fed.strategies.site.partial import head_names

        names = head_names(model, self.head)
        if not names:
            raise ValueError(
                f"fedper: head={self.head!r} names none of the model's tensors (e.g. {list(model.state_dict())[:4]})"
            )
        if names == set(model.state_dict()):
            raise ValueError(
                "fedper: the head is the whole model, nothing would be shared: name the head with head=[...]"
            )

    def site_algorithm(self) -> "HeadSite":
        from lightning_fed.strategies.site.partial import HeadSite

        return HeadSite(self.head)
