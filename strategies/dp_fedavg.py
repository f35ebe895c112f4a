"""DP-FedAvg (McMahan et al., 2018): client-level differential privacy around any averaging rule's sites.

    site k:  Δ_k = w_k − w_t,   Δ̂_k = Δ_k · min(1, S / ||Δ_k||)          clipped on the site, before it leaves
    server:  w_{t+1} = w_t + (Σ_k Δ̂_k + N(0, (z_Δ S)² I)) / K           sites count equally: sensitivity S
    adaptive clipping (Andrew et al., 2021), target quantile γ, learning rate η:
             b̃ = (Σ_k 1[||Δ_k|| ≤ S] + N(0, σ_b²)) / K,   S ← S · exp(−η (b̃ − γ))
             z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2), so that the round's total noise multiplier stays z
    accounting: the Gaussian mechanism with noise multiplier z, every site every round (sampling rate 1), one
             composition per round, RDP (or PRV) → (ε, δ); reported as ``fl/client_dp_epsilon``.

The inner rule's site half still runs on every site (FedProx's term, FedFBN's frozen BN, FedBN's local BN), and its
server rule is given the noisy mean as one combined update: an averaging rule keeps it (``w_t + noisy mean``), a
server optimizer steps on it (``inner="fedadam"``: DP-FedAdam). Rules that need every site's own update (median,
trimmed_mean, scaffold, local) are refused. The noise comes from numpy's PCG64, not a cryptographic source.
Site half: :class:`~lightning_fed.strategies.site.dp_fedavg.DPFedAvgSite`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

from lightning_fed.strategies.base import Aggregator, GlobalModel, SiteUpdate, Weights, is_averageable
from lightning_fed.strategies.registry import get_aggregator, register_aggregator

if TYPE_CHECKING:
    from lightning_fed.strategies.site.dp_fedavg import DPFedAvgSite


def clip(delta: Weights, norm: float) -> tuple[Weights, float]:
    """``delta`` scaled to L2 norm at most ``norm`` (all floating tensors as one vector), and its norm before."""
    total = math.sqrt(sum(float(np.sum(np.square(d, dtype=np.float64))) for d in delta.values()))
    factor = min(1.0, norm / total) if total > 0 else 1.0
    return {k: (d * factor).astype(d.dtype) for k, d in delta.items()}, total


@register_aggregator("dp_fedavg")
class DPFedAvg(Aggregator):
    """Client-level DP: clipped site updates, Gaussian noise on their sum, an RDP accountant over rounds.

    Args:
        noise_multiplier: z; the noise on the sum of clipped updates has standard deviation z·S.
        clip_norm: S (the initial S with adaptive clipping).
        delta: δ of the reported (ε, δ).
        adaptive: adapt S towards the ``target_quantile`` of the sites' update norms (Andrew et al. 2021).
        target_quantile, clip_learning_rate: γ and η of the adaptive rule.
        clipped_count_stddev: σ_b, noise on the count of unclipped sites (default K/20 once K is known).
        inner: the rule it wraps, by name or as an instance: an averaging rule (``fedavg``, ``fedprox``, ``fedbn``,
            ``fedfbn``) or a server optimizer (``fedadam``, ``fedyogi``, ``fedadagrad``); its site half runs on the sites
            and its server half gets the noisy mean.
        seed: seed of the noise (None: fresh entropy).
        inner_kwargs: options of a named ``inner`` (e.g. ``{"mu": 0.01}``).
        accountant: ``"rdp"`` or ``"prv"`` (Opacus' accountants; PRV gives the tighter ε for the same noise).
    """

    secure_weighting = "uniform"

    def __init__(
        self,
        noise_multiplier: float = 1.0,
        clip_norm: float = 1.0,
        delta: float = 1e-5,
        adaptive: bool = False,
        target_quantile: float = 0.5,
        clip_learning_rate: float = 0.2,
        clipped_count_stddev: Optional[float] = None,
        inner: Union[str, Aggregator] = "fedavg",
        seed: Optional[int] = None,
        inner_kwargs: Optional[dict[str, Any]] = None,
        accountant: str = "rdp",
    ) -> None:
        if noise_multiplier < 0 or clip_norm <= 0 or not 0 < delta < 1:
            raise ValueError(
                f"dp_fedavg needs noise_multiplier >= 0, clip_norm > 0 and 0 < delta < 1, got {noise_multiplier}, {clip_norm}, {delta}"
            )
        if accountant not in ("rdp", "prv"):
            raise ValueError(f"dp_fedavg accountant must be 'rdp' or 'prv', got {accountant!r}")
        if not 0 < target_quantile < 1:
            raise ValueError(f"dp_fedavg target_quantile must be in (0, 1), got {target_quantile}")
        if isinstance(inner, Aggregator):
            if inner_kwargs:
                raise ValueError(
                    "dp_fedavg: inner_kwargs only applies to a named inner rule; configure the instance directly"
                )
            self.inner = inner
        else:
            self.inner = get_aggregator(inner, **(inner_kwargs or {}))
        inner_name = self.inner.name or type(self.inner).__name__
        if isinstance(self.inner, DPFedAvg) or self.inner.secure_weighting is None or self.inner.hides_site_updates:
            raise ValueError(
                f"dp_fedavg cannot wrap {inner_name}: client-level DP hands the inner rule one noisy mean of clipped "
                "updates; use an averaging rule (fedavg, fedprox, fedbn, fedfbn) or a server optimizer (fedadam, "
                "fedyogi, fedadagrad), and secagg=True for secure aggregation around it"
            )
        self.noise_multiplier, self.clip_norm, self.delta = noise_multiplier, clip_norm, delta
        self.adaptive, self.target_quantile, self.clip_learning_rate = adaptive, target_quantile, clip_learning_rate
        self.clipped_count_stddev, self.inner_name, self.seed = clipped_count_stddev, inner_name, seed
        self.accountant = accountant
        self.rounds = 0
        self._rng = np.random.default_rng(seed)

    @property
    def trains_personal_models(self) -> bool:  # type: ignore[override]
        return self.inner.trains_personal_models

    def check_model(self, model: Any) -> None:
        self.inner.check_model(model)

    def check_partial_rounds(self) -> None:
        self.inner.check_partial_rounds()  # the noise is on the sum of clipped updates: fewer sites, same ε per round

    def site_algorithm(self) -> "DPFedAvgSite":
        from lightning_fed.strategies.site.dp_fedavg import DPFedAvgSite

        return DPFedAvgSite(self.inner.site_algorithm(), self.clip_norm)

    def count_stddev(self, sites: int) -> float:
        """σ_b, the noise on the count of unclipped sites."""
        return self.clipped_count_stddev if self.clipped_count_stddev is not None else sites / 20

    def update_noise_multiplier(self, sites: int) -> float:
        """z_Δ: what is left for the update when adaptive clipping spends part of z on the clipped count."""
        if not self.adaptive or self.noise_multiplier == 0:
            return self.noise_multiplier
        sigma_b = self.count_stddev(sites)
        if 2 * sigma_b <= self.noise_multiplier:
            raise ValueError(
                f"dp_fedavg: clipped_count_stddev={sigma_b} is too small for noise_multiplier={self.noise_multiplier} (needs 2·σ_b > z)"
            )
        return (self.noise_multiplier**-2 - (2 * sigma_b) ** -2) ** -0.5

    def aggregate(self, round: int, updates: list[SiteUpdate], current: Weights | None) -> GlobalModel:
        if current is None:
            raise ValueError("dp_fedavg needs the round's starting global model")
        # an update may stand for several sites already summed (secure aggregation: extras["sites"])
        groups = [int(u.extras.get("sites", 1)) for u in updates]
        k, s = sum(groups), self.clip_norm
        z_update = self.update_noise_multiplier(k)
        largest = max(updates, key=lambda u: u.num_samples)
        weights: Weights = {}
        for key, ref in largest.weights.items():
            if not is_averageable(ref):
                weights[key] = np.array(ref, copy=True)  # counters are not weights
                continue
            total = sum(u.weights[key].astype(np.float64) * g for u, g in zip(updates, groups))
            noisy = total + self._rng.normal(0.0, z_update * s, size=ref.shape)
            weights[key] = (current[key].astype(np.float64) + noisy / k).astype(ref.dtype)
        # the inner rule's server half on the noisy mean, as one update standing for every site
        combined = SiteUpdate("dp-noisy-mean", weights, sum(u.num_samples for u in updates), {"sites": k})
        inner_model = self.inner.aggregate(round, [combined], current)
        if self.adaptive:
            unclipped = sum(int(u.extras.get("unclipped", 0)) for u in updates) + self._rng.normal(
                0.0, self.count_stddev(k)
            )
            self.clip_norm = s * math.exp(-self.clip_learning_rate * (unclipped / k - self.target_quantile))
        self.rounds += 1
        metrics = {
            **inner_model.extras.get("metrics", {}),
            "client_dp_epsilon": self.epsilon(),
            "dp_clip_norm": self.clip_norm,
        }
        return GlobalModel(
            weights=inner_model.weights,
            round=round,
            extras={**inner_model.extras, "clip_norm": self.clip_norm, "metrics": metrics},
        )

    def epsilon(self) -> float:
        """ε after the rounds so far at ``delta``, from Opacus' RDP or PRV accountant (inf without noise)."""
        if self.rounds == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        from opacus.accountants import create_accountant

        accountant = create_accountant(self.accountant)
        accountant.history = [(self.noise_multiplier, 1.0, self.rounds)]
        with np.errstate(divide="ignore"):  # PRV takes log(1 − q) = log 0 at sampling rate 1, harmlessly
            return float(accountant.get_epsilon(self.delta))

    def state_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "clip_norm": self.clip_norm,
            "rng": self._rng.bit_generator.state,
            "inner": self.inner.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds, self.clip_norm = int(state["rounds"]), float(state["clip_norm"])
        self._rng.bit_generator.state = state["rng"]
        self.inner.load_state_dict(state.get("inner", {}))
