"""DP-SGD's settings: what ``FederatedStrategy(privacy=...)`` takes, checked when given, and which site gets which.

Plain dataclasses with no torch: the frozen :class:`~lightning_fed.config.FederationConfig` holds them, and it must
import where torch is never loaded (the coordinator's process). What the settings do inside a site's Trainer is
:mod:`lightning_fed.privacy` (which re-exports these names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

DEFAULT_DELTA = 1e-5
ACCOUNTANTS = ("rdp", "prv")  # upper bounds on ε; Opacus' "gdp" is a central-limit approximation, not offered


@dataclass
class DPSGD:
    """One site's DP-SGD settings.

    Args:
        target_epsilon: the ε the site may spend over the whole fit (``max_epochs``); the noise multiplier is
            derived from it. Give this or ``noise_multiplier``.
        noise_multiplier: σ/C, fixed; ε then follows from the steps taken.
        delta: δ of the (ε, δ) guarantee.
        max_grad_norm: per-sample gradient clipping norm C.
        poisson_sampling: Poisson-sample every batch (what the accountant assumes); ``False`` keeps the loader's
            batches (the reported ε is then only an approximation).
        accountant: how ε is computed, and ``target_epsilon`` calibrated: ``"rdp"`` (Rényi DP, Opacus'
            ``RDPAccountant``) or ``"prv"`` (privacy random variables, Opacus' ``PRVAccountant``: numerically
            composes the privacy loss distribution, a tighter ε for the same noise, or less noise for the same ε).
            Kept in the site's checkpoints: a run resumes with the accountant it started with.
    """

    target_epsilon: Optional[float] = None
    noise_multiplier: Optional[float] = None
    delta: float = DEFAULT_DELTA
    max_grad_norm: float = 1.0
    poisson_sampling: bool = True
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"DPSGD accountant must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}")
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("DPSGD needs exactly one of target_epsilon and noise_multiplier")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ValueError(f"DPSGD target_epsilon must be > 0, got {self.target_epsilon}")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError(f"DPSGD noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ValueError(f"DPSGD delta must be in (0, 1), got {self.delta}")
        if self.max_grad_norm <= 0:
            raise ValueError(f"DPSGD max_grad_norm must be > 0, got {self.max_grad_norm}")


PrivacySpec = Union[DPSGD, dict[str, Optional[DPSGD]], None]


def site_privacy(spec: PrivacySpec, sites: list[str]) -> dict[str, Optional[DPSGD]]:
    """Each site's DP-SGD settings (``None``: not private). A dict may use ``"*"`` for every other site."""
    if spec is None or isinstance(spec, DPSGD):
        return {name: spec for name in sites}
    unknown = sorted(set(spec) - set(sites) - {"*"})
    if unknown:
        raise ValueError(f"privacy names unknown sites {unknown}; the sites are {sites}")
    return {name: spec.get(name, spec.get("*")) for name in sites}
