"""Sample-level DP-SGD per site (Opacus): accounting that survives rounds and resumes, refusals, FedProx under DP."""

import lightning as L
import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_fed import DPSGD, FederatedStrategy, SiteFailedError
from lightning_fed.privacy import SiteDPSGD, site_privacy
from lightning_fed.strategies.site.fedprox import FedProxSite
from tests.helpers import BNCNN, pretrained_bn, small_hospitals


def _independent_epsilon(noise, sample_rate, steps, delta=1e-5):
    accountant = RDPAccountant()
    accountant.history = [(noise, sample_rate, steps)]
    return accountant.get_epsilon(delta)


def _trainer(tmp_path, strategy, epochs):
    return L.Trainer(
        strategy=strategy, max_epochs=epochs, logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )


@pytest.mark.usefixtures("fed_data")
def test_site_epsilon_is_an_accountants_and_keeps_growing_across_rounds_and_resume(tmp_path, ray_cluster):
    # FedFBN's frozen, pretrained BatchNorm is compatible with DP-SGD; 'large' trains without DP
    privacy = {"small_1": DPSGD(noise_multiplier=1.1, max_grad_norm=1.0), "small_2": DPSGD(target_epsilon=3.0)}
    ckpt = tmp_path / "fed"
    torch.manual_seed(0)
    model = pretrained_bn(BNCNN())
    bn_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("net.1.")}
    first = FederatedStrategy(aggregator="fedfbn", privacy=privacy, checkpoint_dir=str(ckpt), progress=False)
    trainer = _trainer(tmp_path, first, 2)
    trainer.fit(model, datamodule=small_hospitals(val_fraction=0.0))
    first.shutdown()
    report = first.last_fit.privacy
    assert set(report.sites) == {"small_1", "small_2"}  # the large hospital is not private
    small_1 = report.sites["small_1"]
    steps = first.last_fit.sites["small_1"].global_step
    assert small_1.steps == steps > 0
    assert small_1.epsilon == pytest.approx(_independent_epsilon(1.1, small_1.sample_rate, steps), rel=1e-9)
    assert small_1.epsilon_per_epoch[0] < small_1.epsilon_per_epoch[1] == pytest.approx(small_1.epsilon)
    small_2 = report.sites["small_2"]
    # the noise for a 3.0 budget over max_epochs=2 is what Opacus derives; the spend after 2 epochs stays within it
    assert small_2.noise_multiplier == pytest.approx(
        get_noise_multiplier(
            target_epsilon=3.0, target_delta=1e-5, sample_rate=small_2.sample_rate, epochs=2, accountant="rdp"
        )
    )
    assert 2.5 < small_2.epsilon <= 3.0
    assert report.max_epsilon == max(small_1.epsilon, small_2.epsilon)
    assert float(trainer.callback_metrics["fl/dp_epsilon_max"]) == pytest.approx(report.max_epsilon, rel=1e-6)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in bn_before.items())

    second = FederatedStrategy(aggregator="fedfbn", privacy=privacy, checkpoint_dir=str(ckpt), progress=False)
    resumed = _trainer(tmp_path, second, 4)
    resumed.fit(pretrained_bn(BNCNN()), datamodule=small_hospitals(val_fraction=0.0), ckpt_path=str(ckpt))
    second.shutdown()
    again = second.last_fit.privacy.sites["small_1"]
    total_steps = second.last_fit.sites["small_1"].global_step
    assert total_steps == 2 * steps
    # one accountant for the whole run: the resumed site continues from the checkpointed history, never from 0
    assert again.epsilon == pytest.approx(_independent_epsilon(1.1, small_1.sample_rate, total_steps), rel=1e-9)
    assert again.epsilon_per_epoch[:2] == pytest.approx(small_1.epsilon_per_epoch)
    assert np.all(np.diff(again.epsilon_per_epoch) > 0) and len(again.epsilon_per_epoch) == 4


@pytest.mark.usefixtures("fed_data")
def test_dp_sgd_refuses_trainable_batchnorm_with_the_two_ways_out(tmp_path, ray_cluster):
    strategy = FederatedStrategy(privacy={"small_1": DPSGD(noise_multiplier=1.0)}, progress=False, checkpoint_every=0)
    with pytest.raises(
        SiteFailedError, match=r"site 'small_1'.*cannot train BatchNorm layers \['net.1'\].*fedfbn.*GroupNorm"
    ) as info:
        _trainer(tmp_path, strategy, 1).fit(BNCNN(), datamodule=small_hospitals())
    assert "\n" not in str(info.value)


def test_privacy_settings_are_checked():
    with pytest.raises(ValueError, match="exactly one of target_epsilon and noise_multiplier"):
        DPSGD()
    with pytest.raises(ValueError, match="delta must be in"):
        DPSGD(noise_multiplier=1.0, delta=0)
    with pytest.raises(ValueError, match=r"privacy names unknown sites \['smal_1'\]"):
        site_privacy({"smal_1": DPSGD(noise_multiplier=1.0)}, ["large", "small_1"])
    rule = DPSGD(noise_multiplier=1.0)
    assert site_privacy({"*": rule, "large": None}, ["large", "small_1"]) == {"large": None, "small_1": rule}


class _Linear(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _one_step(mu, dp):
    torch.manual_seed(0)
    model = _Linear()
    prox = FedProxSite(mu)
    prox.anchor = {n: torch.zeros_like(p) for n, p in model.named_parameters()}  # w_global away from w
    callbacks = [prox]
    if dp:  # no noise, no clipping: DP-SGD's gradient is the plain mean gradient, so the runs must agree
        callbacks.append(SiteDPSGD("s", DPSGD(noise_multiplier=0.0, max_grad_norm=1e6, poisson_sampling=False)))
    data = DataLoader(
        TensorDataset(torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1] * 4)),
        batch_size=8,
    )
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, data)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fedprox_term_survives_dp_sgd():
    # Opacus overwrites .grad with the private per-sample mean; the proximal term must be added back after the noise
    plain, private = _one_step(mu=1.0, dp=False), _one_step(mu=1.0, dp=True)
    without_term = _one_step(mu=0.0, dp=True)
    for key in plain:
        assert torch.allclose(private[key], plain[key], atol=1e-6), key
    assert any(not torch.allclose(private[k], without_term[k], atol=1e-4) for k in private)


@pytest.mark.usefixtures("fed_data")
def test_only_parameter_shaped_arrays_counts_and_metric_states_leave_a_site(tmp_path, ray_cluster):
    from lightning_fed.metrics import TaskSpec
    from lightning_fed.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN()
    strategy = FederatedStrategy(audit_messages=True, privacy={"small_1": DPSGD(noise_multiplier=1.0)}, progress=False)
    trainer = _trainer(tmp_path, strategy, 2)
    dm = small_hospitals()
    try:
        trainer.fit(model, datamodule=dm)
        trainer.test(model, datamodule=dm, verbose=False)
        audit = strategy.federation.audit()
    finally:
        strategy.shutdown()
    parameter_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    metric_shapes = {tuple(v.shape) for m in TaskSpec("binary", 2).build().values() for v in m.metric_state.values()}
    messages = audit["coordinator"] + audit["driver"]
    methods = {m["method"] for m in messages}
    assert {"sync", "merge_metrics", "agree", "report", "site_finished", "fit", "test"} <= methods
    arrays = 0
    for message in messages:
        for path, kind, shape, _dtype in message["payload"]:
            assert kind in ("array", "scalar", "text", "none"), (message["method"], path, kind)  # no opaque objects
            if kind != "array":
                continue
            arrays += 1
            if message["method"] == "sync":
                key = path.rsplit("/", 1)[-1]
                assert ".weights/" in path and shape == parameter_shapes[key], (
                    path,
                    shape,
                )  # a weight, in its own shape
            else:
                # metric states: confusion counts and binned ROC counts, never one row per sample
                assert "/states/" in path and shape in metric_shapes, (message["method"], path, shape)
            if shape:
                assert shape[0] not in (50, 200, 240, 280), (
                    message["method"],
                    path,
                    shape,
                )  # no batch- or dataset-sized array
        if message["method"] == "report":
            assert all(kind in ("scalar", "text", "none") for _p, kind, _s, _d in message["payload"])
    assert arrays > 0


def test_dp_sgd_refuses_gradient_accumulation():
    data = DataLoader(TensorDataset(torch.randn(8, 4), torch.tensor([0, 1] * 4)), batch_size=4)
    trainer = L.Trainer(
        max_steps=1,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SiteDPSGD("s", DPSGD(noise_multiplier=1.0, poisson_sampling=False))],
    )
    with pytest.raises(ValueError, match="cannot accumulate gradients.*raise the batch size"):
        trainer.fit(_Linear(), data)


@pytest.mark.usefixtures("fed_data")
def test_prv_accountant_calibrates_less_noise_for_the_same_epsilon_and_stays_in_the_checkpoint(tmp_path, ray_cluster):
    from opacus.accountants import PRVAccountant

    ckpt = tmp_path / "fed"
    privacy = {"small_2": DPSGD(target_epsilon=3.0, accountant="prv")}
    strategy = FederatedStrategy(aggregator="fedfbn", privacy=privacy, checkpoint_dir=str(ckpt), progress=False)
    torch.manual_seed(0)
    _trainer(tmp_path, strategy, 2).fit(pretrained_bn(BNCNN()), datamodule=small_hospitals(val_fraction=0.0))
    strategy.shutdown()
    site = strategy.last_fit.privacy.sites["small_2"]
    assert site.accountant == "prv"
    rdp_noise = get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=site.sample_rate, epochs=2, accountant="rdp"
    )
    assert site.noise_multiplier == pytest.approx(
        get_noise_multiplier(
            target_epsilon=3.0, target_delta=1e-5, sample_rate=site.sample_rate, epochs=2, accountant="prv"
        )
    )
    assert site.noise_multiplier < 0.95 * rdp_noise  # the tighter accountant buys the same ε with less noise
    independent = PRVAccountant()
    independent.history = [(site.noise_multiplier, site.sample_rate, site.steps)]
    assert site.epsilon == pytest.approx(independent.get_epsilon(1e-5), rel=1e-6) and 2.5 < site.epsilon <= 3.0
    with pytest.raises(ValueError, match="accountant must be one of rdp, prv"):
        DPSGD(target_epsilon=1.0, accountant="gdp")
    # the checkpoint remembers the accountant: resuming with another one is refused in one line
    other = FederatedStrategy(
        aggregator="fedfbn", privacy={"small_2": DPSGD(target_epsilon=3.0)}, checkpoint_dir=str(ckpt), progress=False
    )
    with pytest.raises(
        SiteFailedError,
        match=r"small_2.*accounted with 'prv', this run uses 'rdp': resume with DPSGD\(accountant='prv'\)",
    ):
        _trainer(tmp_path, other, 3).fit(
            pretrained_bn(BNCNN()), datamodule=small_hospitals(val_fraction=0.0), ckpt_path=str(ckpt)
        )
    other.shutdown()
