"""FedProx, FedBN, server optimizers and robust rules: hand computations, then real federations."""

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from lightning_fed import FederatedStrategy
from lightning_fed.strategies import FedAdagrad, FedAdam, FedYogi, Median, SiteUpdate, TrimmedMean, get_aggregator
from lightning_fed.strategies.site.fedbn import normalisation_keys
from lightning_fed.strategies.site.fedprox import FedProxSite


def _updates(values, sizes=None):
    sizes = sizes or [1] * len(values)
    return [SiteUpdate(str(i), {"w": np.array(v, dtype=np.float32)}, n) for i, (v, n) in enumerate(zip(values, sizes))]


def test_fedprox_adds_the_proximal_gradient():
    module = nn.Linear(2, 1)
    site = FedProxSite(mu=0.5)
    site._set_anchor(module)
    anchor = {n: p.detach().clone() for n, p in module.named_parameters()}
    with torch.no_grad():
        module.weight += torch.tensor([[1.0, -2.0]])
        module.bias -= 3.0
    module.weight.grad = torch.tensor([[0.1, 0.2]])
    module.bias.grad = torch.tensor([0.5])
    site.on_before_optimizer_step(None, module, None)
    # grad + mu * (w - w_global)
    torch.testing.assert_close(module.weight.grad, torch.tensor([[0.1 + 0.5 * 1.0, 0.2 + 0.5 * -2.0]]))
    torch.testing.assert_close(module.bias.grad, torch.tensor([0.5 + 0.5 * -3.0]))
    assert set(site.state_dict()["anchor"]) == set(anchor)  # the anchor survives a resume
    with pytest.raises(ValueError, match="mu must be >= 0"):
        get_aggregator("fedprox", mu=-1)


def test_server_optimizers_match_reddi_et_al():
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    current = {"w": np.array([1.0], dtype=np.float32), "n": np.array(5, dtype=np.int64)}
    updates = [
        SiteUpdate("a", {"w": np.array([2.0], np.float32), "n": np.array(7)}, 1),
        SiteUpdate("b", {"w": np.array([3.0], np.float32), "n": np.array(9)}, 3),
    ]
    delta = 0.25 * 2.0 + 0.75 * 3.0 - 1.0  # 1.75
    m = (1 - b1) * delta
    expected_v = {
        FedAdam: b2 * tau**2 + (1 - b2) * delta**2,
        FedAdagrad: tau**2 + delta**2,
        FedYogi: tau**2 - (1 - b2) * delta**2 * np.sign(tau**2 - delta**2),
    }
    for rule, v in expected_v.items():
        options = dict(eta=eta, beta1=b1, tau=tau) if rule is FedAdagrad else dict(eta=eta, beta1=b1, beta2=b2, tau=tau)
        agg = rule(**options)
        out = agg.aggregate(1, updates, current)
        assert out.weights["w"][0] == pytest.approx(1.0 + eta * m / (np.sqrt(v) + tau), rel=1e-6), rule.__name__
        assert agg.m["w"][0] == pytest.approx(m) and agg.v["w"][0] == pytest.approx(v)
        assert int(out.weights["n"]) == 9  # integer buffer from the largest site, not averaged
        # the moments are server state: a restored copy continues exactly like the original
        restored = rule(**options)
        restored.load_state_dict(agg.state_dict())
        nxt = agg.aggregate(2, updates, out.weights).weights["w"]
        assert restored.aggregate(2, updates, out.weights).weights["w"][0] == pytest.approx(nxt[0])


def test_median_and_trimmed_mean_ignore_an_outlier_site():
    out = Median().aggregate(1, _updates([[1.0, 10.0], [2.0, -5.0], [100.0, 0.0]], sizes=[1, 1, 1000]), None)
    np.testing.assert_allclose(out.weights["w"], [2.0, 0.0])  # sample counts do not buy influence
    out = TrimmedMean(beta=0.2).aggregate(1, _updates([[1.0], [2.0], [3.0], [4.0], [100.0]]), None)
    np.testing.assert_allclose(out.weights["w"], [3.0])  # floor(0.2 * 5) = 1 dropped from each end
    out = TrimmedMean(beta=0.0).aggregate(1, _updates([[1.0], [2.0], [6.0]]), None)
    np.testing.assert_allclose(out.weights["w"], [3.0])
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 0.5\)"):
        TrimmedMean(beta=0.5)


def test_normalisation_layers_are_found_by_type_not_name():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    model.add_module("norm1", nn.Linear(2, 2))  # named like a norm, is not one
    keys = normalisation_keys(model)
    assert "1.weight" in keys and "1.running_var" in keys and "1.num_batches_tracked" in keys and "2.1.bias" in keys
    assert not any(k.startswith(("norm1", "0.", "2.0.")) for k in keys)


@pytest.mark.usefixtures("ray_cluster", "fed_data")
def test_fedbn_keeps_each_sites_bn_and_averages_the_rest(tmp_path):
    from tests.helpers import BNCNN, assert_sites_hold, small_hospitals

    torch.manual_seed(0)
    model = BNCNN()
    strategy = FederatedStrategy(aggregator="fedbn", progress=False, checkpoint_every=0)
    trainer = L.Trainer(strategy=strategy, max_epochs=2, logger=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=(dm := small_hospitals(val_fraction=0.0)))
    try:
        weights = strategy.federation.site_weights()
        assert_sites_hold(model, weights, skip=normalisation_keys(model))
        running = [weights[s]["net.1.running_mean"] for s in weights]
        assert not np.allclose(running[0], running[1])  # every site has its own BN statistics
        trainer.test(model, datamodule=dm, verbose=False)
        assert strategy.last_evaluation.notes == ["each site evaluated with its own normalisation layers (FedBN)"]
        # the test used each site's own BN: the sites still hold their BN after the global weights were pushed
        after = strategy.federation.site_weights()
        for site in after:
            np.testing.assert_array_equal(after[site]["net.1.running_mean"], weights[site]["net.1.running_mean"])
    finally:
        strategy.shutdown()


@pytest.mark.usefixtures("ray_cluster", "fed_data")
def test_fedprox_federation_needs_no_user_code(tmp_path):
    from lightning_fed.models import SmallCNN
    from tests.helpers import assert_sites_hold, small_hospitals

    torch.manual_seed(0)
    model = SmallCNN()
    strategy = FederatedStrategy(
        aggregator="fedprox", aggregator_kwargs={"mu": 0.1}, progress=False, checkpoint_every=0
    )
    trainer = L.Trainer(strategy=strategy, max_epochs=2, logger=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=small_hospitals(val_fraction=0.0))
    try:
        assert_sites_hold(model, strategy.federation.site_weights())
    finally:
        strategy.shutdown()


@pytest.mark.usefixtures("ray_cluster", "fed_data")
def test_fedfbn_keeps_pretrained_bn_bit_for_bit_over_rounds(tmp_path):
    from lightning_fed.strategies.site.fedfbn import batchnorm_layers
    from tests.helpers import RetrainingBNCNN, pretrained_bn, small_hospitals

    torch.manual_seed(0)
    model = pretrained_bn(RetrainingBNCNN())
    bn_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("net.1.")}
    other_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("net.1.")}
    strategy = FederatedStrategy(aggregator="fedfbn", progress=False, checkpoint_every=0)
    trainer = L.Trainer(strategy=strategy, max_epochs=3, logger=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=small_hospitals(val_fraction=0.0))
    try:
        for site, state in strategy.federation.site_weights().items():
            for key, before in bn_before.items():
                assert np.array_equal(state[key], before.numpy()), f"{site}:{key} changed"  # bit for bit
            for key in other_before:
                np.testing.assert_array_equal(state[key], model.state_dict()[key].numpy())  # the rest is global
        assert any(not torch.equal(other_before[k], model.state_dict()[k]) for k in other_before)  # it trained
        for key, before in bn_before.items():
            assert torch.equal(model.state_dict()[key], before)
    finally:
        strategy.shutdown()
    assert list(batchnorm_layers(model)) == ["net.1"]


def test_fedfbn_refuses_models_it_cannot_train(tmp_path):
    from lightning_fed import FederationConfigError
    from lightning_fed.models import SmallCNN
    from tests.helpers import BNCNN, small_hospitals

    for model, message in ((SmallCNN(), "has none: use fedavg"), (BNCNN(), "needs a pretrained backbone")):
        trainer = L.Trainer(strategy="fedfbn", max_epochs=1, logger=False, enable_checkpointing=False)
        with pytest.raises(FederationConfigError, match=message):
            trainer.fit(model, datamodule=small_hospitals())


def test_scaffold_control_variates_match_the_paper():
    from lightning_fed.strategies.scaffold import Scaffold
    from lightning_fed.strategies.site.scaffold import ScaffoldSite

    module = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(1.0)
    site = ScaffoldSite()
    site._start_round(module)
    site.c_server["weight"].fill_(0.5)
    site.c_site["weight"].fill_(0.2)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    module.weight.grad = torch.tensor([[0.3]])
    site.on_before_optimizer_step(None, module, optimizer)
    assert float(module.weight.grad) == pytest.approx(0.3 + 0.5 - 0.2)  # g + c - c_i
    optimizer.step()
    assert module.weight.item() == pytest.approx(0.94)
    update = site.local_update(None, module, num_samples=10)
    # c_i+ = c_i - c + (x - y) / (K lr) = 0.2 - 0.5 + 0.06 / 0.1 = 0.3
    assert float(site.c_site["weight"]) == pytest.approx(0.3)
    assert update.extras["delta_c"]["weight"].item() == pytest.approx(0.1)

    other = SiteUpdate(
        "b", {"weight": np.array([[1.10]], np.float32)}, 30, {"delta_c": {"weight": np.array([[-0.3]], np.float32)}}
    )
    update.site = "a"
    server = Scaffold(eta_g=1.0)
    out = server.aggregate(1, [update, other], {"weight": np.array([[1.0]], np.float32)})
    # x + eta_g * mean(dy) (sites count equally) and c + mean(dc)
    assert out.weights["weight"].item() == pytest.approx(1.0 + np.mean([-0.06, 0.10]), abs=1e-6)
    assert out.extras["c"]["weight"].item() == pytest.approx(np.mean([0.1, -0.3]), abs=1e-6)
    restored = Scaffold()
    restored.load_state_dict(server.state_dict())
    assert restored.c["weight"].item() == pytest.approx(-0.1)
    site.receive_global(None, module, out)
    assert float(site.c_server["weight"]) == pytest.approx(-0.1) and site.steps == 0


@pytest.mark.usefixtures("ray_cluster", "fed_data")
def test_scaffold_federation_and_resume_keep_control_variates(tmp_path):
    from tests.helpers import UnmodifiedMLP, small_hospitals

    class SGDModule(UnmodifiedMLP):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    strategy = FederatedStrategy(aggregator="scaffold", progress=False, checkpoint_dir=str(ckpt))
    trainer = L.Trainer(strategy=strategy, max_epochs=2, logger=False, enable_checkpointing=False)
    trainer.fit(SGDModule(), datamodule=small_hospitals(val_fraction=0.0))
    strategy.shutdown()
    from lightning_fed.checkpoint import find_checkpoint

    server = find_checkpoint(ckpt / "round-0002").server_state()
    c = server["aggregator_state"]["c"]
    assert set(c) == {"net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"} and any(
        np.abs(v).sum() > 0 for v in c.values()
    )
    site = torch.load(ckpt / "round-0002" / "site-small_1.ckpt", map_location="cpu", weights_only=False)
    state = next(v for k, v in site["callbacks"].items() if "ScaffoldSite" in k)
    # after the hand-over the site holds the server's c, as last aggregated
    np.testing.assert_allclose(state["c_server"]["net.1.bias"].numpy(), c["net.1.bias"], rtol=1e-6)
    resumed = FederatedStrategy(aggregator="scaffold", progress=False, checkpoint_dir=str(ckpt))
    trainer = L.Trainer(strategy=resumed, max_epochs=3, logger=False, enable_checkpointing=False)
    trainer.fit(SGDModule(), datamodule=small_hospitals(val_fraction=0.0), ckpt_path=str(ckpt))
    resumed.shutdown()
    assert trainer.current_epoch == 3
    assert find_checkpoint(ckpt / "round-0003").server_state()["round"] == 3
