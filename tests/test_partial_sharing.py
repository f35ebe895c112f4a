"""Partial sharing (``personal=[...]``, FedPer, FedBN): personal tensors never leave their site and aggregation never
changes them; the rest is the wrapped rule's."""

import lightning as L
import numpy as np
import pytest
import torch

from lightning_fed import FederatedStrategy
from lightning_fed.strategies import GlobalModel, SiteUpdate, get_aggregator
from lightning_fed.strategies.compression import Compressed
from lightning_fed.strategies.partial import PartialSharing
from lightning_fed.strategies.secagg import SecureAggregation
from lightning_fed.strategies.site import state_to_numpy
from lightning_fed.strategies.site.partial import PartialSharingSite, head_names


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(3, 4)
        self.classifier = torch.nn.Linear(4, 2)


def test_the_site_half_leaves_personal_tensors_out_of_every_update_and_keeps_them_when_the_global_model_comes():
    torch.manual_seed(0)
    module = _Model()
    site = get_aggregator("scaffold").site_algorithm()
    partial = PartialSharingSite(site, PartialSharing(get_aggregator("scaffold"), ["classifier.*"]).personal)
    site._start_round(module)
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    site.steps, site.lr = 1, 0.1
    update = partial.local_update(None, module, 10)
    assert set(update.weights) == {"body.weight", "body.bias"}
    assert set(update.extras["delta_c"]) == {"body.weight", "body.bias"}  # SCAFFOLD's per-tensor extras too
    before = {k: v.clone() for k, v in module.state_dict().items()}
    incoming = {k: np.full(v.shape, 7.0, np.float32) for k, v in before.items()}  # a global value for every tensor
    partial.receive_global(None, module, GlobalModel(incoming, round=1, extras={"c": {}}))
    state = module.state_dict()
    assert torch.equal(state["classifier.weight"], before["classifier.weight"])  # kept this site's
    assert torch.equal(state["classifier.bias"], before["classifier.bias"])
    assert bool((state["body.weight"] == 7).all()) and bool((state["body.bias"] == 7).all())  # the global model's


def test_the_server_refuses_an_update_holding_a_personal_tensor_and_composes_inside_compression_and_secagg():
    rule = PartialSharing(get_aggregator("fedavg"), lambda name: name.startswith("classifier"))
    good = SiteUpdate("a", {"body.weight": np.ones(2, np.float32)}, 5)
    assert rule.receive(good, None) is good
    with pytest.raises(ValueError, match="personal tensors"):
        rule.receive(SiteUpdate("a", {"classifier.weight": np.ones(2, np.float32)}, 5), None)
    secure = FederatedStrategy(personal=["classifier.*"], secagg=True).aggregator
    assert isinstance(secure, SecureAggregation) and isinstance(secure.inner, PartialSharing)
    compressed = FederatedStrategy(personal=["classifier.*"], compression="int8").aggregator
    assert isinstance(compressed, Compressed) and isinstance(compressed.inner, PartialSharing)
    # the site halves nest the same way: the personal tensors are gone before anything is encoded
    assert type(compressed.site_algorithm().inner).__name__ == "PartialSharingSite"
    # Compressed hands its decoded update on: the partial-sharing check still runs behind compression
    leaked = Compressed(rule, compressed.codec)
    encoded = SiteUpdate("a", {}, 5, {"compressed": {}, "compressed_difference": True})
    assert leaked.receive(encoded, None).weights == {}


def test_personal_and_fedper_heads_must_name_some_but_not_all_tensors():
    model = _Model()
    assert head_names(model, None) == {"classifier.weight", "classifier.bias"}  # the last layer with parameters
    assert head_names(model, ["body.*"]) == {"body.weight", "body.bias"}
    for bad in ([], "classifier.*", [1]):
        with pytest.raises(ValueError, match="personal must be"):
            FederatedStrategy(personal=bad)
    with pytest.raises(ValueError, match="names none"):
        PartialSharing(get_aggregator("fedavg"), ["head.*"]).check_model(model)
    with pytest.raises(ValueError, match="every tensor"):
        PartialSharing(get_aggregator("fedavg"), ["*"]).check_model(model)
    get_aggregator("fedper").check_model(model)
    with pytest.raises(ValueError, match="names none"):
        get_aggregator("fedper", head=["head.*"]).check_model(model)


@pytest.mark.integration
@pytest.mark.usefixtures("ray_cluster", "fed_data")
def test_personal_tensors_never_travel_and_each_site_is_tested_with_its_own(tmp_path):
    from lightning_fed.models import SmallCNN
    from tests.helpers import small_hospitals

    torch.manual_seed(0)
    model = SmallCNN()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = FederatedStrategy(
        personal=["classifier.*"], audit_messages=True, progress=False, checkpoint_every=0, sync_every=1
    )
    trainer = L.Trainer(strategy=strategy, max_epochs=2, logger=False, enable_checkpointing=False)
    dm = small_hospitals(val_fraction=0.0)
    try:
        trainer.fit(model, datamodule=dm)
        weights = strategy.federation.site_weights()
        trainer.test(model, datamodule=dm, verbose=False)
        after = strategy.federation.site_weights()
        audit = strategy.federation.audit()
    finally:
        strategy.shutdown()
    # nothing any site sent the coordinator or returned to the driver in fit and test mentions a personal tensor
    # (``weights`` is this test's own look into the sites, Federation.site_weights)
    messages = [m for m in audit["coordinator"] + audit["driver"] if m["method"] != "weights"]
    assert {"sync", "fit", "test"} <= {m["method"] for m in messages}
    paths = [path for m in messages for path, *_ in m["payload"]]
    assert any("features.0.weight" in path for path in paths)  # the shared tensors did travel
    leaks = {m["method"] for m in messages for p, *_ in m["payload"] if "classifier" in p}
    assert not leaks, leaks
    assert "classifier.weight" not in strategy.last_fit.global_model.weights
    # the shared tensors are the global model at every site; each site's head is its own
    global_model = strategy.last_fit.global_model.weights
    sites = list(weights)
    for site in sites:
        for key, value in global_model.items():
            np.testing.assert_array_equal(weights[site][key], value)
    heads = [weights[s]["classifier.weight"] for s in sites]
    assert not np.allclose(heads[0], heads[1]) and not np.allclose(heads[0], heads[2])
    # the driver's module: the shared tensors of the global model, its head untouched
    state = state_to_numpy(model.state_dict())
    np.testing.assert_array_equal(state["features.0.weight"], global_model["features.0.weight"])
    assert torch.equal(model.classifier.weight, initial["classifier.weight"])
    # testing pushed the global model to the sites around their heads
    for site in sites:
        np.testing.assert_array_equal(after[site]["classifier.weight"], weights[site]["classifier.weight"])
    assert strategy.last_evaluation.notes == ["each site evaluated with its own personal tensors (partial sharing)"]


class _Recorded(L.LightningModule):
    """A body and a classifier head; records, per epoch, which parameters had a gradient at each optimizer step."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(3, 4)
        self.frozen = torch.nn.Linear(4, 4)  # frozen by the module itself: no phase may unfreeze it
        self.frozen.requires_grad_(False)
        self.classifier = torch.nn.Linear(4, 2)
        self.seen: dict[int, set[str]] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.classifier(self.frozen(self.body(x))), y)

    def on_before_optimizer_step(self, optimizer):
        with_grad = {n for n, p in self.named_parameters() if p.grad is not None}
        self.seen.setdefault(self.current_epoch, set()).update(with_grad)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader():
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,))), batch_size=4)


def test_fedrep_trains_the_head_first_then_the_body_in_every_round():
    from lightning_fed.strategies.site.fedrep import FedRepSite

    torch.manual_seed(0)
    module, site = _Recorded(), get_aggregator("fedrep", head_epochs=1).site_algorithm()
    assert isinstance(site, FedRepSite)
    kw = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    L.Trainer(max_epochs=3, callbacks=[site], **kw).fit(module, _loader())
    head, body = {"classifier.weight", "classifier.bias"}, {"body.weight", "body.bias"}
    assert module.seen == {0: head, 1: body, 2: body}  # the frozen layer never, in any phase
    assert all(p.requires_grad for n, p in module.named_parameters() if not n.startswith("frozen"))  # given back
    assert not module.frozen.weight.requires_grad
    update = site.local_update(None, module, 8)
    assert set(update.weights) == body | {"frozen.weight", "frozen.bias"}  # the head stays
    site.receive_global(None, module, GlobalModel(update.weights, round=1))  # a new round: the head first again
    assert (site.epochs_in_round, site.phase()) == (0, "head")
    short = get_aggregator("fedrep", head_epochs=2).site_algorithm()
    L.Trainer(max_epochs=1, callbacks=[short], **kw).fit(_Recorded(), _loader())
    with pytest.raises(ValueError, match="before the body trained"):
        short.local_update(None, module, 8)
