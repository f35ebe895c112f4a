"""Secure aggregation: masks cancel in the sum, single masked updates look like noise, and a real federation."""

import lightning as L
import numpy as np
import pytest
import torch

from lightning_fed import FederatedStrategy
from lightning_fed.strategies import SiteUpdate, get_aggregator
from lightning_fed.strategies.secagg import FRACTIONAL_BITS, SecureAggregation, key_pair, mask_update, shared_secret, unmask_sum
from tests.helpers import small_hospitals


def _pairwise_secrets(names):
    keys = {n: key_pair() for n in names}
    return {n: {p: shared_secret(keys[n][0], keys[p][1]) for p in names if p != n} for n in names}


def test_masks_cancel_and_the_sum_is_fedavgs_within_quantisation_error():
    rng = np.random.default_rng(0)
    names, samples = ["a", "b", "c"], [300, 120, 45]
    updates = [{"w": rng.normal(size=(64, 32)).astype(np.float32), "b": rng.normal(size=32).astype(np.float32)} for _ in names]
    agreed = _pairwise_secrets(names)
    assert agreed["a"]["b"] == agreed["b"]["a"]  # Diffie-Hellman: both ends derive the same secret
    masked = [mask_update(u, n, me, agreed[me], round_=1) for u, n, me in zip(updates, samples, names)]
    total = unmask_sum(masked)
    rule = SecureAggregation(get_aggregator("fedavg"))
    plain = get_aggregator("fedavg").aggregate(1, [SiteUpdate(n, u, s) for n, u, s in zip(names, updates, samples)], None)
    secure = rule.aggregate(1, [SiteUpdate(n, m, s, {"secagg": {"w": "float32", "b": "float32"}}) for n, m, s in zip(names, masked, samples)], None)
    bound = len(names) * 2.0 ** -FRACTIONAL_BITS  # each site rounds once, to 2^-24 of n_k·w
    for key in ("w", "b"):
        assert np.abs(total[key] - sum(n * u[key].astype(np.float64) for n, u in zip(samples, updates))).max() <= bound
        assert np.abs(secure.weights[key] - plain.weights[key]).max() <= bound + 1e-6  # + float32 rounding of the mean
    # what the coordinator holds of one site says nothing about that site's update
    for update, n, m in zip(updates, samples, masked):
        real = update["w"].ravel().astype(np.float64)
        seen = m["w"].ravel().view(np.int64).astype(np.float64)
        assert abs(np.corrcoef(real, seen)[0, 1]) < 0.06  # 2048 values: |r| of independent data ~ 0.02
        assert np.abs(np.diff(np.sort(m["w"].ravel().astype(np.float64) / 2.0**64))).max() < 0.05  # spread over the ring
    # masks are fresh every round: the same update masked in round 2 shares nothing with round 1
    again = mask_update(updates[0], samples[0], "a", agreed["a"], round_=2)
    assert not np.any(again["w"] == masked[0]["w"])


def test_rules_that_need_each_sites_update_refuse_secure_aggregation():
    for name in ("median", "trimmed_mean"):
        with pytest.raises(ValueError, match="cannot run under secure aggregation"):
            SecureAggregation(get_aggregator(name)).check_model(torch.nn.Linear(2, 2))


@pytest.mark.usefixtures("fed_data")
def test_secure_federation_trains_like_fedavg(tmp_path, ray_cluster):
    from lightning_fed.models import SmallCNN

    results = {}
    for secagg in (False, True):
        torch.manual_seed(0)
        model = SmallCNN()
        strategy = FederatedStrategy(secagg=secagg, audit_messages=True, progress=False, checkpoint_every=0, seed=0)
        trainer = L.Trainer(strategy=strategy, max_epochs=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
        try:
            trainer.fit(model, datamodule=small_hospitals(val_fraction=0.0))
            audit = strategy.federation.audit()["coordinator"]
        finally:
            strategy.shutdown()
        results[secagg] = ({k: v.clone() for k, v in model.state_dict().items()}, audit)
    (plain, _), (secure, audit) = results[False], results[True]
    for key in plain:
        assert torch.allclose(plain[key], secure[key], atol=1e-5), key  # same training, sum exact to 2^-24
    synced = [m for m in audit if m["method"] == "sync"]
    assert synced and all(dtype == "uint64" for m in synced for path, kind, _s, dtype in m["payload"] if kind == "array")
    assert any(m["method"] == "all_gather" for m in audit)  # public keys went through the coordinator, nothing more


def test_client_level_dp_runs_on_the_secure_sum():
    # dp_fedavg under secagg: sites clip (on the site) and mask; the server sees only the sum, adds noise, divides by K
    rng = np.random.default_rng(1)
    names = ["a", "b", "c", "d"]
    deltas = [{"w": rng.normal(size=100)} for _ in names]
    agreed = _pairwise_secrets(names)
    masked = [SiteUpdate(n, mask_update(d, 1.0, n, agreed[n], round_=1), 10, {"secagg": {"w": "float64"}, "unclipped": True})
              for n, d in zip(names, deltas)]
    quiet = SecureAggregation(get_aggregator("dp_fedavg", noise_multiplier=0.0, clip_norm=100.0, adaptive=True, clipped_count_stddev=0.0))
    out = quiet.aggregate(1, masked, {"w": np.zeros(100)})
    assert np.abs(out.weights["w"] - np.mean([d["w"] for d in deltas], axis=0)).max() <= 4 * 2.0 ** -FRACTIONAL_BITS
    assert quiet.inner.clip_norm == pytest.approx(100.0 * np.exp(-0.2 * (1.0 - 0.5)))  # the summed unclipped count (4 of 4)
    noisy = SecureAggregation(get_aggregator("dp_fedavg", noise_multiplier=1.0, clip_norm=2.0, seed=0))
    zeros = [SiteUpdate(n, mask_update({"w": np.zeros(50_000)}, 1.0, n, agreed[n], round_=1), 10, {"secagg": {"w": "float64"}}) for n in names]
    noise = noisy.aggregate(1, zeros, {"w": np.zeros(50_000)}).weights["w"]
    assert abs(noise.std() - 1.0 * 2.0 / 4) < 0.02 * 0.5  # noise z·S on the sum of 4 sites, then / K
