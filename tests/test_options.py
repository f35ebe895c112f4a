"""No option is accepted and then ignored; rules that cannot compose refuse in one line."""

import inspect

import numpy as np
import pytest

from lightning_fed import FederatedStrategy
from lightning_fed.strategies import SiteUpdate, available_aggregators, get_aggregator
from lightning_fed.strategies.secagg import SecureAggregation


def _updates(round_: int, count: int = 5) -> list[SiteUpdate]:
    """Synthetic site updates: two float tensors and an integer counter, with control variates and clip flags."""
    rng = np.random.default_rng(round_)
    out = []
    for k in range(count):
        w = {
            "w": rng.normal(size=3).astype(np.float32),
            "b": rng.normal(size=2).astype(np.float32),
            "n": np.array(7 + k),
        }
        extras = {
            "delta_c": {"w": rng.normal(size=3).astype(np.float32), "b": rng.normal(size=2).astype(np.float32)},
            "unclipped": bool(k % 2),
            "uncertainty": {"epistemic": float(rng.uniform(0.01, 0.1)), "aleatoric": float(rng.uniform(0.05, 0.5))},
            "precision": {"w": rng.uniform(0, 5, size=3), "b": rng.uniform(0, 5, size=2)},
        }
        out.append(SiteUpdate(f"s{k}", w, num_samples=10 * (k + 1), extras=extras))
    return out


def aggregated(rule) -> bytes:
    """The global weights after three rounds of the same synthetic updates."""
    current = {"w": np.zeros(3, np.float32), "b": np.zeros(2, np.float32), "n": np.array(0)}
    for round_ in (1, 2, 3):
        current = rule.aggregate(round_, _updates(round_), current).weights
    return b"".join(np.asarray(current[k]).tobytes() for k in sorted(current))


def dp_state(rule) -> tuple:
    aggregated(rule)
    return (rule.clip_norm, rule.epsilon())


def site_half(attribute: str):
    def observe(rule):
        site = rule.site_algorithm()
        for part in attribute.split("."):
            site = getattr(site, part)
        return site if not isinstance(site, type) else site.__name__

    return observe


def inner_site_type(rule):
    return type(rule.site_algorithm().inner).__name__


# option -> (another value, options the comparison needs, what the option changes)
OPTIONS = {
    "fedprox": {"mu": (0.5, {}, site_half("mu"))},
    "fedadam": {
        "eta": (0.1, {}, aggregated),
        "beta1": (0.5, {}, aggregated),
        "beta2": (0.5, {}, aggregated),
        "tau": (0.1, {}, aggregated),
    },
    "fedyogi": {
        "eta": (0.1, {}, aggregated),
        "beta1": (0.5, {}, aggregated),
        "beta2": (0.5, {}, aggregated),
        "tau": (0.1, {}, aggregated),
    },
    "fedadagrad": {"eta": (0.1, {}, aggregated), "beta1": (0.5, {}, aggregated), "tau": (0.1, {}, aggregated)},
    "scaffold": {"eta_g": (0.5, {}, aggregated)},
    "cyclic": {"deterministic_cycle": (True, {}, aggregated), "seed": (1, {}, aggregated)},
    "trimmed_mean": {"beta": (0.25, {}, aggregated)},
    "uncertainty_weighted": {
        "score": ("epistemic", {}, aggregated),
        "min_weight": (0.3, {}, aggregated),
        "max_images": (1, {}, site_half("max_images")),
    },
    "fiva": {"prior": (1e3, {}, site_half("prior"))},
    "fedper": {"head": (["classifier.*"], {}, site_half("head"))},
    "ditto": {
        "lam": (1.0, {}, site_half("lam")),
        "rule": ("fedprox", {}, inner_site_type),
        "rule_kwargs": ({"mu": 0.7}, {"rule": "fedprox"}, site_half("inner.mu")),
    },
    "fedrep": {"head": (["classifier.*"], {}, site_half("head")), "head_epochs": (2, {}, site_half("head_epochs"))},
    "dp_fedavg": {
        "noise_multiplier": (0.3, {"seed": 0}, aggregated),
        "clip_norm": (3.0, {"seed": 0}, aggregated),
        "delta": (1e-3, {"seed": 0}, dp_state),
        "adaptive": (True, {"seed": 0, "clipped_count_stddev": 1.0}, dp_state),
        "target_quantile": (0.9, {"seed": 0, "adaptive": True, "clipped_count_stddev": 1.0}, dp_state),
        "clip_learning_rate": (0.9, {"seed": 0, "adaptive": True, "clipped_count_stddev": 1.0}, dp_state),
        "clipped_count_stddev": (5.0, {"seed": 0, "adaptive": True, "noise_multiplier": 0.3}, aggregated),
        "inner": ("fedprox", {}, inner_site_type),
        "seed": (1, {"seed": 0}, aggregated),
        "inner_kwargs": ({"mu": 0.7}, {"inner": "fedprox"}, site_half("inner.mu")),
        "accountant": ("prv", {"seed": 0}, dp_state),
    },
}


def _options(name: str) -> list[str]:
    params = inspect.signature(type(get_aggregator(name)).__init__).parameters
    return [n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def test_every_option_of_every_registered_aggregator_changes_what_it_does():
    for name in available_aggregators():
        options = _options(name)
        assert sorted(options) == sorted(OPTIONS.get(name, {})), f"{name}: options without a test of their effect"
        for option, (value, base, observe) in OPTIONS.get(name, {}).items():
            default = observe(get_aggregator(name, **base))
            changed = observe(get_aggregator(name, **{**base, option: value}))
            assert default != changed, f"{name}({option}={value!r}) behaves like the default: the option is ignored"


def test_wrappers_apply_their_inner_rule_or_refuse_it():
    # DP-FedAdam: the server optimizer steps on the noisy mean (it is not replaced by a plain mean)
    assert aggregated(get_aggregator("dp_fedavg", inner="fedadam", seed=0)) != aggregated(
        get_aggregator("dp_fedavg", seed=0)
    )
    # an averaging rule keeps the noisy mean as it is: fedprox's server half is fedavg's
    assert aggregated(get_aggregator("dp_fedavg", inner="fedprox", seed=0)) == aggregated(
        get_aggregator("dp_fedavg", seed=0)
    )
    assert aggregated(get_aggregator("dp_fedavg", inner=get_aggregator("fedyogi"), seed=0)) == aggregated(
        get_aggregator("dp_fedavg", inner="fedyogi", seed=0)
    )  # an instance works like its name
    for inner in ("median", "trimmed_mean", "scaffold", "local", "dp_fedavg"):
        with pytest.raises(ValueError, match=f"dp_fedavg cannot wrap {inner}: .*use an averaging rule"):
            get_aggregator("dp_fedavg", inner=inner)
    with pytest.raises(ValueError, match="inner_kwargs only applies to a named inner rule"):
        get_aggregator("dp_fedavg", inner=get_aggregator("fedprox"), inner_kwargs={"mu": 1.0})
    for rule in ("median", "trimmed_mean", "scaffold", "local"):
        with pytest.raises(ValueError, match="cannot run under secure aggregation"):
            FederatedStrategy(aggregator=rule, secagg=True)
    # secure aggregation around DP-FedAvg around FedAdam composes
    assert isinstance(
        FederatedStrategy(aggregator="dp_fedavg", aggregator_kwargs={"inner": "fedadam"}, secagg=True).aggregator,
        SecureAggregation,
    )
