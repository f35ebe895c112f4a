"""Ditto (Li et al., 2021): a rule's shared model, and beside it a personal model per site kept close to it.

    site k:  w_k: the shared model, trained as the wrapped rule trains it (FedAvg's plain step by default) and sent
                  every round
             v_k: its personal model, one step per training batch on the same batch:
                  v_k ← v_k − η (∇F_k(v_k) + λ (v_k − w_t)),   w_t the global model of the round
    server:  the wrapped rule, unchanged (FedAvg: w_{t+1} = sum_k (n_k / n) * w_k); v_k never leaves site k

``λ`` (``lam``) pulls each personal model towards the global one: 0 trains it alone, a large ``λ`` keeps it near the
global model. ``rule`` names the shared model's rule (``"fedavg"``, ``"fedfbn"``, ``"fedprox"``, ...; the paper's
is FedAvg), ``rule_kwargs`` its options. The personal model starts as the site's module after the rule's site half
has set it up (FedFBN's frozen BatchNorm stays frozen in it), and uses the first optimizer the module's
``configure_optimizers`` returns (its LR schedulers are not stepped for it), with its own state; model, optimizer
state and ``w_t`` are in the site's checkpoints, so a resumed run continues them exactly. ``trainer.test`` tests the
global model at every site and each site's personal model at its own site (``personal/...``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from lightning_fed.strategies.base import WrappedAggregator
from lightning_fed.strategies.registry import get_aggregator, register_aggregator

if TYPE_CHECKING:
    from lightning_fed.strategies.site.ditto import DittoSite


@register_aggregator("ditto")
class Ditto(WrappedAggregator):
    """A rule (FedAvg by default), with a personal model per site trained beside the shared one (proximal weight
    ``lam``)."""

    trains_personal_models = True  # type: ignore[assignment]

    def __init__(self, lam: float = 0.1, rule: str = "fedavg", rule_kwargs: Optional[dict[str, Any]] = None) -> None:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam < 0:
            raise ValueError(f"ditto: lam must be a number >= 0, got {lam!r}")
        if not isinstance(rule, str):
            raise ValueError(f"ditto: rule must be an aggregator's name such as 'fedavg', got {rule!r}")
        inner = get_aggregator(rule, **(rule_kwargs or {}))
        if inner.trains_personal_models:
            raise ValueError(f"ditto: rule {rule!r} already trains personal models; give a rule with one shared model")
        super().__init__(inner, "ditto")
        self.lam = float(lam)
        # a checkpoint names the whole algorithm: a Ditto run resumes only as Ditto over the same rule
        self.name = "ditto" if inner.name == "fedavg" else f"ditto_{inner.name}"

    def site_algorithm(self) -> "DittoSite":
        from lightning_fed.strategies.site.ditto import DittoSite

        return DittoSite(self.inner.site_algorithm(), self.lam)

    def __repr__(self) -> str:
        return f"Ditto(lam={self.lam!r}, rule={self.inner!r})"
