"""Aggregation rules, the registry, partitioners and metric merging: no Ray needed."""

import lightning as L
import numpy as np
import pytest
import torch
from torchmetrics.classification import BinaryAUROC, BinaryRecall

from lightning_fed import FederatedStrategy
from lightning_fed.data import IID, Dirichlet, SizeAndRatio, split_fractions
from lightning_fed.metrics import TaskSpec, merge_metric_states, metric_states
from lightning_fed.strategies import (
    Aggregator,
    FedAvg,
    GlobalModel,
    SiteUpdate,
    available_aggregators,
    get_aggregator,
    register_aggregator,
)


def test_fedavg_matches_hand_computation():
    a = {
        "w": np.array([1.0, 2.0], dtype=np.float32),
        "b": np.array([0.5], dtype=np.float32),
        "count": np.array(7, dtype=np.int64),
    }
    b = {
        "w": np.array([3.0, 6.0], dtype=np.float32),
        "b": np.array([-0.5], dtype=np.float32),
        "count": np.array(3, dtype=np.int64),
    }
    c = {
        "w": np.array([0.0, 0.0], dtype=np.float32),
        "b": np.array([1.5], dtype=np.float32),
        "count": np.array(1, dtype=np.int64),
    }
    out = FedAvg().aggregate(1, [SiteUpdate("a", a, 100), SiteUpdate("b", b, 300), SiteUpdate("c", c, 100)], None)
    # w = 0.2*[1,2] + 0.6*[3,6] + 0.2*[0,0] = [2.0, 4.0]; b = 0.2*0.5 + 0.6*(-0.5) + 0.2*1.5 = 0.1
    np.testing.assert_allclose(out.weights["w"], [2.0, 4.0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(out.weights["b"], [0.1], rtol=0, atol=1e-6)
    assert out.weights["w"].dtype == np.float32
    # integer buffers are not averaged: taken from the largest site (b: 300 samples)
    assert out.weights["count"].dtype == np.int64 and int(out.weights["count"]) == 3
    assert out.round == 1


def test_fedavg_accumulates_in_float64():
    # 3 sites of float16-representable values whose float16 running sum would round away the small one
    big = {"w": np.array([2048.0], dtype=np.float16)}
    small = {"w": np.array([1.0], dtype=np.float16)}
    out = FedAvg().aggregate(1, [SiteUpdate("a", big, 1), SiteUpdate("b", small, 1)], None)
    assert float(out.weights["w"][0]) == pytest.approx(1024.5, abs=0.5)


def test_fedavg_rejects_rounds_without_samples():
    with pytest.raises(ValueError, match="no training samples"):
        FedAvg().aggregate(1, [SiteUpdate("a", {"w": np.zeros(1)}, 0)], None)


def test_registry_names_and_errors():
    assert "fedavg" in available_aggregators()
    with pytest.raises(ValueError, match="unknown aggregator 'fedmagic'.*fedavg"):
        get_aggregator("fedmagic")
    with pytest.raises(ValueError, match="lower-case"):
        register_aggregator("FedCaps")
    with pytest.raises(ValueError, match="bad options for aggregator 'fedavg'"):
        get_aggregator("fedavg", mu=0.1)


def test_string_flag_builds_the_federated_strategy():
    trainer = L.Trainer(strategy="fedavg", max_epochs=1, logger=False)
    assert isinstance(trainer.strategy, FederatedStrategy)
    assert isinstance(trainer.strategy.aggregator, FedAvg)
    trainer = L.Trainer(strategy="FedAvg", max_epochs=1, logger=False)  # Lightning lower-cases flags
    assert isinstance(trainer.strategy, FederatedStrategy)


def test_third_party_aggregator_registers_by_name_and_flag():
    @register_aggregator("median_test_rule")
    class Median(Aggregator):
        def aggregate(self, round, updates, current):
            return GlobalModel(
                {k: np.median([u.weights[k] for u in updates], axis=0) for k in updates[0].weights}, round
            )

    strategy = FederatedStrategy(aggregator="median_test_rule")
    assert isinstance(strategy.aggregator, Median) and strategy.aggregator.name == "median_test_rule"
    out = strategy.aggregator.aggregate(
        2, [SiteUpdate(str(i), {"w": np.array([v])}, 1) for i, v in enumerate([1.0, 5.0, 100.0])], None
    )
    assert out.weights["w"][0] == 5.0


def test_strategy_rejects_bad_settings():
    with pytest.raises(ValueError, match="sync_every must be an integer >= 1"):
        FederatedStrategy(sync_every=0)
    with pytest.raises(ValueError, match="unknown aggregator"):
        FederatedStrategy(aggregator="fedavgg")


def test_iid_and_dirichlet_partitions_are_seeded_and_complete():
    labels = np.repeat(np.arange(10), 100)
    for part in (IID(seed=3), Dirichlet(alpha=0.3, seed=3)):
        first, second = part(labels, 4), part(labels, 4)
        assert all(np.array_equal(a, b) for a, b in zip(first, second))
        joined = np.concatenate(first)
        assert sorted(joined.tolist()) == list(range(1000))  # every sample exactly once
    iid_sizes = [len(p) for p in IID(seed=0)(labels, 3)]
    assert max(iid_sizes) - min(iid_sizes) <= 1
    # a small alpha skews label mixes: some site is dominated by few classes
    skew = Dirichlet(alpha=0.1, seed=0)(labels, 4)
    top_share = max(np.bincount(labels[p], minlength=10).max() / len(p) for p in skew)
    assert top_share > 0.4
    assert not any(
        np.array_equal(a, b) for a, b in zip(Dirichlet(0.3, seed=1)(labels, 4), Dirichlet(0.3, seed=2)(labels, 4))
    )


def test_size_and_ratio_reproduces_study_b_layout():
    labels = np.array([1] * 21000 + [0] * 49000)
    parts = SizeAndRatio([30000, 3000, 3000, 3000, 3000], [0.5, 0.1, 0.1, 0.1, 0.1], seed=0)(labels)
    assert [len(p) for p in parts] == [30000, 3000, 3000, 3000, 3000]
    assert [int(labels[p].sum()) for p in parts] == [15000, 300, 300, 300, 300]
    assert len(np.unique(np.concatenate(parts))) == 42000  # drawn without replacement
    train, test = split_fractions(parts[1], [0.8, 0.2], seed=1)
    assert len(train) == 2400 and len(test) == 600 and not set(train) & set(test)
    with pytest.raises(ValueError, match="needs 30000 positive"):
        SizeAndRatio([30000, 30000], [0.5, 0.5])(labels)


def test_federated_auroc_merges_states_and_equals_pooled():
    gen = torch.Generator().manual_seed(0)
    sites = []
    for shift in (0.0, 0.8, -0.5):
        y = (torch.rand(300, generator=gen) < 0.3).long()
        p = torch.sigmoid(torch.randn(300, generator=gen) + shift + 1.5 * y)
        sites.append((p, y))
    spec = TaskSpec("binary", 2, thresholds=1000)
    states = []
    for p, y in sites:
        metrics = spec.build()
        for m in metrics.values():
            m.update(p, y)
        states.append(metric_states(metrics))
    merged = merge_metric_states(spec, states)
    pooled_p, pooled_y = torch.cat([p for p, _ in sites]), torch.cat([y for _, y in sites])
    assert merged["auroc"] == pytest.approx(float(BinaryAUROC(thresholds=1000)(pooled_p, pooled_y)), abs=1e-6)
    assert merged["recall"] == pytest.approx(float(BinaryRecall()(pooled_p, pooled_y)), abs=1e-6)
    mean_of_sites = np.mean([float(BinaryAUROC(thresholds=1000)(p, y)) for p, y in sites])
    assert abs(mean_of_sites - merged["auroc"]) > 1e-3  # the naive mean is not the federated value
    assert np.array(merged["confusion_matrix"]).sum() == 900


def test_multilabel_merge_ignores_unlabelled_entries_and_unsupported_labels():
    from torchmetrics.classification import BinaryAUROC

    gen = torch.Generator().manual_seed(1)
    spec = TaskSpec.infer(torch.zeros(4, 3), torch.zeros(4, 3), thresholds=1000)
    assert spec.kind == "multilabel" and spec.num_classes == 3
    states, pooled = [], []
    for site in range(2):
        y = (torch.rand(200, 3, generator=gen) < 0.4).long()
        y[:, 2] = 0  # label 2 never positive anywhere: no support
        if site == 1:
            y[:, 0] = -1  # site 1 does not annotate label 0 (partial labels)
        logits = torch.randn(200, 3, generator=gen) + 2.0 * y.clamp(min=0)
        metrics = spec.build()
        for m in metrics.values():
            m.update(spec.probabilities(logits), y)
        states.append(metric_states(metrics))
        pooled.append((logits.sigmoid(), y))
    merged = merge_metric_states(spec, states)
    assert merged["auroc_per_label"][2] is None  # unsupported label excluded, not counted as 0.0
    p0 = torch.cat([p[:, 0][y[:, 0] >= 0] for p, y in pooled])
    y0 = torch.cat([y[:, 0][y[:, 0] >= 0] for _, y in pooled])
    assert merged["auroc_per_label"][0] == pytest.approx(float(BinaryAUROC(thresholds=1000)(p0, y0)), abs=1e-6)
    assert merged["auroc"] == pytest.approx(np.mean(merged["auroc_per_label"][:2]), abs=1e-9)


def test_coordinator_aborts_instead_of_hanging_when_sites_fall_out_of_step():
    import asyncio

    from lightning_fed.coordinator import Coordinator, FederationAborted

    async def scenario():
        coordinator = Coordinator(FedAvg(), ["a", "b"])
        a = asyncio.ensure_future(coordinator.agree("a", ("decision", 1), True, all=False))
        await asyncio.sleep(0)  # 'a' waits alone: a normal wait, nothing is decided yet
        assert not a.done()
        b = asyncio.ensure_future(coordinator.merge_metrics("b", ("val", 1), {"scalars": {}}, epoch=0))
        return await asyncio.wait_for(asyncio.gather(a, b, return_exceptions=True), timeout=5)

    results = asyncio.run(scenario())
    assert all(isinstance(r, FederationAborted) for r in results)
    assert "(a at decision 1, b at val 1)" in str(results[0])

    async def agreed():
        coordinator = Coordinator(FedAvg(), ["a", "b"])
        return await asyncio.gather(
            coordinator.agree("a", ("stop", 1), True, all=False),
            coordinator.agree("b", ("stop", 1), False, all=False),
            coordinator.agree("a", ("stop", 2), True, all=True),
            coordinator.agree("b", ("stop", 2), False, all=True),
        )

    assert asyncio.run(agreed()) == [True, True, False, False]
