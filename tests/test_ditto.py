"""Ditto: each site's personal model is trained beside the shared one, by the hand-computed proximal step, kept in the
site's checkpoints, and tested at its site."""

import lightning as L
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_fed import DPSGD, FederatedStrategy
from lightning_fed.strategies import GlobalModel, get_aggregator
from lightning_fed.strategies.site import SiteAlgorithm, state_to_numpy
from lightning_fed.strategies.site.ditto import DittoSite


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.linear(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(module, site, loader, steps):
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=[site],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    return trainer


def test_the_personal_model_takes_the_hand_computed_proximal_step_on_every_batch():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # two batches, in order
    module = Tiny()
    w0 = {n: p.detach().clone() for n, p in module.named_parameters()}  # the round's global model (round 0)
    site = DittoSite(SiteAlgorithm(), lam=0.5)
    _fit(module, site, loader, steps=2)
    # by hand: v <- v - lr * (grad F(v; batch) + lam * (v - w0)), from v = w0
    v = {n: t.clone().requires_grad_(True) for n, t in w0.items()}
    for batch in ((x[:4], y[:4]), (x[4:], y[4:])):
        loss = F.mse_loss(batch[0] @ v["linear.weight"].T + v["linear.bias"], batch[1])
        grads = torch.autograd.grad(loss, list(v.values()))
        v = {
            n: (t - 0.1 * (g + 0.5 * (t - w0[n]))).detach().requires_grad_(True) for (n, t), g in zip(v.items(), grads)
        }
    personal = dict(site.personal_models()["personal"].named_parameters())
    for name, value in v.items():
        torch.testing.assert_close(personal[name].detach(), value.detach(), rtol=0, atol=1e-6)
    # the shared model trained as plain SGD would: the proximal term is the personal model's only
    assert not torch.allclose(module.linear.weight, personal["linear.weight"])


def test_the_anchor_follows_each_rounds_global_model_and_everything_resumes_from_the_checkpoint_state():
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(8, 3), torch.randn(8, 1)), batch_size=4)
    module, site = Tiny(), DittoSite(SiteAlgorithm(), lam=1.0)
    _fit(module, site, loader, steps=2)
    new_global = {k: v + 1.0 for k, v in state_to_numpy(module.state_dict()).items()}
    site.receive_global(None, module, GlobalModel(new_global, round=1))
    torch.testing.assert_close(site.anchor["linear.bias"], torch.from_numpy(new_global["linear.bias"]))
    site.receive_global(None, module, GlobalModel({k: v * 0 for k, v in new_global.items()}, round=-1))
    torch.testing.assert_close(site.anchor["linear.bias"], torch.from_numpy(new_global["linear.bias"]))  # a test's
    state = site.state_dict()
    restored = DittoSite(SiteAlgorithm(), lam=1.0)
    restored.load_state_dict(state)
    _fit(Tiny(), restored, loader, steps=0)  # on_fit_start applies the checkpoint's state
    for name, value in site.personal.state_dict().items():
        assert torch.equal(restored.personal.state_dict()[name], value)
    assert restored.optimizer.state_dict() == site.optimizer.state_dict()
    assert all(torch.equal(restored.anchor[k], v) for k, v in site.anchor.items())


class TinyBN(Tiny):
    """Tiny behind a BatchNorm with pretrained (non-initial) statistics, as FedFBN needs."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(3)
        with torch.no_grad():
            self.norm.running_mean.fill_(0.5)
            self.norm.running_var.fill_(2.0)
            self.norm.weight.fill_(1.5)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.linear(self.norm(x)), y)


def test_ditto_over_fedfbn_keeps_batchnorm_frozen_in_both_models_and_sends_only_the_shared_tensors():
    rule = get_aggregator("ditto", lam=0.5, rule="fedfbn")
    assert rule.name == "ditto_fedfbn" and rule.trains_personal_models and rule.inner.name == "fedfbn"
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(16, 3) * 3 + 1, torch.randn(16, 1)), batch_size=4)
    module, site = TinyBN(), rule.site_algorithm()
    frozen = {k: v.clone() for k, v in module.norm.state_dict().items()}
    start = module.linear.weight.detach().clone()
    _fit(module, site, loader, steps=3)
    personal = site.personal_models()["personal"]
    for model in (module, personal):  # the rule's site half froze BatchNorm before the personal copy was made
        assert all(torch.equal(model.norm.state_dict()[k], v) for k, v in frozen.items())
    assert not torch.equal(personal.linear.weight, start) and not torch.equal(
        personal.linear.weight, module.linear.weight
    )
    assert sorted(site.local_update(None, module, 16).weights) == ["linear.bias", "linear.weight"]
    assert set(site.anchor) == {"linear.weight", "linear.bias"}  # w_t: the trained tensors only


def test_ditto_options_and_refusals():
    with pytest.raises(ValueError, match="lam"):
        get_aggregator("ditto", lam=-1)
    with pytest.raises(ValueError, match="already trains personal models"):
        get_aggregator("ditto", rule="ditto")
    with pytest.raises(ValueError, match="unknown aggregator 'nope'"):
        get_aggregator("ditto", rule="nope")
    with pytest.raises(ValueError, match="accountants"):
        FederatedStrategy(aggregator="ditto", privacy=DPSGD(noise_multiplier=1.0))
    with pytest.raises(ValueError, match="accountants"):  # through the wrappers too
        FederatedStrategy(
            aggregator="ditto", personal=["linear.bias"], compression="fp16", privacy=DPSGD(noise_multiplier=1.0)
        )
