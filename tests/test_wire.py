"""What travels between hospitals: bytes measured exactly, update compression, and federations with each codec."""

import asyncio
import math

import lightning as L
import numpy as np
import pytest
import torch

from lightning_fed import FederatedStrategy
from lightning_fed.strategies import GlobalModel, SiteUpdate, get_aggregator
from lightning_fed.strategies.compression import (
    Compressed,
    Float16,
    Int8Blocks,
    TopK,
    encode_update,
    get_codec,
    l2_norm,
)
from lightning_fed.traffic import wire_size
from tests.helpers import small_hospitals


def test_codecs_round_trip_within_their_bounds():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(513, 37)) * np.logspace(-6, 0, 37)  # columns from 1e-6 to 1: every scale an update has
    x[:64] = 0.0  # a block of zeros
    n = x.size

    half = Float16().encode(x).decode()
    assert np.all(np.abs(half - x) <= 2.0**-11 * np.abs(x) + 2.0**-25)
    with pytest.raises(ValueError, match="beyond half precision.*compression='int8'"):
        Float16().encode(np.array([1e6]))

    int8 = Int8Blocks(block=64).encode(x)
    flat, back = x.reshape(-1), int8.decode().reshape(-1)
    for start in range(0, n, 64):
        block = flat[start : start + 64]
        step = np.float32(np.abs(block).max() / 127.0)  # the scale as it travels (float32)
        assert np.all(np.abs(back[start : start + 64] - block) <= step / 2 * (1 + 1e-6) + 1e-300)
    assert np.all(int8.decode()[:64] == 0)  # a block of zeros stays zeros

    top = TopK(fraction=0.05).encode(x)
    k = math.ceil(0.05 * n)
    dense = top.decode().reshape(-1)
    assert top.indices.size == k and np.count_nonzero(dense) <= k
    kept = np.zeros(n, bool)
    kept[top.indices] = True
    assert np.abs(flat[kept]).min() >= np.abs(flat[~kept]).max()  # the largest values, none smaller
    assert np.array_equal(dense[kept], flat[kept].astype(np.float32).astype(np.float64))

    # what each costs on the wire, against the float32 tensor a site sends without compression
    full = wire_size(x.astype(np.float32))
    assert wire_size(Float16().encode(x)) / full == pytest.approx(0.5, abs=0.01)
    assert wire_size(Int8Blocks(block=64).encode(x)) / full == pytest.approx(0.25 + 1 / 64, abs=0.01)
    assert wire_size(top) / full == pytest.approx(2 * 0.05, abs=0.01)
    with pytest.raises(ValueError, match="unknown compression 'zip'.*fp16, int8, topk"):
        get_codec("zip")
    with pytest.raises(ValueError, match="fraction must be in"):
        get_codec("topk", {"fraction": 0})


def test_error_feedback_carries_what_topk_dropped():
    from lightning_fed.strategies.site import SiteAlgorithm
    from lightning_fed.strategies.site.compression import CompressedSite

    torch.manual_seed(0)
    module = torch.nn.Linear(40, 10)
    codec = TopK(fraction=0.1)
    site = CompressedSite(SiteAlgorithm(), codec)
    site.on_fit_start(None, module)
    start = {k: v.detach().numpy().astype(np.float64).copy() for k, v in module.state_dict().items()}
    server = Compressed(get_aggregator("fedavg"), codec)
    rng = np.random.default_rng(1)
    true_total = {k: np.zeros_like(v) for k, v in start.items()}
    sent_total = {k: np.zeros_like(v) for k, v in start.items()}
    for round_ in range(1, 6):  # the global model stays put: every round's update is a fresh step from it
        step = {k: rng.normal(size=v.shape) * 0.01 for k, v in start.items()}
        with torch.no_grad():
            for k, p in module.state_dict().items():
                p.copy_(torch.from_numpy(start[k] + step[k]))
        update = site.local_update(None, module, 10)
        update.site = "a"
        decoded = server.receive(update, {k: v.astype(np.float32) for k, v in start.items()})
        for k in start:
            true_total[k] += (start[k] + step[k]).astype(np.float32).astype(np.float64) - start[k]
            sent_total[k] += decoded.weights[k].astype(np.float64) - start[k].astype(np.float32).astype(np.float64)
            assert np.count_nonzero(update.extras["compressed"][k].decode()) <= math.ceil(0.1 * start[k].size)
    for k in start:  # nothing is lost: what was sent plus what is still carried is every step taken
        np.testing.assert_allclose(sent_total[k] + site.residual[k], true_total[k], atol=1e-6)
        assert np.abs(site.residual[k]).max() > 0
    restored = CompressedSite(SiteAlgorithm(), codec)
    restored.load_state_dict(site.state_dict())  # the residual is in the site's checkpoints
    for k in start:
        np.testing.assert_array_equal(restored.residual[k], site.residual[k])


def test_statistics_travel_as_they_are_and_only_parameters_are_encoded():
    from lightning_fed.strategies.site import SiteAlgorithm
    from lightning_fed.strategies.site.compression import CompressedSite

    module = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6))
    site = CompressedSite(SiteAlgorithm(), TopK(fraction=0.2))
    site.on_fit_start(None, module)
    module.train()
    module(torch.randn(16, 4))  # BatchNorm's running statistics move
    update = site.local_update(None, module, 16)
    assert set(update.extras["compressed"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert set(update.weights) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    np.testing.assert_array_equal(update.weights["1.running_var"], module[1].running_var.numpy())
    current = {k: v.copy() for k, v in site.anchor.items()}
    decoded = Compressed(get_aggregator("fedavg"), TopK(fraction=0.2)).receive(update, current)
    assert np.all(decoded.weights["1.running_var"] > 0) and set(decoded.weights) == set(module.state_dict())


@pytest.mark.parametrize("codec", [Float16(), Int8Blocks(block=16), TopK(fraction=0.3)], ids=lambda c: c.name)
def test_compressed_update_stays_within_a_clip_norm(codec):
    rng = np.random.default_rng(2)
    update = {"w": rng.normal(size=(50, 20)), "b": rng.normal(size=20)}
    scale = 1.0 / l2_norm(update.values())
    clipped = {k: v * scale for k, v in update.items()}  # DP-FedAvg's clipped Δ: norm exactly S = 1
    encoded, decoded = encode_update(codec, clipped, norm_bound=1.0)
    assert l2_norm(decoded.values()) <= 1.0  # the sensitivity the noise was calibrated for still holds
    assert l2_norm(e.decode() for e in encoded.values()) == pytest.approx(l2_norm(decoded.values()))


def test_coordinator_counts_the_serialized_size_of_every_message(ray_cluster):
    from lightning_fed.coordinator import Coordinator

    rng = np.random.default_rng(3)
    w0 = {"w": rng.normal(size=(30, 10)).astype(np.float32), "n": np.array(3)}
    coordinator = Coordinator(get_aggregator("fedavg"), ["a", "b"], initial_model=GlobalModel(w0, 0))
    updates = {
        s: SiteUpdate("", {"w": rng.normal(size=(30, 10)).astype(np.float32), "n": np.array(4)}, 10 + i)
        for i, s in enumerate("ab")
    }
    carry = {"a": None, "b": {"SiteDPSGD": {"history": [(1.1, 0.1, 20)]}}}
    expected_sent = {s: wire_size((s, 1, updates[s], carry[s])) for s in "ab"}  # before the coordinator touches them
    metrics = {s: {"scalars": {"val_loss": 0.5 + i}, "num_samples": 7, "metrics": None} for i, s in enumerate("ab")}

    async def one_round():
        refs = await asyncio.gather(*(coordinator.sync(s, 1, updates[s], carry[s]) for s in "ab"))
        merged = await asyncio.gather(*(coordinator.merge_metrics(s, ("val", 0, 1), metrics[s], 0) for s in "ab"))
        return refs, merged

    refs, merged = asyncio.run(one_round())
    model = coordinator.global_model  # the object put in the object store for the sites to fetch
    assert ray_cluster.get(refs[0][0]).round == model.round == 1
    ledger = coordinator.traffic()
    for i, s in enumerate("ab"):
        # round 1: the update (with what it carries); the validation after it counts in the last round
        assert ledger[s]["sent"] == [expected_sent[s] + wire_size((s, ("val", 0, 1), metrics[s], 0))]
        assert ledger[s]["received"] == [wire_size(model) + wire_size(merged[i])]
    assert wire_size(model) > w0["w"].nbytes  # the model's arrays are counted, not just their references


def _hospitals_fit(tmp_path, **strategy_kwargs):
    from lightning_fed.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN()
    strategy = FederatedStrategy(progress=False, checkpoint_every=0, seed=0, **strategy_kwargs)
    trainer = L.Trainer(
        strategy=strategy, max_epochs=2, logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    data = small_hospitals(sizes=(400, 200, 200))
    trainer.fit(model, datamodule=data)
    fit = strategy.last_fit
    trainer.test(model, datamodule=data, verbose=False)
    auroc = strategy.last_evaluation.federated["fl/test_auroc"]
    strategy.shutdown()
    return fit, auroc, model


@pytest.mark.usefixtures("fed_data")
def test_a_federation_trains_with_each_codec_and_sends_what_it_promises(tmp_path, ray_cluster):
    from lightning_fed.strategies.base import SiteUpdate as Update
    from lightning_fed.strategies.site import state_to_numpy

    fit, auroc, model = _hospitals_fit(tmp_path / "full")
    weights = state_to_numpy(model.state_dict())
    model_bytes = wire_size(Update("", weights, 320))
    traffic = fit.traffic
    assert set(traffic.sent) == {"large", "small_1", "small_2"} and traffic.rounds == 2
    for site in traffic.sent:  # every round each site sends at least its model and receives the global one
        assert all(sent >= model_bytes for sent in traffic.sent[site])
        assert all(received >= wire_size(GlobalModel(weights, 1)) for received in traffic.received[site])
    assert traffic.total_sent == sum(map(sum, traffic.sent.values()))
    full_sent, full_update = traffic.per_site_round()[0], traffic.update_per_site_round()
    assert model_bytes <= full_update < full_sent
    assert auroc > 0.85
    for name, options, ratio in (
        ("fp16", None, 0.5),
        ("int8", None, 0.25 + 1 / 256),
        ("topk", {"fraction": 0.05}, 0.1),
    ):
        fit, coded_auroc, _ = _hospitals_fit(tmp_path / name, compression=name, compression_kwargs=options)
        sent, received = fit.traffic.per_site_round()
        # the update shrinks by the codec's ratio; metric states and reports do not
        assert fit.traffic.update_per_site_round() / full_update == pytest.approx(ratio, abs=0.03), name
        assert sent - fit.traffic.update_per_site_round() == pytest.approx(full_sent - full_update, rel=0.05), name
        assert received == pytest.approx(traffic.per_site_round()[1], rel=0.02)  # the global model is sent in full
        assert coded_auroc > 0.8, name
