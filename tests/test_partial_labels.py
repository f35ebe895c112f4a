"""Partial-label, non-IID sites: FashionMNIST mosaics, MedMNIST sites, and a FedFBN federation over them."""

import json

import lightning as L
import numpy as np
import pytest
import torch

from lightning_fed import FederatedStrategy
from lightning_fed.data.fashion_mnist import CLASSES, load_fashion_mnist
from lightning_fed.data.mosaic import FashionMosaicSites, compose_mosaics, pretraining_pool_indices, scanner
from lightning_fed.data.partial_labels import check_label_sets, rotating_label_sets
from lightning_fed.models import ImageClassifier
from tests.conftest import REPO
from tests.test_cli import _main
from tests.test_models import _trained_timm

TINY = dict(site_names=("a", "b"), train_sizes=(48, 32), test_size=40, labels_per_site=6, batch_size=16)


def _planned_tiles(plan):
    return {int(t) for split in plan.values() if split["pool"] == "train" for t in split["tiles"].ravel()}


def test_mosaics_are_the_planned_tiles_with_site_masks(fed_data):
    dm = FashionMosaicSites(**TINY, seed=3)
    train_x, train_y = load_fashion_mnist(None, "train")
    plans = dm.site_plans()
    for k, site in enumerate(dm.federated_sites()):
        site.datamodule.setup("fit")
        plan, data = plans[site.name], site.datamodule.datasets
        x, y = data["train"].tensors
        expected = scanner(compose_mosaics(train_x, plan["train"]["tiles"]), dm.contrast[k], dm.brightness[k])
        assert torch.equal(x, expected) and x.shape[1:] == (1, 56, 56)
        present = np.zeros((len(y), len(CLASSES)), dtype=bool)
        for row, tiles in enumerate(plan["train"]["tiles"]):
            present[row, train_y[tiles]] = True
        annotated = np.isin(np.arange(len(CLASSES)), dm.annotated_labels[k])
        y = y.numpy()
        assert np.array_equal(y[:, annotated], present[:, annotated].astype(np.int64))  # what is annotated is right
        assert np.all(y[:, ~annotated] == -1)  # the rest is unknown, never a negative
        assert np.all(data["test"].tensors[1].numpy() >= 0)  # test labels complete by default
    a, b = (_planned_tiles(p) for p in plans.values())
    assert not a & b  # sites never share an image
    assert not (a | b) & set(pretraining_pool_indices().tolist())  # nor use the pretraining pool
    assert dm.contrast[0] != dm.contrast[1]  # different scanners
    mix = dm.class_mix()
    assert np.allclose(mix.sum(1), 1) and not np.allclose(mix[0], mix[1])  # different prevalence
    again = FashionMosaicSites(**TINY, seed=3).site_plans()
    other = FashionMosaicSites(**TINY, seed=4).site_plans()
    assert all(np.array_equal(again[s]["train"]["tiles"], plans[s]["train"]["tiles"]) for s in plans)
    assert not np.array_equal(other["a"]["train"]["tiles"], plans["a"]["train"]["tiles"])


def test_label_sets_cover_every_label_or_fail_clearly():
    sets = rotating_label_sets(4, 10, 6)
    assert sets[0] == [0, 1, 2, 3, 4, 5] and set().union(*map(set, sets)) == set(range(10))
    with pytest.raises(ValueError, match=r"labels \[9\] are annotated by no site"):
        check_label_sets([[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]], 2, 10)
    with pytest.raises(ValueError, match="one list per site"):
        check_label_sets([[0]], 2, 10)
    with pytest.raises(ValueError, match="cannot cover"):
        rotating_label_sets(2, 10, 3)
    with pytest.raises(ValueError, match="train_sizes has 1 entries for 2 sites"):
        FashionMosaicSites(site_names=("a", "b"), train_sizes=(10,))


def test_medmnist_sites_deal_out_the_verified_official_splits(fed_data):
    from lightning_fed.data.medmnist import MedMNISTSites, load_medmnist

    arrays = load_medmnist("retinamnist")
    dm = MedMNISTSites("retinamnist", site_names=("east", "west"), alpha=1.0, seed=0)
    idx = dm.site_indices()
    for split in ("train", "val", "test"):
        both = np.concatenate([idx["east"][split], idx["west"][split]])
        assert sorted(both.tolist()) == list(range(len(arrays[f"{split}_labels"])))  # complete, disjoint
    site = dm.federated_sites()[0]
    site.datamodule.setup("fit")
    x, y = site.datamodule.datasets["train"].tensors
    assert x.shape[1:] == (3, 28, 28) and -1.0 <= x.min() and x.max() <= 1.0
    assert torch.equal(y, torch.from_numpy(arrays["train_labels"][idx["east"]["train"]].reshape(-1)))
    with pytest.raises(ValueError, match="partial labels .* need a multi-label one"):
        MedMNISTSites("breastmnist", labels_per_site=1)
    with pytest.raises(ValueError, match="unknown MedMNIST dataset 'chestxray'"):
        MedMNISTSites("chestxray")


def test_chestmnist_sites_annotate_their_own_findings():
    from lightning_fed.data.medmnist import MedMNISTSites, load_medmnist

    try:
        arrays = load_medmnist("chestmnist")
    except (FileNotFoundError, ValueError) as err:
        pytest.skip(f"ChestMNIST is neither in the data folder nor downloadable here: {err}")
    dm = MedMNISTSites("chestmnist", labels_per_site=8, site_names=("a", "b", "c", "d"))
    for k, site in enumerate(dm.federated_sites()):
        site.datamodule.setup("fit")
        y = site.datamodule.datasets["train"].tensors[1].numpy()
        unannotated = ~np.isin(np.arange(14), dm.annotated_labels[k])
        assert np.all(y[:, unannotated] == -1) and np.all(y[:, ~unannotated] >= 0)
        assert np.all(site.datamodule.datasets["test"].tensors[1].numpy() >= 0)
    assert arrays["train_labels"].shape[1] == 14


@pytest.mark.usefixtures("fed_data")
def test_fedfbn_trains_a_pretrained_timm_backbone_on_partial_label_sites(tmp_path, ray_cluster):
    from lightning_fed.strategies.site.fedfbn import batchnorm_layers

    checkpoint = tmp_path / "pretrained.pth"
    torch.save(_trained_timm().state_dict(), checkpoint)
    torch.manual_seed(0)
    model = ImageClassifier("resnet10t", task="multilabel", num_classes=10, in_chans=1, pretrained=str(checkpoint))
    bn_before = {
        k: v.clone()
        for k, v in model.state_dict().items()
        if any(k.startswith(f"backbone.{n}.") for n in batchnorm_layers(model.backbone))
    }
    head_before = model.backbone.fc.weight.detach().clone()
    # test labels masked like training labels: a label a site does not annotate has no support there
    dm = FashionMosaicSites(**TINY, test_fully_annotated=False, seed=0)
    strategy = FederatedStrategy(aggregator="fedfbn", progress=False, checkpoint_every=0)
    trainer = L.Trainer(
        strategy=strategy, max_epochs=2, logger=False, enable_checkpointing=False, num_sanity_val_steps=0
    )
    try:
        trainer.fit(model, datamodule=dm)
        trainer.test(model, datamodule=dm, verbose=False)
        evaluation = strategy.last_evaluation
        rows = evaluation.rows()
    finally:
        strategy.shutdown()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in bn_before.items())  # frozen, bit for bit
    assert not torch.equal(model.backbone.fc.weight, head_before)  # the rest trained
    for k, name in enumerate(dm.site_names):
        per_label = rows[name]["auroc_per_label"]
        assert len(per_label) == 10
        for label in set(range(10)) - set(dm.annotated_labels[k]):
            assert per_label[label] is None  # unannotated entries were ignored, not scored as negatives
        supported = [v for v in per_label if v is not None]
        assert supported and rows[name]["auroc"] == pytest.approx(np.mean(supported))
    federated = rows["federated"]["auroc_per_label"]
    assert sum(v is not None for v in federated) >= max(
        sum(v is not None for v in rows[n]["auroc_per_label"]) for n in dm.site_names
    )
    assert any("FedFBN" in note for note in evaluation.notes)


@pytest.mark.usefixtures("fed_data")
def test_partial_label_recipe_runs_and_reports_auroc_per_label(tmp_path, ray_cluster, monkeypatch, capsys):
    checkpoint = tmp_path / "pretrained.pth"
    torch.save(_trained_timm().state_dict(), checkpoint)
    args = [
        "fit",
        "--config",
        str(REPO / "recipes" / "partial_labels.yaml"),
        "--trainer.max_epochs=1",
        f"--model.init_args.pretrained={checkpoint}",
        "--data.init_args.site_names=[a,b]",
        "--data.init_args.train_sizes=[48,32]",
        "--data.init_args.test_size=40",
        "--trainer.logger=false",
    ]
    code, out, err = _main(args, monkeypatch, capsys)  # the command, in this process (on the session's Ray)
    assert code == 0, out[-3000:] + err[-3000:]
    assert "AUROC per label" in out and "Ankle boot" in out
    written = [line for line in out.splitlines() if line.startswith("results written to ")][-1]
    results = json.loads((tmp_path / written.removeprefix("results written to ").strip()).read_text())
    assert results["label_names"] == list(CLASSES)
    federated = results["test"]["federated"]
    assert len(federated["auroc_per_label"]) == 10
    assert federated["auroc"] == pytest.approx(np.mean([v for v in federated["auroc_per_label"] if v is not None]))

    code, _, err = _main(
        args[:4] + ["--model.init_args.pretrained=/nowhere/weights.pth", *args[5:]], monkeypatch, capsys
    )
    assert code != 0 and "pretrained checkpoint /nowhere/weights.pth does not exist" in err.strip().splitlines()[-1]
