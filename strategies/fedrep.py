"""FedRep (Collins et al., 2021): a shared representation, a head per site, trained in turn within every round.

    site k, each round:  first  head_epochs  epochs: the head trains, the body frozen
                         then the rest of the round: the body trains, the head frozen
                         sends the body; keeps its head (never sent, never overwritten)
    server:  w_{t+1} = sum_k (n_k / n) * w_k   over the body (FedAvg's server half)

The head is found as FedPer finds it (the model's last layer with parameters, or ``head=[...]`` patterns). Rounds
are ``sync_every`` epochs here, so ``sync_every`` must exceed ``head_epochs``: a round that ends before its body has
trained stops the run, naming the site and both numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

from lightning_fed.strategies.fedper import FedPer
from lightning_fed.strategies.registry import register_aggregator

if TYPE_CHECKING:
    from lightning_fed.strategies.site.fedrep import FedRepSite


@register_aggregator("fedrep")
class FedRep(FedPer):
    """FedPer's split, trained in turn: the head first with the body frozen, then the body with the head frozen."""

    def __init__(self, head: Optional[Sequence[str]] = None, head_epochs: int = 1) -> None:
        super().__init__(head)
        if isinstance(head_epochs, bool) or not isinstance(head_epochs, int) or head_epochs < 1:
            raise ValueError(f"fedrep: head_epochs must be an integer >= 1, got {head_epochs!r}")
        self.head_epochs = head_epochs

    def site_algorithm(self) -> "FedRepSite":
        from lightning_fed.strategies.site.fedrep import FedRepSite

        return FedRepSite(self.head, self.head_epochs)
