"""Secure aggregation on the cryptography library: the real site halves exchanging keys and shares through a stand-in
coordinator (threads), dropout recovery, forged keys, and real federations (with a site dropping after masking)."""

import threading
from collections import defaultdict

import lightning as L
import numpy as np
import pytest
import torch

from lightning_fed import FederatedStrategy
from lightning_fed.strategies import SiteUpdate, get_aggregator
from lightning_fed.strategies.masking import (
    FRACTIONAL_BITS,
    SecAggError,
    combine_shares,
    from_fixed,
    private_key,
    public_of,
    split_secret,
    to_fixed,
    write_identities,
)
from lightning_fed.strategies.secagg import SecureAggregation
from lightning_fed.strategies.site import SiteAlgorithm
from lightning_fed.strategies.site.secagg import SecAggSite
from tests.helpers import small_hospitals


class Exchange:
    """The coordinator's all_gather, in threads: every site's value once all have sent theirs; ``tamper`` may alter
    what is handed back (a malicious coordinator)."""

    def __init__(self, sites, tamper=None, timeout=20.0):
        self.sites, self.tamper, self.timeout = set(sites), tamper, timeout
        self.values = defaultdict(dict)
        self.cond = threading.Condition()

    def all_gather(self, site, key, value):
        with self.cond:
            self.values[key][site] = value
            self.cond.notify_all()
            assert self.cond.wait_for(lambda: set(self.values[key]) >= self.sites, timeout=self.timeout), key
            out = dict(self.values[key])
        return self.tamper(site, key, out) if self.tamper else out


class Context:
    def __init__(self, site, exchange):
        self.site, self.exchange = site, exchange

    def all_gather(self, key, value):
        return self.exchange.all_gather(self.site, key, value)


class Offline(SiteAlgorithm):
    """A site that agreed its round's keys and shares, then failed before its update left."""

    def local_update(self, trainer, pl_module, num_samples):
        raise RuntimeError("scanner offline")


def _round(
    tmp_path, weights, samples, failing=(), threshold=None, tamper=None, inner=SiteAlgorithm, weighting="samples"
):
    """One round of the real site halves; returns their updates (or errors) and the halves."""
    names = sorted(weights)
    identities = tmp_path / "identities"
    if not identities.exists():
        write_identities(names, identities)
    exchange = Exchange(names, tamper, timeout=2.0 if tamper else 20.0)  # a site that stops leaves the others waiting
    halves = {
        n: SecAggSite(Offline() if n in failing else inner(), weighting, FRACTIONAL_BITS, threshold, str(identities))
        for n in names
    }
    out = {}

    def run(name):
        halves[name].bind(Context(name, exchange))
        module = torch.nn.Linear(8, 3).double()
        with torch.no_grad():
            for p in module.parameters():
                p.zero_()
        halves[name].inner.on_fit_start(None, module)  # the round starts from zeros (DP-FedAvg's half sends w − 0)
        with torch.no_grad():
            for key, p in module.state_dict().items():
                p.copy_(torch.from_numpy(weights[name][key]))
        try:
            update = halves[name].local_update(None, module, samples[name])
            update.site = name
            out[name] = update
        except Exception as err:  # noqa: BLE001  (the test looks at it)
            out[name] = err

    threads = [threading.Thread(target=run, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out, halves


def _weights(rng, names):
    return {n: {"weight": rng.normal(size=(3, 8)), "bias": rng.normal(size=3)} for n in names}


def _exact_mean(weights, samples, names):
    """What the masked sum must decode to: Σ round(2^f n_i w_i) in the ring, over Σ n_i."""
    out = {}
    for key in weights[names[0]]:
        ring = sum(
            (to_fixed(weights[n][key] * samples[n]) for n in names[1:]),
            to_fixed(weights[names[0]][key] * samples[names[0]]),
        )
        out[key] = from_fixed(ring) / sum(samples[n] for n in names)
    return out


def test_masks_cancel_and_single_updates_look_like_noise(tmp_path):
    rng = np.random.default_rng(0)
    names = ["a", "b", "c"]
    weights, samples = _weights(rng, names), {"a": 300, "b": 120, "c": 45}
    updates, _ = _round(tmp_path, weights, samples)
    rule = SecureAggregation(get_aggregator("fedavg"))
    assert rule.follow_up(1, list(updates.values())) is None  # nobody dropped: nothing to ask
    model = rule.aggregate(1, [updates[n] for n in names], None)
    expected = _exact_mean(weights, samples, names)
    plain = get_aggregator("fedavg").aggregate(1, [SiteUpdate(n, weights[n], samples[n]) for n in names], None)
    for key in expected:
        np.testing.assert_array_equal(model.weights[key], expected[key])  # the ring sum, exactly
        assert np.abs(model.weights[key] - plain.weights[key]).max() <= 3 * 2.0**-FRACTIONAL_BITS
    for n in names:  # what the coordinator holds of one site says nothing about that site's update
        seen = updates[n].weights["weight"].ravel()
        assert seen.dtype == np.uint64
        real = to_fixed(weights[n]["weight"] * samples[n]).ravel()
        assert not np.any(seen == real)
        assert np.abs(seen.astype(np.float64) / 2.0**64 - 0.5).max() < 0.5  # spread over the ring
    again, _ = _round(tmp_path, weights, samples)  # fresh keys every round: fresh masks
    assert not np.any(again["a"].weights["weight"] == updates["a"].weights["weight"])


def test_a_site_dropping_after_masking_leaves_the_exact_sum_of_the_others(tmp_path):
    rng = np.random.default_rng(1)
    names = ["a", "b", "c", "d"]
    weights, samples = _weights(rng, names), {"a": 50, "b": 70, "c": 20, "d": 90}
    updates, halves = _round(tmp_path, weights, samples, failing={"c"})
    assert isinstance(updates["c"], RuntimeError)  # c agreed keys and handed out shares, then failed
    arrived = [updates[n] for n in ("a", "b", "d")]
    assert arrived[0].extras["secagg"]["sites"] == names  # the others masked with c too
    rule = SecureAggregation(get_aggregator("fedavg"))
    question = rule.follow_up(1, arrived)
    assert question == {"round": 1, "dropped": ["c"], "present": ["a", "b", "d"]}
    answers = {n: halves[n].answer_follow_up(None, None, question) for n in ("a", "b", "d")}
    assert all(set(a) == {"c"} for a in answers.values())  # shares of c's mask key, of nobody else's
    rule.receive_answers(1, answers)
    model = rule.aggregate(1, arrived, None)
    expected = _exact_mean(weights, samples, ["a", "b", "d"])
    for key in expected:
        np.testing.assert_array_equal(model.weights[key], expected[key])
    # without enough shares the sum stays masked, and the rule says so
    rule.follow_up(1, arrived)
    rule.receive_answers(1, {"a": answers["a"], "b": {}, "d": {}})
    with pytest.raises(ValueError, match="only 1 site.*revealed shares.*fewer than threshold=3"):
        rule.aggregate(1, arrived, None)


def test_clipped_updates_travel_in_the_32_bit_ring_and_sum_exactly(tmp_path):
    from lightning_fed.strategies.site.dp_fedavg import DPFedAvgSite

    rng = np.random.default_rng(4)
    names = ["a", "b", "c", "d"]
    weights = _weights(rng, names)
    zeros = {k: np.zeros_like(v) for k, v in weights["a"].items()}
    clipped, _ = _round(
        tmp_path,
        weights,
        {n: 10 for n in names},
        inner=lambda: DPFedAvgSite(SiteAlgorithm(), clip_norm=1.0),
        weighting="uniform",
    )
    wide, _ = _round(tmp_path, weights, {n: 10 for n in names}, weighting="uniform")
    info = clipped["a"].extras["secagg"]
    assert info["ring"] == 32 and clipped["a"].weights["weight"].dtype == np.uint32  # 4 bytes a value, not 8
    assert 24 <= info["bits"] <= 30 and 4 * (2 ** info["bits"] * 1.0 + 1) < 2**31  # four sites of norm ≤ 1 cannot wrap
    assert wide["a"].extras["secagg"]["ring"] == 64
    assert 2 * sum(v.nbytes for v in clipped["a"].weights.values()) == sum(v.nbytes for v in wide["a"].weights.values())
    rule = SecureAggregation(get_aggregator("dp_fedavg", noise_multiplier=0.0, clip_norm=1.0))
    model = rule.aggregate(1, [clipped[n] for n in names], zeros)
    norms = {n: np.sqrt(sum(np.sum(w**2) for w in weights[n].values())) for n in names}
    for key in zeros:  # the mean of the clipped differences (the module started at zero, so w itself is the Δ)
        expected = np.mean([weights[n][key] * min(1.0, 1.0 / norms[n]) for n in names], axis=0)
        assert np.abs(model.weights[key] - expected).max() <= 4 * 2.0 ** -info["bits"]


def test_a_site_never_reveals_shares_of_a_site_whose_update_arrived(tmp_path):
    rng = np.random.default_rng(2)
    names = ["a", "b", "c"]
    updates, halves = _round(tmp_path, _weights(rng, names), {n: 10 for n in names})
    # a coordinator that asks for b's shares while b's update arrived learns nothing
    assert halves["a"].answer_follow_up(None, None, {"round": 1, "dropped": ["b"], "present": ["a", "b", "c"]}) == {}
    with pytest.raises(SecAggError, match="counts it as dropped"):
        halves["a"].answer_follow_up(None, None, {"round": 1, "dropped": ["a"], "present": ["b", "c"]})
    with pytest.raises(SecAggError, match="holds those of round 1"):
        halves["a"].answer_follow_up(None, None, {"round": 7, "dropped": ["b"], "present": ["a", "c"]})


def test_a_swapped_public_key_is_detected(tmp_path):
    rng = np.random.default_rng(3)
    names = ["a", "b", "c"]
    forged = public_of(private_key())

    def swap(site, key, values):  # the coordinator hands site a its own key in place of b's
        if key.endswith("/keys") and site == "a":
            values = {**values, "b": {**values["b"], "mask": forged}}
        return values

    updates, _ = _round(tmp_path, _weights(rng, names), {n: 10 for n in names}, tamper=swap)
    assert isinstance(updates["a"], SecAggError)
    assert "public keys of site 'b' for round 1 are not signed by its identity key" in str(updates["a"])


def test_shamir_shares_rebuild_the_key_from_any_threshold_and_not_from_fewer():
    secret = private_key()
    raw = secret.private_bytes_raw()
    shares = split_secret(raw, 5, 3)
    assert combine_shares([shares[0], shares[2], shares[4]]) == raw
    assert combine_shares([shares[3], shares[1], shares[0]]) == raw
    with pytest.raises(ValueError, match="do not rebuild a key"):
        combine_shares(shares[:2])


def test_rules_that_need_each_sites_update_or_compression_refuse_secure_aggregation():
    for name in ("median", "trimmed_mean", "scaffold"):
        with pytest.raises(ValueError, match="cannot run under secure aggregation"):
            SecureAggregation(get_aggregator(name))
    with pytest.raises(ValueError, match="compression cannot go with secure aggregation"):
        FederatedStrategy(secagg=True, compression="int8")
    with pytest.raises(ValueError, match="threshold=5 is more than the federation's 3 sites"):
        SecureAggregation(get_aggregator("fedavg"), threshold=5).prepare(["a", "b", "c"])
    with pytest.raises(ValueError, match="no public identity key for site 'c'"):
        SecureAggregation(get_aggregator("fedavg"), identity_dir="/nonexistent").prepare(["c"])


@pytest.mark.usefixtures("fed_data")
def test_secure_federation_trains_like_fedavg(tmp_path, ray_cluster):
    from lightning_fed.models import SmallCNN

    results = {}
    for secagg in (False, True):
        torch.manual_seed(0)
        model = SmallCNN()
        strategy = FederatedStrategy(secagg=secagg, audit_messages=True, progress=False, checkpoint_every=0, seed=0)
        trainer = L.Trainer(
            strategy=strategy, max_epochs=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path
        )
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
    assert synced and all(
        dtype == "uint64" for m in synced for path, kind, _s, dtype in m["payload"] if kind == "array"
    )
    assert sum(m["method"] == "all_gather" for m in audit) == 2 * 3  # signed keys and sealed shares, once per site


@pytest.mark.usefixtures("fed_data")
def test_a_federation_survives_a_site_dropping_after_masking(tmp_path, ray_cluster):
    from lightning_fed.models import SmallCNN
    from tests.helpers import DropsAfterMasking

    torch.manual_seed(0)
    model = SmallCNN()
    flag = tmp_path / "dropped-once"
    strategy = FederatedStrategy(
        aggregator=DropsAfterMasking(site="small_2", round=2, once_flag=str(flag)),
        secagg=True,
        on_site_failure="continue",
        progress=False,
        checkpoint_every=1,
        checkpoint_dir=str(tmp_path / "ckpt"),
        seed=0,
    )
    trainer = L.Trainer(
        strategy=strategy, max_epochs=6, logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    data = small_hospitals(sizes=(400, 200, 200))
    try:
        trainer.fit(model, datamodule=data)
        fit = strategy.last_fit
        trainer.test(model, datamodule=data, verbose=False)
        auroc = strategy.last_evaluation.federated["fl/test_auroc"]
    finally:
        strategy.shutdown()
    assert flag.exists()
    everyone = ["large", "small_1", "small_2"]
    rounds = [sorted(r) for r in fit.round_sites]
    assert rounds[0] == everyone and rounds[1] == ["large", "small_1"]  # round 2: the others' sum, unmasked
    assert rounds[-1] == everyone  # it came back, with fresh keys (how many rounds its restart takes varies)
    assert [(e.site, e.event) for e in fit.events] == [("small_2", "left out"), ("small_2", "rejoined")]
    assert "hospital network down after masking" in fit.events[0].reason
    assert auroc > 0.85  # round 2's masked sum of the two others was unmasked: the model trained on
