"""Client-level DP (dp_fedavg): clipping on the sites, noise of the configured scale, adaptive clipping, accounting."""

import math

import lightning as L
import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from lightning_fed import FederatedStrategy
from lightning_fed.strategies import SiteUpdate, get_aggregator
from lightning_fed.strategies.dp_fedavg import clip
from lightning_fed.strategies.site import SiteAlgorithm, state_to_numpy
from lightning_fed.strategies.site.dp_fedavg import DPFedAvgSite
from tests.helpers import small_hospitals


def _updates(deltas, unclipped=True):
    return [
        SiteUpdate(f"s{i}", {"w": d}, num_samples=10 * (i + 1), extras={"unclipped": unclipped})
        for i, d in enumerate(deltas)
    ]


def test_sites_send_clipped_differences_from_the_global_model():
    module = torch.nn.Linear(3, 2)
    site = DPFedAvgSite(SiteAlgorithm(), clip_norm=0.5)
    site.anchor = {k: np.zeros_like(v) for k, v in state_to_numpy(module.state_dict()).items()}
    with torch.no_grad():
        module.weight.fill_(1.0)  # ||Δ|| = sqrt(6 + ||b||²) > 0.5
    update = site.local_update(None, module, num_samples=7)
    sent = np.concatenate([update.weights[k].ravel() for k in ("weight", "bias")])
    full = np.concatenate([module.weight.detach().numpy().ravel(), module.bias.detach().numpy().ravel()])
    assert np.linalg.norm(sent) == pytest.approx(0.5, rel=1e-6)  # norm S
    assert np.allclose(sent / np.linalg.norm(sent), full / np.linalg.norm(full), atol=1e-6)  # same direction
    assert update.extras["unclipped"] is False and update.num_samples == 7
    small, norm = clip({"w": np.array([0.1, 0.2], dtype=np.float32)}, 1.0)
    assert np.array_equal(small["w"], np.array([0.1, 0.2], dtype=np.float32)) and norm == pytest.approx(math.sqrt(0.05))


def test_the_first_rounds_anchor_does_not_follow_the_training():
    module = torch.nn.Linear(3, 2)
    site = DPFedAvgSite(SiteAlgorithm(), clip_norm=100.0)
    site.on_fit_start(None, module)  # round 1: the model every site starts from
    start = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        module.weight.add_(1.0)  # training moves the live parameters
    update = site.local_update(None, module, num_samples=5)
    np.testing.assert_allclose(update.weights["weight"], (module.weight - start["weight"]).detach().numpy(), rtol=1e-6)
    assert np.abs(update.weights["weight"]).min() > 0.99  # Δ = 1, not 0


def test_server_noise_has_the_configured_scale_and_sites_count_equally():
    z, s, k, n = 1.3, 2.0, 4, 200_000
    rule = get_aggregator("dp_fedavg", noise_multiplier=z, clip_norm=s, seed=0)
    current = {"w": np.full(n, 5.0, dtype=np.float32)}
    out = rule.aggregate(1, _updates([np.zeros(n, dtype=np.float32)] * k), current)
    noise = out.weights["w"].astype(np.float64) - 5.0
    expected = z * s / k  # N(0, (zS)²) on the sum, divided by K
    assert abs(noise.std() - expected) < 0.01 * expected  # 200k draws: relative error ~0.16 %
    assert abs(noise.mean()) < 4 * expected / math.sqrt(n)
    quiet = get_aggregator("dp_fedavg", noise_multiplier=0.0, clip_norm=s, seed=0)
    deltas = [np.array([1.0, -2.0]), np.array([3.0, 0.0])]
    got = quiet.aggregate(1, _updates(deltas), {"w": np.array([10.0, 10.0])})
    assert np.allclose(got.weights["w"], [12.0, 9.0])  # uniform mean of the (already clipped) deltas, not by samples


def test_adaptive_clipping_follows_andrew_et_al():
    rule = get_aggregator(
        "dp_fedavg",
        noise_multiplier=0.0,
        clip_norm=1.0,
        adaptive=True,
        target_quantile=0.5,
        clip_learning_rate=0.2,
        clipped_count_stddev=0.0,
        seed=0,
    )
    rule.aggregate(1, _updates([np.zeros(2)] * 4, unclipped=True), {"w": np.zeros(2)})
    assert rule.clip_norm == pytest.approx(math.exp(-0.2 * (1.0 - 0.5)))  # every site under S: S shrinks
    rule.aggregate(2, _updates([np.zeros(2)] * 4, unclipped=False), {"w": np.zeros(2)})
    assert rule.clip_norm == pytest.approx(math.exp(-0.1) * math.exp(0.1))  # every site clipped: S grows back
    noisy = get_aggregator("dp_fedavg", noise_multiplier=1.0, adaptive=True, clipped_count_stddev=2.0)
    assert noisy.update_noise_multiplier(4) == pytest.approx((1.0 - 1 / 16) ** -0.5)  # z_Δ = (z⁻² − (2σ_b)⁻²)^-½
    with pytest.raises(ValueError, match="too small"):
        get_aggregator(
            "dp_fedavg", noise_multiplier=1.0, adaptive=True, clipped_count_stddev=0.4
        ).update_noise_multiplier(4)


def test_client_level_epsilon_is_the_accountants_and_survives_a_restart():
    rule = get_aggregator("dp_fedavg", noise_multiplier=1.1, clip_norm=1.0, delta=1e-5, seed=3)
    eps = []
    for r in range(1, 4):
        eps.append(
            rule.aggregate(r, _updates([np.ones(2)] * 3), {"w": np.zeros(2)}).extras["metrics"]["client_dp_epsilon"]
        )
    accountant = RDPAccountant()
    accountant.history = [(1.1, 1.0, 3)]
    assert eps[-1] == pytest.approx(accountant.get_epsilon(1e-5)) and eps[0] < eps[1] < eps[2]
    restored = get_aggregator("dp_fedavg", noise_multiplier=1.1, clip_norm=1.0, delta=1e-5)
    restored.load_state_dict(rule.state_dict())
    a = rule.aggregate(4, _updates([np.ones(2)] * 3), {"w": np.zeros(2)})
    b = restored.aggregate(4, _updates([np.ones(2)] * 3), {"w": np.zeros(2)})
    assert np.array_equal(a.weights["w"], b.weights["w"])  # same noise stream after a restart
    assert b.extras["metrics"]["client_dp_epsilon"] > eps[-1]
    from opacus.accountants import PRVAccountant

    tighter = get_aggregator("dp_fedavg", noise_multiplier=1.1, clip_norm=1.0, delta=1e-5, seed=3, accountant="prv")
    for r in range(1, 4):
        prv = tighter.aggregate(r, _updates([np.ones(2)] * 3), {"w": np.zeros(2)}).extras["metrics"][
            "client_dp_epsilon"
        ]
    independent = PRVAccountant()
    independent.history = [(1.1, 1.0, 3)]
    with np.errstate(divide="ignore"):
        assert prv == pytest.approx(independent.get_epsilon(1e-5), rel=1e-6) and prv < eps[-1]


@pytest.mark.usefixtures("fed_data")
def test_dp_fedavg_federation_reports_client_epsilon(tmp_path, ray_cluster):
    from lightning_fed.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN()
    strategy = FederatedStrategy(
        aggregator="dp_fedavg",
        aggregator_kwargs={"noise_multiplier": 0.5, "clip_norm": 5.0, "seed": 0, "inner": "fedprox"},
        progress=False,
        checkpoint_every=0,
    )
    trainer = L.Trainer(
        strategy=strategy, max_epochs=2, logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    try:
        trainer.fit(model, datamodule=small_hospitals())
        sites = strategy.federation.site_weights()
    finally:
        strategy.shutdown()
    accountant = RDPAccountant()
    accountant.history = [(0.5, 1.0, 2)]
    assert float(trainer.callback_metrics["fl/client_dp_epsilon"]) == pytest.approx(
        accountant.get_epsilon(1e-5), rel=1e-6
    )
    for state in sites.values():  # every site holds the noisy global model
        for key, value in model.state_dict().items():
            np.testing.assert_array_equal(state[key], value.numpy())
